"""What every API shape shares: configuration (config.py), capped upload reading, expiring links, and the life of
an image task (new -> [queued ->] processing -> done | failed) on the task store, the processor and
the webhook. Jobs made through the API (Syntonym) live in service_jobs.

A task made without its image (Celantur v2) waits `new` for its upload URL to be used: the upload
is checked (size; content sniffed, and the declared type when there is one) and queued by the PUT
on this service's URL, or, when the URL was a presigned S3 one, by the next status request that
finds the object. Its spec is rebuilt from what task.json recorded, so any replica can run it.

Processing runs on a bounded thread pool, synchronous calls included (they wait for their turn,
ahead of queued asynchronous tasks), so a burst of requests cannot start more model runs than
`workers` at once; asynchronous calls beyond `max_queue` waiting tasks are refused with 503
instead of piling up in memory. A task left `queued` or `processing` by a replica that stopped is
taken up again by the next sweep of any replica (recovery.py).
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from jobs.api.auth import Auth, AuthError
from jobs.api.config import ServiceConfig  # re-exported: tests and app take it from here
from jobs.api.credits import Accounts
from jobs.api.links import LinkError, Links
from jobs.api.params import ParamError, build_task_spec, recorded
from jobs.api.pool import BACKGROUND, WAITING, PriorityPool
from jobs.api.processor import ImageProcessor, Processed
from jobs.api.ratelimit import AuthThrottle, RateLimiter
from jobs.api.recovery import Recovery
from jobs.api.service_jobs import ServiceJobs
from jobs.api.tasks import FILE_NAMES, OUTPUTS, TaskNotFound, TaskStore, public
from jobs.api.uploads import UploadTooLarge, read_capped  # re-exported: the routers take them from here
from jobs.report import iso, now_iso  # iso re-exported: the routers take it from here
from jobs.spec import JobSpec
from jobs.webhook import post_report
from operators.codecs import encode
from operators.items import UnsafePath, safe_rel_path, sniff_format
from operators.rows import FailureCause
from operators.storage import filesystem, join, read_bytes

log = logging.getLogger("veil.serve")

CONTENT_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}
VIDEO_TYPES = {"video/mp4": "mp4", "video/quicktime": "mov", "video/x-matroska": "mkv", "video/webm": "webm",
               "video/x-msvideo": "avi"}  # taken where an API shape takes videos (the Celantur container)
MEDIA = CONTENT_TYPES | VIDEO_TYPES
UPLOAD = "original/upload"  # where a v2 upload URL puts the image, until it is checked


class Busy(Exception):
    pass


class Service:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.auth = Auth.from_file(config.users_file)
        self.store = TaskStore(config.storage, config.storage_options)
        self.processor = ImageProcessor(config.device, max_pixels=config.max_pixels)
        self.pool = PriorityPool(config.workers)
        self.hooks = ThreadPoolExecutor(2, thread_name_prefix="veil-webhook")  # slow receivers never hold a worker
        self.links = Links(self.auth.link_key, config.storage_options, config.storage)
        self.accounts = Accounts(config.storage, config.storage_options)
        self.limiter = RateLimiter(config.rate_limit_per_minute)
        self.auth_throttle = AuthThrottle(  # failed password checks: see ratelimit.py
            config.auth_failures_per_user, config.auth_failures_per_address)
        self._waiting = 0
        self._lock = threading.Lock()
        self._task_locks = [threading.Lock() for _ in range(64)]  # striped: one upload check per task at a time
        self.mine: set[str] = set()  # tasks this replica has queued or is processing: never "stranded"
        # the parts, each handed what it uses (this object is the composition root, nothing reaches back into it)
        self.jobs = ServiceJobs(config, self.auth, self.accounts, self.processor, self.pool, self.hooks, self.links)
        self.recovery = Recovery(config.requeue_after_s, self.store, self, self.jobs.ray)

    def signed_in(self, token: str | None, error) -> str:
        """The user of a sign-in token (Celantur v1, container, v2), within the rate limit; else
        `error(status, message, headers)`, the calling API's own error, with 401 or 429."""
        try:
            user = self.auth.check_token(token)
        except AuthError as exc:
            raise error(401, str(exc), None) from None
        self.limiter.guard(user, lambda e: error(429, str(e), e.headers))
        return user

    def close(self) -> None:
        self.recovery.close()
        self.jobs.close()
        self.pool.shutdown()
        self.hooks.shutdown(wait=False, cancel_futures=True)

    # --- creating tasks ---
    def image_spec(self, params: dict[str, str], content_type: str) -> JobSpec:
        """The spec of a new task (its id is the spec's job id); ParamError for bad parameters.
        The file name comes from the declared content type; the content is checked (sniffed) when
        processed, so a PNG sent as image/jpeg ends `failed` with CONTENT_TYPE_ERROR, as in a job."""
        task_id = self.store.new_id()
        original = self.store.url(task_id, f"original/{FILE_NAMES[MEDIA[content_type]]}")
        return build_task_spec(params, original, self.store.root, task_id, self.config.storage_options,
                               self.config.webhook_hosts)

    def new_image_task(self, api: str, owner: str, spec: JobSpec, body: bytes, content_type: str,
                       name: str | None = None, extra: dict | None = None) -> dict:
        """Store the upload and a `new` task.json."""
        file = FILE_NAMES[MEDIA[content_type]]
        doc = self._task_doc(api, owner, spec, name or file,
                             {"content_type": content_type, "file": file, "size": len(body), **(extra or {})})
        self.store.put(doc["id"], f"original/{file}", body)
        self.store.save(doc)
        return doc

    def new_upload_task(self, api: str, owner: str, params: dict[str, str], name: str | None) -> dict:
        """A `new` task without its image, which will come through an upload URL (ParamError for bad
        parameters). The webhook's header value is sealed into task.json: the task may run on
        another replica, long after this request."""
        task_id = self.store.new_id()
        spec = build_task_spec(params, self.store.url(task_id, UPLOAD), self.store.root, task_id,
                               self.config.storage_options, self.config.webhook_hosts)
        deadline = int(time.time()) + self.config.upload_ttl_s
        doc = self._task_doc(api, owner, spec, name or "image",
                             {"content_type": None, "file": None, "size": None, "upload_expires": deadline,
                              "upload_expires_at": iso(deadline)})
        if spec.web_auth_header_value:
            doc["sealed_header_value"] = self.auth.seal(spec.web_auth_header_value)
        self.store.save(doc)
        return doc

    def _task_doc(self, api: str, owner: str, spec: JobSpec, name: str, fields: dict) -> dict:
        now = now_iso()
        return {
            "id": spec.job_id, "api": api, "owner": owner, "name": name, "task_status": "new",
            "failure_cause": None, "error": None, "created": now, "updated": now, "width": None, "height": None,
            "anonymization_method": spec.method, "parameters": recorded(spec), "classes": spec.resolve_models()[0],
            "detections": {}, "detections_count": 0, "outputs": [], **fields,
        }

    def task_spec(self, doc: dict) -> JobSpec:
        """A task's spec rebuilt from what it recorded (ParamError if this server no longer takes it)."""
        params = dict(doc["parameters"])
        if doc.get("sealed_header_value"):
            # None when sealed under another secret: the webhook then goes without its header
            params["web-auth-header-value"] = self.auth.unseal(doc["sealed_header_value"])
        original = self.store.url(doc["id"], f"original/{doc.get('file') or 'upload'}")
        return build_task_spec(params, original, self.store.root, doc["id"], self.config.storage_options,
                               self.config.webhook_hosts)

    # --- the upload of a v2 task ---
    def check_upload(self, doc: dict, declared: str | None = None) -> dict:
        """A `new` task whose upload is in the storage is checked and queued; one whose upload window
        closed with nothing uploaded fails TASK_FILE_DOESNT_EXIST; otherwise it stays `new`.
        `declared`: the Content-Type the upload came with (S3: the object's). Busy when the queue is
        full: the upload stays, and the next status request tries again."""
        with self._task_locks[int(doc["id"][:8], 16) % len(self._task_locks)]:
            doc = self.store.load(doc["id"])  # another request may have taken it meanwhile
            if doc["task_status"] != "new":
                return doc
            fs, path = filesystem(self.store.url(doc["id"], UPLOAD), self.config.storage_options)
            fs.invalidate_cache(path.rsplit("/", 1)[0])  # a presigned PUT went around this process's listing cache
            if not fs.exists(path):
                if time.time() > doc["upload_expires"]:
                    return self.fail(doc, FailureCause.TASK_FILE_DOESNT_EXIST,
                                     "nothing was uploaded before upload_expires_at")
                return doc
            info = fs.info(path)
            declared = (declared if declared is not None else str(info.get("ContentType") or ""))
            declared = declared.split(";")[0].strip().lower()
            if int(info["size"]) > self.config.max_upload_bytes:
                fs.rm(path)
                return self.fail(doc, FailureCause.TOO_LARGE, f"the upload is {info['size']} bytes, over the "
                                                   f"{self.config.max_upload_bytes} byte limit")
            found = sniff_format(fs.cat_file(path, start=0, end=16))
            # an image type declared must be the one found; other types (curl's form default, S3's
            # binary/octet-stream when a client sends none) say nothing about the content
            claimed = declared.startswith("image/")
            if found not in FILE_NAMES or (claimed and CONTENT_TYPES.get(declared) != found):
                fs.rm(path)  # refused: nothing of it is kept
                return self.fail(doc, FailureCause.CONTENT_TYPE_ERROR,
                                 f"the upload holds {found or 'no supported image'}"
                                 + (f", declared {declared}" if claimed else "") + "; JPEG or PNG expected")
            if not self.take_slot():
                raise Busy(f"{self.config.max_queue} tasks are waiting on this server; try again later")
            try:
                file = FILE_NAMES[found]
                doc.update(file=file, content_type=f"image/{found}", size=int(info["size"]))
                spec = self.task_spec(doc)
            except ParamError as exc:
                self.release_slot()
                return self.fail(doc, FailureCause.PARAMETER_ERROR_FORMAT, str(exc))
            fs.mv(path, filesystem(self.store.url(doc["id"], f"original/{file}"), self.config.storage_options)[1])
            self.queue(doc, spec)
            return doc

    def fail(self, doc: dict, cause: str, error: str) -> dict:
        """End a task `failed` before it was processed (its webhook is told, as for any ended task)."""
        doc.update(task_status="failed", failure_cause=cause, error=error, finished=now_iso())
        self.store.save(doc)
        try:
            spec = self.task_spec(doc)
        except ParamError:
            return doc
        if spec.webhook:
            self.hooks.submit(self._notify, doc["id"], spec)
        return doc

    # --- expiring links (links.py) ---
    def base_url(self, request: Request) -> str:
        return self.config.public_url or str(request.base_url)

    def signed_file(self, prefix: str, path: str) -> tuple[bytes, str]:
        """(bytes, media type) behind a verified download link: `path` is the route (`prefix` + the
        object's path under the storage root). TaskNotFound if the object is gone."""
        try:  # signed by us, so made from a safe path; checked again all the same
            relative = safe_rel_path(path[len(prefix):])
        except UnsafePath:
            raise TaskNotFound(path) from None
        try:
            data = read_bytes(join(self.config.storage, relative), self.config.storage_options)
        except FileNotFoundError:
            raise TaskNotFound(path) from None
        return data, mimetypes.guess_type(relative)[0] or "application/octet-stream"

    # --- running them ---
    async def run_in_pool(self, fn, *args):
        """`fn(*args)` on the processing pool, awaited: bounded like every other model run."""
        return await asyncio.wrap_future(self.pool.submit(WAITING, fn, *args))

    async def run_now(self, doc: dict, spec: JobSpec) -> dict:
        """Process in the pool and wait for the result (a synchronous call)."""
        return await self.run_in_pool(self.process, doc, spec)

    def enqueue(self, doc: dict, spec: JobSpec) -> dict:
        """Queue for the pool and return at once (an asynchronous call); Busy past max_queue."""
        if not self.take_slot():
            self.store.delete(doc["id"])  # refused: keep no upload the caller was told we did not take
            raise Busy(f"{self.config.max_queue} tasks are waiting on this server; try again later")
        self.queue(doc, spec)
        return doc

    def take_slot(self) -> bool:
        """A place in the queue of asynchronous tasks (False: max_queue are waiting); queue() uses it."""
        with self._lock:
            if self._waiting >= self.config.max_queue:
                return False
            self._waiting += 1
            return True

    def release_slot(self) -> None:
        with self._lock:
            self._waiting -= 1

    def queue(self, doc: dict, spec: JobSpec) -> None:
        """`queued`, and on the pool at background priority; the caller took a slot (take_slot)."""
        doc["task_status"] = "queued"
        self.mine.add(doc["id"])
        self.store.save(doc)
        self.pool.submit(BACKGROUND, self._queued, doc["id"], spec)

    def _queued(self, task_id: str, spec: JobSpec) -> None:
        self.release_slot()
        try:
            doc = self.store.load(task_id)
        except TaskNotFound:
            self.mine.discard(task_id)
            return  # deleted while it waited
        self.process(doc, spec)

    def process(self, doc: dict, spec: JobSpec) -> dict:
        """processing -> done | failed; never raises (a failure is the task's status)."""
        self.mine.add(doc["id"])
        try:
            return self._process(doc, spec)
        finally:
            self.mine.discard(doc["id"])

    def _process(self, doc: dict, spec: JobSpec) -> dict:
        doc.update(task_status="processing", started=now_iso())
        self.store.save(doc)
        spec = with_video_flags(spec, doc.get("video_options") or {})
        try:
            result = self.processor.process(spec, self.store.url(doc["id"], f"original/{doc['file']}"), doc["file"],
                                            self.store.folder(doc["id"]))
            if result.status == "done" and spec.save_mask:
                self._blank_masks(doc, spec, result)
            self._record(doc, spec, result)
        except Exception as exc:  # a model or storage failure fails the task, not the server
            log.exception("task %s failed", doc["id"])
            doc.update(task_status="failed", failure_cause=FailureCause.INTERNAL_ERROR, error=f"{type(exc).__name__}")
        doc["finished"] = now_iso()
        if not self.store.exists(doc["id"]):
            self.store.delete(doc["id"])  # deleted while it ran: leave none of its files behind
            return doc
        self.store.save(doc)
        if spec.webhook:
            self.hooks.submit(self._notify, doc["id"], spec)
        return doc

    def _record(self, doc: dict, spec: JobSpec, result: Processed) -> None:
        counts = result.counts()
        doc.update(task_status=result.status, failure_cause=result.failure_cause, error=result.error,
                   format=result.format, width=result.width, height=result.height,
                   detections=counts, detections_count=sum(counts.values()),
                   anonymized_count=int(np.sum(result.anonymised)))
        if result.frames is not None:
            doc["frames"] = result.frames
        doc["outputs"] = [kind for kind, rel in OUTPUTS.items() if self._exists(doc, rel)]

    def _exists(self, doc: dict, relative: str) -> bool:
        fs, path = filesystem(self.store.url(doc["id"], relative.format(file=doc["file"])),
                              self.config.storage_options)
        return fs.exists(path)

    def _blank_masks(self, doc: dict, spec: JobSpec, result: Processed) -> None:
        """A job writes masks only for images with detections; a caller who asked for a mask gets
        one anyway (all black: nothing anonymized), so the mask routes answer for every done task."""
        wanted = {"all": ("binary", "instance"), "binary": ("binary",), "instance": ("instance",)}[spec.save_mask]
        scale = spec.mask_scale / 100
        w, h = max(1, round(result.width * scale)), max(1, round(result.height * scale))
        for kind in wanted:
            rel = f"masks/{kind}/{doc['file']}.png"
            if not self._exists(doc, rel):
                blank = np.zeros((h, w) if kind == "binary" else (h, w, 3), np.uint8)
                self.store.put(doc["id"], rel, encode(blank, "png", compress_level=spec.compress_level))

    def _notify(self, task_id: str, spec: JobSpec) -> None:
        """POST the ended task to its webhook; the outcome (never the header value) goes into task.json."""
        try:
            doc = self.store.load(task_id)
        except TaskNotFound:
            return
        outcome = post_report(spec.webhook, public(doc), spec.web_auth_header_name, spec.web_auth_header_value)
        outcome["event"] = doc["task_status"]
        log.info("task %s webhook %s after %s attempt(s)", task_id, outcome["status"], outcome["attempts"])
        try:
            doc = self.store.load(task_id)
        except TaskNotFound:
            return
        doc["webhook"] = outcome
        self.store.save(doc)

    # --- reading and deleting ---
    def delete(self, doc: dict) -> dict:
        self.store.delete(doc["id"])
        return {**public(doc), "task_status": "deleted", "updated": now_iso()}


def with_video_flags(spec: JobSpec, flags: dict[str, bool]) -> JobSpec:
    """The spec with the Celantur container's video flags a task recorded (`no-object-tracking`,
    `keep-bit-rate`) applied; they change nothing for an image."""
    update = {}
    if "no-object-tracking" in flags:
        update["tracking"] = not flags["no-object-tracking"]
    if "keep-bit-rate" in flags:
        update["keep_bit_rate"] = flags["keep-bit-rate"]
    return spec.model_copy(update=update) if update else spec


def get_service(request: Request) -> Service:
    return request.app.state.service


def verify_link(request: Request, method: str, error: type[Exception]) -> None:
    """The request's own link signature checked (its path as routed, unquoted); a 403 in the
    API's shape (`error(status, message, code)`) when it does not open."""
    try:
        get_service(request).links.verify(method, request.scope["path"], request.query_params.get("expires"),
                                          request.query_params.get("signature"))
    except LinkError as exc:
        raise error(403, str(exc), exc.code) from None


async def download_response(request: Request, prefix: str, area: str, error: type[Exception]) -> Response:
    """A signed download route: the object under `area` (tasks/, jobs/) that the link names."""
    if not request.scope["path"].startswith(prefix + area):
        raise error(404, "not found", None)
    verify_link(request, "GET", error)
    try:
        data, media = await run_in_threadpool(get_service(request).signed_file, prefix, request.scope["path"])
    except TaskNotFound:
        raise error(404, "the file is gone (deleted)", None) from None
    return Response(data, media_type=media)


__all__ = ["Busy", "Service", "ServiceConfig", "UploadTooLarge", "download_response", "get_service", "iso",
           "read_capped", "verify_link"]
