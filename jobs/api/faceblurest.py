"""FaceBlurest: one photo in, its faces (Custom Vision-style predictions) and the blurred photo out.

    POST /faceblurest   HTTP Basic; {"base64_Photo_String": "<base64>", "photo_url": "NO"}
      -> {"id", "created", "predictions": [{probability, tagId, tagName, boundingBox{left, top, width,
          height} (fractions of the image)}], "final_photo": "<base64 JPEG: faces blurred, ellipses drawn>"}

Errors are `[{"cd": "...", "description": "..."}]`: 1001 bad or missing credentials (401), 1013 input
too large (413), 1014 invalid data: bad JSON, bad base64, not an image (400). `photo_url` other than
"NO" makes the server fetch that URL, which lets a caller reach whatever the server can reach: it
is refused unless the server runs with --allow-url-fetch.

The photo is processed like a one-image job (faces only, blur, debug drawing) in a temporary
folder, which is removed before the answer: FaceBlurest keeps nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Field, ValidationError

from jobs.api.auth import AuthError
from jobs.api.errors import FaceBlurestError
from jobs.api.ratelimit import RateLimited, client_address
from jobs.api.service import Service, UploadTooLarge, get_service, read_capped
from jobs.report import now_iso
from jobs.spec import build_spec
from models.detections import CLASSES
from operators.codecs import decode_full, encode
from operators.items import IMAGE_FORMATS, sniff_format
from operators.rows import FailureCause

router = APIRouter(tags=["FaceBlurest"])
_basic = HTTPBasic(auto_error=False, scheme_name="FaceBlurestBasic")
FACE_TAG_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "veil:faceblurest:human-face"))  # stable across servers
EXTENSIONS = {fmt: ext for ext, fmt in reversed(list(IMAGE_FORMATS.items()))}  # jpeg -> .jpg, ...


class FaceBlurestRequest(BaseModel):
    base64_Photo_String: str = Field("", description="the photo, base64 (a data: URL prefix is accepted)")  # noqa: N815
    photo_url: str = Field("NO", description='"NO", or a URL the server fetches (only with --allow-url-fetch)')


def _error(status: int, code: str, message: str, headers: dict | None = None) -> FaceBlurestError:
    return FaceBlurestError(status, code, message, headers)


def faceblurest_user(request: Request, _creds: Annotated[HTTPBasicCredentials | None, Security(_basic)]) -> str:
    # _creds documents the scheme in OpenAPI; the header is checked here, whatever FastAPI made of it
    service = get_service(request)
    try:
        username, password = service.auth.parse_basic(request.headers.get("authorization"))
        user = service.auth_throttle.verify(service.auth, client_address(request), username, password).name
    except RateLimited as exc:
        raise _error(429, FaceBlurestError.RATE_LIMITED, str(exc), exc.headers) from None
    except AuthError as exc:
        raise _error(401, FaceBlurestError.UNAUTHORIZED, str(exc), {"WWW-Authenticate": 'Basic realm="faceblurest"'}) \
            from None
    service.limiter.guard(user, lambda e: _error(429, FaceBlurestError.RATE_LIMITED, str(e), e.headers))
    return user


@router.post("/faceblurest", summary="Detect and blur the faces of one photo",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": FaceBlurestRequest.model_json_schema()}}}})
async def faceblurest(request: Request, user: str = Security(faceblurest_user)) -> dict:
    service = get_service(request)
    limit = service.config.max_upload_bytes
    try:
        # base64 is 4/3 of the photo: the JSON body may be that much larger than a raw upload
        raw = await read_capped(request, limit * 4 // 3 + 4096)
    except UploadTooLarge as exc:
        raise _error(413, FaceBlurestError.TOO_LARGE, str(exc)) from None
    try:
        body = FaceBlurestRequest.model_validate(json.loads(raw or b"null"))
    except (ValueError, ValidationError) as exc:
        message = "body: JSON object with base64_Photo_String and photo_url expected"
        raise _error(400, FaceBlurestError.INVALID_DATA, message if not isinstance(exc, ValidationError)
                     else f"{message} ({exc.error_count()} error(s))") from None
    if body.photo_url.strip().upper() != "NO":
        photo = await run_in_threadpool(_fetch, service, body.photo_url)
    else:
        photo = _decode_base64(body.base64_Photo_String, limit)
    fmt = sniff_format(photo)
    if fmt is None:
        raise _error(400, FaceBlurestError.INVALID_DATA, "the photo is not a JPEG, PNG, BMP, WebP or TIFF image")
    return await service.run_in_pool(_blur, service, photo, fmt)


def _decode_base64(text: str, limit: int) -> bytes:
    text = text.strip()
    if text.startswith("data:") and "," in text:  # data:image/jpeg;base64,....
        text = text.split(",", 1)[1]
    try:
        photo = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _error(400, FaceBlurestError.INVALID_DATA, "base64_Photo_String: not valid base64") from None
    if not photo:
        raise _error(400, FaceBlurestError.INVALID_DATA, "base64_Photo_String: empty")
    if len(photo) > limit:
        raise _error(413, FaceBlurestError.TOO_LARGE, f"the photo is {len(photo)} bytes, over the {limit} byte limit")
    return photo


def _fetch(service: Service, url: str) -> bytes:
    if not service.config.allow_url_fetch:
        raise _error(400, FaceBlurestError.INVALID_DATA, "photo_url: fetching URLs is disabled on this server; "
                     'send base64_Photo_String with photo_url "NO"')
    if urlsplit(url).scheme not in ("http", "https"):
        raise _error(400, FaceBlurestError.INVALID_DATA, "photo_url: an http:// or https:// URL is expected")
    limit = service.config.max_upload_bytes
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "veil"}), timeout=10) as resp:
            photo = resp.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _error(400, FaceBlurestError.INVALID_DATA, f"photo_url: could not be fetched ({type(exc).__name__})") \
            from None
    if len(photo) > limit:
        raise _error(413, FaceBlurestError.TOO_LARGE, f"photo_url: the photo is over the {limit} byte limit")
    return photo


def _blur(service: Service, photo: bytes, fmt: str) -> dict:
    """Faces only, blurred, ellipses drawn (debug): FaceBlurest's output, from the job's operators."""
    with tempfile.TemporaryDirectory(prefix="veil-faceblurest-") as tmp:
        name = "photo" + EXTENSIONS[fmt]
        (Path(tmp) / name).write_bytes(photo)
        spec = build_spec({"inputs": [str(Path(tmp) / name)], "output": tmp, "job_id": "faceblurest",
                           "face": True, "method": "blur", "debug": True})
        result = service.processor.process(spec, str(Path(tmp) / name), name, str(Path(tmp) / "faceblurest"))
        # a pixel bomb, from its header
        if result.status == "failed" and result.failure_cause == FailureCause.TOO_LARGE:
            raise _error(413, FaceBlurestError.TOO_LARGE, f"the photo cannot be used ({result.error})")
        if result.status != "done":
            raise _error(400, FaceBlurestError.INVALID_DATA, f"the photo cannot be used ({result.failure_cause})")
        final = (Path(tmp) / "faceblurest" / "images" / name).read_bytes()
    if fmt != "jpeg":  # FaceBlurest answers a JPEG whatever came in
        final = encode(decode_full(final), "jpeg", quality=90)
    dets, w, h = result.detections, max(result.width, 1), max(result.height, 1)
    face = CLASSES.index("face")
    predictions = [
        {"probability": round(float(dets.scores[i]), 4), "tagId": FACE_TAG_ID, "tagName": "Human Face",
         "boundingBox": {"left": round(float(b[0]) / w, 6), "top": round(float(b[1]) / h, 6),
                         "width": round(float(b[2] - b[0]) / w, 6), "height": round(float(b[3] - b[1]) / h, 6)}}
        for i, b in enumerate(dets.boxes) if dets.class_ids[i] == face
    ]
    return {"id": str(uuid.uuid4()), "created": now_iso(), "predictions": predictions,
            "final_photo": base64.b64encode(final).decode()}
