"""Celantur API v1: sign in, upload one image as a task, poll it, download its outputs, list tasks.

    POST /v1/signin                       {"username", "password"} -> {"AccessToken", "ExpiresIn", ...}
    POST /v1/file?method=blur&face=true   body: the image (image/jpeg | image/png) -> task JSON (queued)
    GET  /v1/file/{id}/status             task JSON
    GET  /v1/file/{id}/anonymized | binary-mask | instance-mask | metadata | original
    GET  /v1/list?page=1&limit=20         {total_item_count, total_page_count, items}

Every call but signin carries `Authorization: <AccessToken>` (or `Bearer <AccessToken>`). Tasks
belong to the user who uploaded them; another user's task id answers 404.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

from jobs.api.auth import AuthError
from jobs.api.errors import ApiError
from jobs.api.params import ParamError, openapi_parameters, task_query
from jobs.api.ratelimit import RateLimited, client_address
from jobs.api.service import CONTENT_TYPES, VIDEO_TYPES, Busy, UploadTooLarge, get_service, read_capped
from jobs.api.tasks import OUTPUTS, TaskNotFound, public
from jobs.spec import JobSpec

API = "celantur-v1"
router = APIRouter(tags=["Celantur v1"])

_token = APIKeyHeader(name="Authorization", auto_error=False, scheme_name="CelanturToken",
                      description="the AccessToken from POST /v1/signin, bare or as `Bearer <token>`")

NAME_PARAM = {"name": "name", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 255},
              "description": "a label for the task (shown in lists; never used as a path)"}
IMAGE_BODY = {"required": True, "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                            for t in ("image/jpeg", "image/png")}}
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "metadata": "application/json", "mask": "image/png",
               **{fmt: media for media, fmt in VIDEO_TYPES.items()}}


def celantur_user(request: Request, token: str | None = Security(_token)) -> str:
    """The signed-in user; 401 in Celantur's shape otherwise (also used by the container routes)."""
    return get_service(request).signed_in(token, ApiError)


class SignIn(BaseModel):
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)


@router.post("/v1/signin", summary="Exchange username and password for an access token")
async def signin(request: Request, body: SignIn) -> dict:
    service = get_service(request)
    try:  # scrypt: not on the loop
        user = await run_in_threadpool(service.auth_throttle.verify, service.auth, client_address(request),
                                       body.username, body.password)
    except RateLimited as exc:
        raise ApiError(429, str(exc), exc.headers) from None
    except AuthError as exc:
        raise ApiError(401, str(exc)) from None
    token, ttl = service.auth.issue_token(user)
    return {"AccessToken": token, "ExpiresIn": ttl, "TokenType": "Bearer"}


async def upload_task(request: Request, user: str, api: str, extra_params: tuple[str, ...] = (),
                      extra_fields: Callable[[dict[str, str]], dict] | None = None,
                      media: dict[str, str] = CONTENT_TYPES) -> tuple[dict, JobSpec]:
    """Shared by /v1/file and the container's /task: checks, stores the upload, returns (task, spec).
    `extra_params` are an API's own parameters; `extra_fields` turns them into task fields (or ParamError);
    `media`: the Content-Types taken (the container's include videos)."""
    service = get_service(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in media:
        raise ApiError(415, f"Content-Type must be one of {', '.join(sorted(set(media)))}, "
                            f"got {content_type or 'none'!r}")
    try:
        params, name, own = task_query(list(request.query_params.multi_items()), extra_params)
        extra = extra_fields(own) if extra_fields else {}
        if content_type in VIDEO_TYPES and params.get("save-mask"):
            raise ParamError("save-mask: masks are made for images; a video's boxes, frame by frame, "
                             "are in its metadata (save-metadata)")
        spec = await run_in_threadpool(service.image_spec, params, content_type)  # reads the model catalog
    except ParamError as exc:
        raise ApiError(422, str(exc)) from None
    try:
        body = await read_capped(request, service.config.max_upload_bytes)
    except UploadTooLarge as exc:
        raise ApiError(413, str(exc)) from None
    if not body:
        raise ApiError(422, "body: empty; send the image bytes as the request body")
    doc = await run_in_threadpool(service.new_image_task, api, user, spec, body, content_type, name, extra)
    return doc, spec


_upload_doc = {"parameters": openapi_parameters([NAME_PARAM]), "requestBody": IMAGE_BODY}


@router.post("/v1/file", summary="Upload one image; it is processed in the background", openapi_extra=_upload_doc)
async def upload_file(request: Request, user: str = Security(celantur_user)) -> dict:
    doc, spec = await upload_task(request, user, API)
    try:
        doc = await run_in_threadpool(get_service(request).enqueue, doc, spec)
    except Busy as exc:
        raise ApiError(503, str(exc), {"Retry-After": "5"}) from None
    return public(doc)


def load_task(request: Request, task_id: str, user: str, api: str) -> dict:
    try:
        return get_service(request).store.load(task_id, owner=user, api=api)
    except TaskNotFound:
        raise ApiError(404, f"task {task_id[:64]!r} not found") from None


@router.get("/v1/file/{task_id}/status", summary="The task: status, parameters, detections")
async def task_status(request: Request, task_id: str, user: str = Security(celantur_user)) -> dict:
    return public(await run_in_threadpool(load_task, request, task_id, user, API))


def output_response(request: Request, doc: dict, kind: str) -> Response:
    """One output's bytes with its media type; 404 while not made (or never asked for)."""
    try:
        data = get_service(request).store.output(doc, kind)
    except TaskNotFound:
        state = doc.get("task_status")
        why = "not asked for or not made" if state in ("done", "failed") else f"the task is {state}"
        raise ApiError(404, f"{kind} of task {doc['id']}: {why}") from None
    if kind == "metadata":
        media = MEDIA_TYPES["metadata"]
    elif kind.endswith("mask"):
        media = MEDIA_TYPES["mask"]
    else:
        media = MEDIA_TYPES.get(doc.get("format") or "", "application/octet-stream")
    return Response(data, media_type=media)


def add_output_routes(target: APIRouter, prefix: str, api: str, name: str) -> None:
    """GET PREFIX/{task_id}/<output> for each output of a task (v1 and the container share them)."""

    def route(kind: str):
        async def download(request: Request, task_id: str, user: str = Security(celantur_user)) -> Response:
            doc = await run_in_threadpool(load_task, request, task_id, user, api)
            return await run_in_threadpool(output_response, request, doc, kind)

        download.__name__ = f"{name}_{kind.replace('-', '_')}"  # OpenAPI operation ids stay unique
        return download

    for kind in OUTPUTS:
        target.add_api_route(f"{prefix}/{{task_id}}/{kind}", route(kind), methods=["GET"],
                             summary=f"The task's {kind.replace('-', ' ')}", response_class=Response)


add_output_routes(router, "/v1/file", API, "download")


@router.get("/v1/list", summary="The caller's tasks, newest first")
async def list_tasks(request: Request, page: int = Query(1, ge=1, le=1_000_000), limit: int = Query(20, ge=1, le=1000),
                     user: str = Security(celantur_user)) -> dict:
    return await run_in_threadpool(get_service(request).store.list, user, API, page, limit)
