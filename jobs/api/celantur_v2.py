"""Celantur API v2: make a task, upload its image to the URL it comes with, poll it for download URLs.

    POST /v2/task?method=blur&face=true     -> task JSON, `new`, with `upload_url` (PUT the image there)
    PUT  <upload_url>                       the image (JPEG or PNG); processing starts (queued -> processing -> done)
    GET  /v2/task?page=1&limit=20           {total_item_count, total_page_count, items}
    GET  /v2/task/{id}/status               task JSON, with fresh expiring URLs of its outputs
                                            (`anonymized_url`, `binary_mask_url`, `instance_mask_url`,
                                            `metadata_url`, `original_url`), or of its upload while `new`

The upload and download URLs are presigned S3 URLs when the service's storage is S3 (the bytes go
straight to and from the bucket), otherwise this service's `/v2/upload/{id}` and `/v2/download/...`
signed with an expiry (links.py). After a PUT to a presigned S3 URL, the next `GET .../status` finds
the object and starts the task (the PUT itself never reaches the service). An upload that is not a
JPEG or PNG by its content (or not what its Content-Type says) ends the task `failed` with
CONTENT_TYPE_ERROR and is deleted; an upload window that closes empty ends it TASK_FILE_DOESNT_EXIST.

Credentials: Celantur's access token from `POST /v1/signin`, as on v1; the upload and download
URLs carry their own signature instead. Errors: `{"code": "...", "message": "..."}`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import APIKeyHeader

from jobs.api.celantur_v1 import IMAGE_BODY, NAME_PARAM
from jobs.api.errors import CelanturV2Error
from jobs.api.params import ParamError, openapi_parameters, task_query
from jobs.api.service import (
    UPLOAD,
    Busy,
    UploadTooLarge,
    download_response,
    get_service,
    iso,
    read_capped,
    verify_link,
)
from jobs.api.tasks import OUTPUTS, TaskNotFound, public

API = "celantur-v2"
DOWNLOAD = "/v2/download/"
router = APIRouter(tags=["Celantur v2"])
_token = APIKeyHeader(name="Authorization", auto_error=False, scheme_name="CelanturToken",
                      description="the AccessToken from POST /v1/signin, bare or as `Bearer <token>`")
_link_params = [{"name": n, "in": "query", "required": True, "schema": {"type": "string"}} for n in ("expires",
                                                                                                  "signature")]


def v2_user(request: Request, token: str | None = Security(_token)) -> str:
    return get_service(request).signed_in(
        token, lambda status, message, headers: CelanturV2Error(status, message, headers=headers))


def _load(request: Request, task_id: str, user: str | None = None) -> dict:
    try:
        return get_service(request).store.load(task_id, owner=user, api=API)
    except TaskNotFound:
        raise CelanturV2Error(404, f"task {task_id[:64]!r} not found") from None


def _view(request: Request, doc: dict) -> dict:
    """The task as v2 shows it: with the URLs that apply now, each valid `link_ttl_s` (the upload's
    until its window closes)."""
    service, out, task_id = get_service(request), public(doc), doc["id"]
    base = service.base_url(request)
    if doc["task_status"] == "new":
        out["upload_url"] = service.links.link(base, f"/v2/upload/{task_id}", f"tasks/{task_id}/{UPLOAD}", "PUT",
                                               doc["upload_expires"])
        return out
    expires = int(time.time()) + service.config.link_ttl_s
    for kind in doc.get("outputs") or []:
        relative = f"tasks/{task_id}/{OUTPUTS[kind].format(file=doc['file'])}"
        out[f"{kind.replace('-', '_')}_url"] = service.links.link(base, DOWNLOAD + relative, relative, "GET", expires)
    out["urls_expire_at"] = iso(expires)
    return out


@router.post("/v2/task", summary="Make a task; upload its image to the upload_url it answers with",
             openapi_extra={"parameters": openapi_parameters([NAME_PARAM])})
async def create_task(request: Request, user: str = Security(v2_user)) -> dict:
    try:
        params, name, _ = task_query(list(request.query_params.multi_items()))
        doc = await run_in_threadpool(get_service(request).new_upload_task, API, user, params, name)
    except ParamError as exc:
        raise CelanturV2Error(422, str(exc), "PARAMETER_ERROR_FORMAT") from None
    return _view(request, doc)


@router.put("/v2/upload/{task_id}", summary="The upload URL of a task (signed; no other credentials)",
            openapi_extra={"parameters": _link_params, "requestBody": IMAGE_BODY})
async def upload(request: Request, task_id: str) -> dict:
    service = get_service(request)
    verify_link(request, "PUT", CelanturV2Error)
    doc = await run_in_threadpool(_load, request, task_id)
    if doc["task_status"] != "new":
        raise CelanturV2Error(409, f"task {task_id} already has its upload ({doc['task_status']})")
    try:
        body = await read_capped(request, service.config.max_upload_bytes)
    except UploadTooLarge as exc:
        raise CelanturV2Error(413, str(exc)) from None
    await run_in_threadpool(service.store.put, task_id, UPLOAD, body)
    try:
        doc = await run_in_threadpool(service.check_upload, doc, request.headers.get("content-type", ""))
    except Busy as exc:
        await run_in_threadpool(service.store.delete_file, task_id, UPLOAD)  # the caller may PUT it again
        raise CelanturV2Error(503, str(exc), headers={"Retry-After": "5"}) from None
    return _view(request, doc)


@router.get("/v2/task", summary="The caller's tasks, newest first")
async def list_tasks(request: Request, page: int = Query(1, ge=1, le=1_000_000),
                     limit: int = Query(20, ge=1, le=1000), user: str = Security(v2_user)) -> dict:
    return await run_in_threadpool(get_service(request).store.list, user, API, page, limit)


@router.get("/v2/task/{task_id}/status", summary="The task, with expiring URLs of its outputs (or its upload)")
async def task_status(request: Request, task_id: str, user: str = Security(v2_user)) -> dict:
    service = get_service(request)
    doc = await run_in_threadpool(_load, request, task_id, user)
    if doc["task_status"] == "new":  # a presigned S3 upload is found here
        try:
            doc = await run_in_threadpool(service.check_upload, doc)
        except Busy:
            pass  # stays new; the next poll tries again
    return _view(request, doc)


@router.get(DOWNLOAD + "{path:path}", summary="A download URL of a task's output (signed; no other credentials)",
            response_class=Response, openapi_extra={"parameters": _link_params})
async def download(request: Request, path: str) -> Response:
    return await download_response(request, DOWNLOAD, "tasks/", CelanturV2Error)
