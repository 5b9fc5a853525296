"""What every API shape shares: configuration, capped upload reading, and the life of an image task
(new -> [queued ->] processing -> done | failed) on the task store, the processor and the webhook.

Processing runs on a bounded thread pool, synchronous calls included (they wait for their turn,
ahead of queued asynchronous tasks), so a burst of requests cannot start more model runs than
`workers` at once; asynchronous calls beyond `max_queue` waiting tasks are refused with 503
instead of piling up in memory.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fastapi import Request

from jobs.api.auth import Auth
from jobs.api.params import build_task_spec, recorded
from jobs.api.pool import BACKGROUND, WAITING, PriorityPool
from jobs.api.processor import ImageProcessor, Processed
from jobs.api.tasks import DEFAULT_STORAGE, FILE_NAMES, OUTPUTS, TaskNotFound, TaskStore, public
from jobs.report import now_iso
from jobs.spec import JobSpec
from jobs.webhook import post_report
from operators.codecs import encode
from operators.storage import filesystem

log = logging.getLogger("veil.serve")

CONTENT_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}


@dataclass
class ServiceConfig:
    storage: str = DEFAULT_STORAGE
    storage_options: dict = field(default_factory=dict)
    users_file: str | None = None
    max_upload_bytes: int = 10 * 2**20  # Celantur / FaceBlurest routes
    workers: int = 2  # images processed at once by this replica
    max_queue: int = 64  # asynchronous tasks waiting in this replica before 503
    allow_url_fetch: bool = False  # FaceBlurest photo_url: the server would fetch any URL it is given
    webhook_hosts: tuple[str, ...] | None = None  # None: any host (the seed APIs' behaviour)
    device: str = "auto"
    max_pixels: int = 100_000_000
    warm_classes: tuple[str, ...] = ()  # classes whose models load at start-up


class UploadTooLarge(Exception):
    pass


class Busy(Exception):
    pass


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (never buffered past it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(f"the body is {int(declared)} bytes, over the {limit} byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise UploadTooLarge(f"the body passes the {limit} byte limit")
    return bytes(body)


class Service:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.auth = Auth.from_file(config.users_file)
        self.store = TaskStore(config.storage, config.storage_options)
        self.processor = ImageProcessor(config.device, max_pixels=config.max_pixels)
        self.pool = PriorityPool(config.workers)
        self.hooks = ThreadPoolExecutor(2, thread_name_prefix="veil-webhook")  # slow receivers never hold a worker
        self._waiting = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown()
        self.hooks.shutdown(wait=False, cancel_futures=True)

    # --- creating tasks ---
    def image_spec(self, params: dict[str, str], content_type: str) -> JobSpec:
        """The spec of a new task (its id is the spec's job id); ParamError for bad parameters.
        The file name comes from the declared content type; the content is checked (sniffed) when
        processed, so a PNG sent as image/jpeg ends `failed` with CONTENT_TYPE_ERROR, as in a job."""
        task_id = self.store.new_id()
        original = self.store.url(task_id, f"original/{FILE_NAMES[CONTENT_TYPES[content_type]]}")
        return build_task_spec(params, original, self.store.root, task_id, self.config.storage_options,
                               self.config.webhook_hosts)

    def new_image_task(self, api: str, owner: str, spec: JobSpec, body: bytes, content_type: str,
                       name: str | None = None, extra: dict | None = None) -> dict:
        """Store the upload and a `new` task.json."""
        task_id, file = spec.job_id, FILE_NAMES[CONTENT_TYPES[content_type]]
        now = now_iso()
        doc = {
            "id": task_id, "api": api, "owner": owner, "name": name or file, "task_status": "new",
            "failure_cause": None, "error": None, "created": now, "updated": now, "content_type": content_type,
            "file": file, "size": len(body), "width": None, "height": None,
            "anonymization_method": spec.method, "parameters": recorded(spec), "classes": spec.resolve_models()[0],
            "detections": {}, "detections_count": 0, "outputs": [], **(extra or {}),
        }
        self.store.put(task_id, f"original/{file}", body)
        self.store.save(doc)
        return doc

    # --- running them ---
    async def run_in_pool(self, fn, *args):
        """`fn(*args)` on the processing pool, awaited: bounded like every other model run."""
        return await asyncio.wrap_future(self.pool.submit(WAITING, fn, *args))

    async def run_now(self, doc: dict, spec: JobSpec) -> dict:
        """Process in the pool and wait for the result (a synchronous call)."""
        return await self.run_in_pool(self.process, doc, spec)

    def enqueue(self, doc: dict, spec: JobSpec) -> dict:
        """Queue for the pool and return at once (an asynchronous call); Busy past max_queue."""
        with self._lock:
            busy = self._waiting >= self.config.max_queue
            self._waiting += 0 if busy else 1
        if busy:
            self.store.delete(doc["id"])  # refused: keep no upload the caller was told we did not take
            raise Busy(f"{self.config.max_queue} tasks are waiting on this server; try again later")
        doc["task_status"] = "queued"
        self.store.save(doc)
        self.pool.submit(BACKGROUND, self._queued, doc["id"], spec)
        return doc

    def _queued(self, task_id: str, spec: JobSpec) -> None:
        with self._lock:
            self._waiting -= 1
        try:
            doc = self.store.load(task_id)
        except TaskNotFound:
            return  # deleted while it waited
        self.process(doc, spec)

    def process(self, doc: dict, spec: JobSpec) -> dict:
        """processing -> done | failed; never raises (a failure is the task's status)."""
        doc.update(task_status="processing", started=now_iso())
        self.store.save(doc)
        try:
            result = self.processor.process(spec, self.store.url(doc["id"], f"original/{doc['file']}"), doc["file"],
                                            self.store.folder(doc["id"]))
            if result.status == "done" and spec.save_mask:
                self._blank_masks(doc, spec, result)
            self._record(doc, spec, result)
        except Exception as exc:  # a model or storage failure fails the task, not the server
            log.exception("task %s failed", doc["id"])
            doc.update(task_status="failed", failure_cause="INTERNAL_ERROR", error=f"{type(exc).__name__}")
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


def get_service(request: Request) -> Service:
    return request.app.state.service


__all__ = ["Busy", "Service", "ServiceConfig", "UploadTooLarge", "get_service", "read_capped"]
