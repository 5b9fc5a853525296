"""Celantur's container in REST mode: one call per image, synchronous unless asked otherwise.

    POST   /task?method=blur&face=true     body: the image -> task JSON when done (`x-is-async: true`: at once, queued)
    GET    /task/{id}                      task JSON
    GET    /task/{id}/anonymized | binary-mask | instance-mask | metadata | original
    DELETE /task/{id}                      the task and its files
    DELETE /task/lists                     every task of the caller

Same query parameters as Celantur v1's /v1/file, plus the container's video flags. The body is an
image (image/jpeg, image/png) or, as the container takes them, a video (video/mp4, video/quicktime,
video/x-matroska, video/webm, video/x-msvideo): it runs through operators/video.py as a job's
video does (tracking, encoding, audio kept); `no-object-tracking=true` is `--no-tracking`,
`keep-bit-rate=true` is `--keep-bit-rate`; /anonymized is the video, /metadata its boxes frame by
frame; `save-mask` is refused for a video (422). The flags are recorded in the task and change
nothing for an image. Authentication is Celantur's access token, as on v1.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Security
from fastapi.concurrency import run_in_threadpool

from jobs.api.celantur_v1 import (
    NAME_PARAM,
    add_output_routes,
    celantur_user,
    load_task,
    upload_task,
)
from jobs.api.errors import ApiError
from jobs.api.params import ParamError, openapi_parameters
from jobs.api.service import MEDIA, VIDEO_TYPES, Busy, get_service
from jobs.api.tasks import public

API = "celantur-container"
VIDEO_FLAGS = ("no-object-tracking", "keep-bit-rate")
TRUTH = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
router = APIRouter(tags=["Celantur container"])

_video_params = [{"name": f, "in": "query", "required": False, "schema": {"type": "boolean"},
                  "description": "video only (recorded, ignored for images)"} for f in VIDEO_FLAGS]
MEDIA_BODY = {"required": True, "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                            for t in ("image/jpeg", "image/png", *VIDEO_TYPES)}}
_async_header = {"name": "x-is-async", "in": "header", "required": False, "schema": {"type": "boolean"},
                 "description": "true: answer at once with the queued task; poll GET /task/{id}"}


def _video_options(given: dict[str, str]) -> dict:
    options = {}
    for name, value in given.items():
        if value.strip().lower() not in TRUTH:
            raise ParamError(f"{name}: must be true or false, got {value[:20]!r}")
        options[name] = TRUTH[value.strip().lower()]
    return {"video_options": options} if options else {}


@router.post("/task", summary="Anonymize one image or video (synchronous unless x-is-async: true)",
             openapi_extra={"parameters": openapi_parameters([NAME_PARAM, *_video_params, _async_header]),
                            "requestBody": MEDIA_BODY})
async def create_task(request: Request, user: str = Security(celantur_user)) -> dict:
    flag = request.headers.get("x-is-async", "false").strip().lower()
    if flag not in TRUTH:
        raise ApiError(422, f"x-is-async: must be true or false, got {flag[:20]!r}")
    doc, spec = await upload_task(request, user, API, VIDEO_FLAGS, _video_options, MEDIA)
    service = get_service(request)
    if TRUTH[flag]:
        try:
            doc = await run_in_threadpool(service.enqueue, doc, spec)
        except Busy as exc:
            raise ApiError(503, str(exc), {"Retry-After": "5"}) from None
    else:
        doc = await service.run_now(doc, spec)
    return public(doc)


@router.delete("/task/lists", summary="Delete every task of the caller")
async def delete_all(request: Request, user: str = Security(celantur_user)) -> dict:
    service = get_service(request)
    deleted, busy = [], []
    page = await run_in_threadpool(service.store.list, user, API, 1, 10**9)
    for item in page["items"]:
        if item["task_status"] == "processing":
            busy.append(item["id"])  # finishing now: delete it once done
            continue
        await run_in_threadpool(service.store.delete, item["id"])
        deleted.append(item["id"])
    return {"deleted": deleted, "deleted_count": len(deleted), "not_deleted_processing": busy}


@router.get("/task/{task_id}", summary="The task: status, parameters, detections")
async def get_task(request: Request, task_id: str, user: str = Security(celantur_user)) -> dict:
    return public(await run_in_threadpool(load_task, request, task_id, user, API))


@router.delete("/task/{task_id}", summary="Delete the task and its files")
async def delete_task(request: Request, task_id: str, user: str = Security(celantur_user)) -> dict:
    doc = await run_in_threadpool(load_task, request, task_id, user, API)
    if doc["task_status"] == "processing":
        raise ApiError(409, f"task {task_id} is processing; delete it when it is done")
    return await run_in_threadpool(get_service(request).delete, doc)


add_output_routes(router, "/task", API, "container")
