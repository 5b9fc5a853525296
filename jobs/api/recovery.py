"""What a replica takes over from replicas that stopped: a sweep at start-up and every `requeue_after_s`.

* Image tasks (Celantur v1 /v1/file, container `x-is-async`, v2 uploads) run in the replica that
  queued them, in memory: when it stops, its waiting tasks are dropped and the one in progress
  may be cut short, and their task.json stays `queued` / `processing`. A sweep re-queues every task
  of the storage in one of those states whose task.json has not changed for `requeue_after_s`
  (its `updated`), except the ones this replica is working on. A task that waits longer than that
  in a live replica's queue, or takes longer than that to process, is taken up a second time: the
  outputs are the same, its webhook may be called twice. `requeue_after_s` 0 turns it off.
* Syntonym jobs submitted to a Ray cluster (ray_jobs.py) that nobody has settled are followed by
  this replica until they end, so their credits are charged and their callback is called even when
  the replica that submitted them is gone.

The sweep reads every task.json (and lists every job's ray.json): fine for tens of thousands of tasks
every ten minutes; a larger service wants an index of the unfinished ones next to them.

Several replicas sweep the same storage: a stale task is claimed first, by creating a marker named
after its `updated` exclusively (`claim`), so one replica takes it up; the same marker settles a
Ray job once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from datetime import datetime
from typing import Protocol

from jobs.api.params import ParamError
from jobs.api.tasks import TaskNotFound, TaskStore
from jobs.report import now_iso
from jobs.spec import JobSpec
from operators.rows import FailureCause
from operators.storage import LOCAL_PROTOCOLS, filesystem

log = logging.getLogger("veil.serve")

STRANDED = ("queued", "processing")


def claim(url: str, storage_options: dict | None = None, content: dict | None = None) -> bool:
    """Create `url` only if it does not exist; True for the one caller that created it.

    Exclusive on a local disk (O_EXCL) and on S3 (a conditional PUT, If-None-Match; AWS and moto
    honour it). A filesystem without exclusive creation gets check-then-write: two callers at the
    same instant may both win there."""
    body = json.dumps({"at": now_iso(), **(content or {})}).encode()
    fs, path = filesystem(url, storage_options)
    if fs.protocol in LOCAL_PROTOCOLS or "file" in fs.protocol:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with fs.open(path, "xb") as f:
            f.write(body)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # no "x" mode here
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        if fs.exists(path):
            return False
        fs.pipe_file(path, body)
        return True


class TaskQueue(Protocol):
    """What a sweep uses of the replica's image tasks (service.Service): its queue."""

    mine: set[str]  # the tasks this replica has queued or is processing

    def take_slot(self) -> bool: ...
    def release_slot(self) -> None: ...
    def queue(self, doc: dict, spec: JobSpec) -> None: ...
    def task_spec(self, doc: dict) -> JobSpec: ...
    def fail(self, doc: dict, cause: str, error: str) -> dict: ...


class RayFollower(Protocol):
    """What a sweep uses of the Syntonym jobs on a Ray cluster (ray_jobs.RayJobs)."""

    def unsettled(self) -> list[str]: ...
    def watch(self, job_id: str) -> None: ...


class Recovery:
    def __init__(self, requeue_after_s: float, store: TaskStore, tasks: TaskQueue, ray: RayFollower | None):
        self.store, self.tasks, self.ray = store, tasks, ray
        self.after = max(0, int(requeue_after_s))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Sweep now, then every `requeue_after_s` (10 min when only Ray jobs are followed)."""
        if self.after or self.ray is not None:
            self._thread = threading.Thread(target=self._loop, name="veil-recovery", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # a storage hiccup: the next sweep tries again
                log.exception("recovery sweep failed")
            if self._stop.wait(self.after or 600):
                return

    def sweep(self) -> dict:
        """One pass: {"requeued": task ids, "followed": job ids}."""
        requeued = [doc["id"] for doc in self.stale_tasks() if self.requeue(doc)] if self.after else []
        followed = []
        ray = self.ray
        if ray is not None:
            for job_id in ray.unsettled():
                ray.watch(job_id)
                followed.append(job_id)
        if requeued or followed:
            log.info("recovery: re-queued %d task(s), following %d Ray job(s)", len(requeued), len(followed))
        return {"requeued": requeued, "followed": followed}

    def stale_tasks(self) -> list[dict]:
        """Tasks left queued / processing for `requeue_after_s` by a replica that is not this one."""
        store = self.store
        fs, root = filesystem(store.root, store.storage_options)
        fs.invalidate_cache(root)
        paths = fs.glob(root.rstrip("/") + "/*/task.json") if fs.exists(root) else []
        cutoff = time.time() - self.after
        out = []
        for path in paths:
            try:
                doc = json.loads(fs.cat_file(path))
                stale = datetime.fromisoformat(doc["updated"]).timestamp() < cutoff
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being replaced or deleted right now
            if doc.get("task_status") in STRANDED and stale and doc.get("file") and doc["id"] not in self.tasks.mine:
                out.append(doc)
        return out

    def requeue(self, doc: dict) -> bool:
        """Queue a stranded task on this replica, if this replica claims it first."""
        tasks, store = self.tasks, self.store
        if not tasks.take_slot():
            return False  # this replica's queue is full: the next sweep tries again
        stamp = re.sub(r"\D", "", doc["updated"])
        try:
            if not claim(store.url(doc["id"], f"claims/requeue-{stamp}"), store.storage_options):
                tasks.release_slot()
                return False
            doc = store.load(doc["id"])
            if doc.get("task_status") not in STRANDED:
                tasks.release_slot()
                return False
            spec = tasks.task_spec(doc)
        except TaskNotFound:
            tasks.release_slot()
            return False
        except ParamError as exc:  # its parameters are no longer taken here
            tasks.release_slot()
            tasks.fail(doc, FailureCause.PARAMETER_ERROR_FORMAT, str(exc))
            return False
        doc["requeued"] = int(doc.get("requeued") or 0) + 1  # the caller can see it was taken up again
        log.info("task %s: %s since %s, re-queued", doc["id"], doc["task_status"], doc["updated"])
        tasks.queue(doc, spec)
        return True
