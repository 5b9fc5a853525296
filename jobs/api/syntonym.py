"""Syntonym: jobs of images and archives under an API key, quoted, approved, billed in credits.

    POST   /syntonym/direct_upload/{file_name}?model=blur&model_config={...}   body: one image -> job
    POST   /syntonym/create_upload_session   {"file_names": [...], "model": "blur", "model_config": {...}}
                                             -> job, with one upload URL per file (PUT the file there)
    POST   /syntonym/notify_on_job_status    {"job_id", "callback_url"}: the JobReport is POSTed there when it ends
    POST   /syntonym/approve_job/{job_id}    200 approved, 201 no approval needed, 202 already approved,
                                             302 not ready (uploads missing), 402 the balance is too low
    GET    /syntonym/get_job_result/{job_id} JobReport: job_status, job_total_credit_cost, tasks with download links
    DELETE /syntonym/delete_job/{job_id}
    GET    /syntonym/get_credit_balance      the API key's credits, used, reserved, available

Each file becomes the job's input: an image is one task, an archive (zip, 7z, rar) one task per
member (service_jobs: listed lazily, same operators as `veil run`, same manifest and job.json).
`model_config` is mapped onto the JobSpec (`spec_fields`): blur_face -> face, enable_lp ->
license-plate, blur_threshold -> face-threshold and license-plate-threshold, slicing -> format
(true: a 2x2 tile grid, 20 % overlap; false: whole), mask_blur -> the feathered edge
(*-anonymization-gradient-start: true 0.3, false 0 = a hard edge, or a number 0..1).

Credentials: `x-api-key` (the users file's api_keys). Upload and download URLs carry their own
signature (or are presigned S3 URLs). Errors: `{"status": "error", "error_code": "...", "message": "..."}`.
"""

from __future__ import annotations

import json
import time
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.api.auth import ApiKey, AuthError
from jobs.api.credits import InsufficientCredits
from jobs.api.errors import SyntonymError
from jobs.api.params import ParamError, check_webhook_host
from jobs.api.service import UploadTooLarge, download_response, get_service, iso, read_capped, verify_link
from jobs.api.service_jobs import JobBusy, JobNotFound
from jobs.api.uploads import receive_file
from jobs.spec import SpecError
from operators.items import UnsafePath, kind_of, safe_rel_path, sniff_format
from operators.storage import join, write_atomic

API = "syntonym"
DOWNLOAD = "/syntonym/download/"
router = APIRouter(prefix="/syntonym", tags=["Syntonym"])
_key = APIKeyHeader(name="x-api-key", auto_error=False, scheme_name="SyntonymApiKey")
_link_params = [{"name": n, "in": "query", "required": True, "schema": {"type": "string"}}
                for n in ("expires", "signature")]
APPROVAL = {"approved": (200, "approved"), "auto": (201, "no approval needed: approved when quoted"),
            "already": (202, "already approved"), "not_ready": (302, "not ready: not every file is uploaded yet")}


class ModelConfig(BaseModel):
    """Syntonym's blur settings; see the module doc for how each becomes a JobSpec field."""

    model_config = ConfigDict(extra="forbid")
    blur_face: bool = True
    enable_lp: bool = False
    blur_threshold: float | None = Field(None, ge=0.0, le=1.0, description="detection score threshold")
    slicing: bool | None = Field(None, description="tile the image (2x2, 20 % overlap) to find small objects")
    mask_blur: bool | float | None = Field(None, description="feathered edge: true, false, or its start 0..1")


class UploadSession(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())
    file_names: list[str] = Field(min_length=1, max_length=1000, description="images, videos, zip / 7z / rar")
    model: str = "blur"
    blur_config: ModelConfig = Field(default_factory=ModelConfig, alias="model_config")


class Callback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(max_length=64)
    callback_url: str = Field(max_length=2000)


def spec_fields(model: str, config: ModelConfig) -> dict:
    """model + model_config -> JobSpec fields (ParamError naming the setting)."""
    if model != "blur":
        raise ParamError(f"model: {model[:40]!r} is not served here; only blur")
    if not (config.blur_face or config.enable_lp):
        raise ParamError("model_config: blur_face and enable_lp are both false: nothing to blur")
    fields: dict = {"method": "blur", "face": config.blur_face, "license_plate": config.enable_lp}
    if config.blur_threshold is not None:
        fields["face_threshold"] = fields["license_plate_threshold"] = config.blur_threshold
    if config.slicing is not None:
        fields["format"] = {"number": [2, 2], "overlap": [0.2, 0.2]} if config.slicing else "whole"
    if config.mask_blur is not None:
        start = {True: 0.3, False: 0.0}.get(config.mask_blur, config.mask_blur)
        if not 0.0 <= float(start) <= 1.0:
            raise ParamError("model_config.mask_blur: true, false or a number 0..1")
        fields["face_anonymization_gradient_start"] = fields["license_plate_anonymization_gradient_start"] = start
    return fields


def syntonym_key(request: Request, key: str | None = Security(_key)) -> ApiKey:
    service = get_service(request)
    try:
        api_key = service.auth.api_key(key)
    except AuthError as exc:
        raise SyntonymError(401, str(exc), "INVALID_API_KEY" if key else "MISSING_API_KEY") from None
    service.limiter.guard("key:" + api_key.account, lambda e: SyntonymError(429, str(e), "RATE_LIMITED", e.headers))
    return api_key


SyntonymKey = Annotated[ApiKey, Security(syntonym_key)]


def _file_name(name: str, kinds: tuple[str, ...]) -> str:
    try:
        rel = safe_rel_path(name)
    except UnsafePath as exc:
        raise SyntonymError(422, f"file_name: {exc}") from None
    if "/" in rel or len(rel) > 255:
        raise SyntonymError(422, f"file_name: {name[:80]!r} must be a file name of at most 255 characters, not a path")
    if kind_of(rel) not in kinds:
        allowed = "an image" + (", a video" if "video" in kinds else "") + (
            ", or a zip, 7z or rar archive" if "archive" in kinds else "")
        raise SyntonymError(422, f"file_name: {rel!r} is not {allowed} (by its extension)")
    return rel


async def _create(request: Request, key: ApiKey, model: str, config: ModelConfig, files: list[str]) -> dict:
    service = get_service(request)
    try:
        fields = spec_fields(model, config)
        return await run_in_threadpool(service.jobs.create, API, key.user, key, fields, files,
                                       service.base_url(request))
    except (ParamError, SpecError) as exc:
        raise SyntonymError(422, str(exc)) from None


def _load(request: Request, job_id: str, key: ApiKey | None = None) -> dict:
    try:
        return get_service(request).jobs.load(job_id, owner=key.user if key else None, api=API)
    except JobNotFound:
        raise SyntonymError(404, f"job {job_id[:64]!r} not found") from None


def _summary(doc: dict, **extra) -> dict:
    return {"job_id": doc["job_id"], "job_status": doc["status"], "job_status_description": doc.get("description", ""),
            "job_quoted_credit_cost": (doc.get("quote") or {}).get("credits"), "files": doc["service"]["files"],
            **extra}


@router.post("/direct_upload/{file_name}", summary="Upload one image as a job",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def direct_upload(request: Request, file_name: str, key: SyntonymKey,
                        model: str = Query("blur", max_length=40),
                        model_config: str | None = Query(None, max_length=2000, description="ModelConfig as JSON")
                        ) -> dict:
    service = get_service(request)
    name = _file_name(file_name, ("image",))
    try:
        config = ModelConfig.model_validate(json.loads(model_config or "{}"))
    except ValidationError as exc:
        raise SyntonymError(422, "; ".join(f"model_config.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in exc.errors())) from None
    except ValueError:
        raise SyntonymError(422, "model_config: not valid JSON") from None
    try:
        body = await read_capped(request, service.config.max_upload_bytes)
    except UploadTooLarge as exc:
        raise SyntonymError(413, str(exc)) from None
    if sniff_format(body[:16]) is None:
        raise SyntonymError(415, "the body is not a JPEG, PNG, BMP, WebP or TIFF image")
    doc = await _create(request, key, model, config, [name])
    url = join(service.config.storage, service.jobs.upload_object(doc["job_id"], name))
    await run_in_threadpool(write_atomic, url, body, service.config.storage_options)
    return _summary(await run_in_threadpool(service.jobs.refresh, doc))


@router.post("/create_upload_session", summary="Make a job of several files: images and archives",
             response_description="the job, with an upload URL (PUT) per file")
async def create_upload_session(request: Request, session: UploadSession,
                                key: SyntonymKey) -> dict:
    service = get_service(request)
    names = [_file_name(n, ("image", "video", "archive")) for n in session.file_names]
    if len(set(names)) != len(names):
        raise SyntonymError(422, "file_names: a name is given more than once")
    doc = await _create(request, key, session.model, session.blur_config, names)
    job_id, base = doc["job_id"], service.base_url(request)
    expires = int(time.time()) + service.config.upload_ttl_s
    urls = [{"file_name": n, "method": "PUT", "expires_at": iso(expires),
             "upload_url": service.links.link(base, f"/syntonym/upload/{job_id}/{n}",
                                              service.jobs.upload_object(job_id, n), "PUT", expires)} for n in names]
    return _summary(doc, upload_urls=urls)


@router.put("/upload/{job_id}/{file_name}", summary="The upload URL of a session's file (signed; no other "
            "credentials)", openapi_extra={"parameters": _link_params})
async def upload(request: Request, job_id: str, file_name: str) -> dict:
    service = get_service(request)
    verify_link(request, "PUT", SyntonymError)
    doc = await run_in_threadpool(_load, request, job_id)
    if doc["status"] != "new" or file_name not in doc["service"]["files"]:
        raise SyntonymError(409, f"job {job_id} takes no upload of {file_name[:80]!r} now ({doc['status']})")
    archive = kind_of(file_name) == "archive"
    limit = service.config.max_archive_upload_bytes if archive else service.config.max_upload_bytes
    url = join(service.config.storage, service.jobs.upload_object(job_id, file_name))
    try:
        size = await receive_file(request, url, limit, service.config.storage, service.config.storage_options)
    except UploadTooLarge as exc:
        raise SyntonymError(413, str(exc)) from None
    doc = await run_in_threadpool(service.jobs.refresh, doc)
    return _summary(doc, file_name=file_name, size=size)


@router.post("/notify_on_job_status", summary="POST the JobReport to callback_url when the job ends")
async def notify_on_job_status(request: Request, body: Callback, key: SyntonymKey) -> dict:
    service = get_service(request)
    parts = urlsplit(body.callback_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SyntonymError(422, "callback_url: an http:// or https:// URL is expected")
    try:
        check_webhook_host("callback_url", body.callback_url, service.config.webhook_hosts)
    except ParamError as exc:
        raise SyntonymError(422, str(exc)) from None
    doc = await run_in_threadpool(_load, request, body.job_id, key)
    return await run_in_threadpool(service.jobs.set_callback, doc, body.callback_url)


@router.post("/approve_job/{job_id}", summary="Approve the job's quote: it starts",
             responses={201: {"description": "no approval needed"}, 202: {"description": "already approved"},
                        302: {"description": "not ready: uploads missing"},
                        402: {"description": "the quote is over the API key's balance"}})
async def approve_job(request: Request, job_id: str, key: SyntonymKey) -> JSONResponse:
    service = get_service(request)
    doc = await run_in_threadpool(_load, request, job_id, key)
    try:
        outcome, doc = await run_in_threadpool(service.jobs.approve, doc)
    except InsufficientCredits as exc:
        raise SyntonymError(402, str(exc)) from None
    except JobNotFound:
        raise SyntonymError(404, f"job {job_id} was deleted") from None
    status, message = APPROVAL[outcome]
    headers = {"Location": f"/syntonym/get_job_result/{job_id}"} if status == 302 else None
    return JSONResponse(_summary(doc, message=message), status_code=status, headers=headers)


@router.get("/get_job_result/{job_id}", summary="The JobReport: status, credits, tasks with download links")
async def get_job_result(request: Request, job_id: str, key: SyntonymKey) -> dict:
    service = get_service(request)
    doc = await run_in_threadpool(_load, request, job_id, key)
    doc = await run_in_threadpool(service.jobs.refresh, doc)  # presigned S3 uploads are noticed here
    return await run_in_threadpool(service.jobs.result, doc, service.base_url(request))


@router.delete("/delete_job/{job_id}", summary="Delete the job's outputs and uploads")
async def delete_job(request: Request, job_id: str, key: SyntonymKey) -> dict:
    service = get_service(request)
    doc = await run_in_threadpool(_load, request, job_id, key)
    try:
        doc = await run_in_threadpool(service.jobs.delete, doc)
    except JobBusy as exc:
        raise SyntonymError(409, str(exc)) from None
    return _summary(doc)


@router.get("/get_credit_balance", summary="The API key's credits: balance, used, reserved, available")
async def get_credit_balance(request: Request, key: SyntonymKey) -> dict:
    return await run_in_threadpool(get_service(request).accounts.balance, key.account, key.credits)


@router.get("/download/{path:path}", summary="A download URL of a job's output (signed; no other credentials)",
            response_class=Response, openapi_extra={"parameters": _link_params})
async def download(request: Request, path: str) -> Response:
    return await download_response(request, DOWNLOAD, "jobs/", SyntonymError)
