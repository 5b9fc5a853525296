"""Syntonym jobs on a Ray cluster (`veil serve --ray-address ADDR`): submitted through the Ray Jobs API
as `veil submit` submits them, then followed and settled through the storage.

    STORAGE/jobs/<id>/service.json    whose job it is (service_jobs writes it at creation)
    STORAGE/jobs/<id>/ray.json        the latest submission: attempt, submission id, state, who approved
    STORAGE/jobs/<id>/settled-<n>     created once, exclusively, by whoever settles attempt n

Why the Jobs API (`jobs.submit.submit`: submission id `veil-<id>`, `veil-<id>-<n>` for attempt n > 1,
this code shipped as working_dir) rather than a Ray task calling `jobs.run.run_job` from the server: the
job's driver then lives on the cluster, not in the replica, so a replica that stops (a deploy, a crash,
a scale-down) takes no job with it and any replica can follow the job from the storage; and the job is
an ordinary `veil run --job-id ID --spec-json '{...}' --approve -- UPLOADS STORAGE/jobs`, so `ray job logs veil-<id>`,
`veil cancel <id>` and `veil status <id> --output STORAGE/jobs` work on it. A Ray task would need a Ray
driver connection in every replica (`ray.init` inside a web server) and would die with that connection.
The address is the dashboard's (`http://head:8265`), as for `veil submit`.

The job writes job.json, the manifest and the outputs under STORAGE/jobs/<id>/ as `veil run` does
(run_job rewrites job.json without the service's part, hence service.json). Nothing is reported
back: the service sees a job end by reading job.json, in the watcher of the replica that submitted
it (every 2 s), on requests about it (get_job_result, approve_job, delete_job) and in every replica's
periodic sweep (recovery.py), which takes over jobs whose replica is gone. Whoever first sees it
ended settles it: a `done` job's credits are charged (credits.py replaces the job's one entry, so
two settlers charging the same amount charge it once), then `settled-<attempt>` is created
exclusively, and only its creator POSTs the callback. A driver that died without writing its end
(Ray says FAILED or STOPPED, or no longer knows the job) leaves the job failed or cancelled here;
approve_job resumes it as the next attempt (finished items are kept).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Protocol

from jobs.api.config import ServiceConfig
from jobs.api.credits import Accounts
from jobs.api.recovery import claim
from jobs.job_store import JobNotFound
from jobs.report import JobReport, now_iso
from jobs.spec import JobSpec
from jobs.submit import RayJobNotFound, latest_submission
from operators.storage import filesystem, join, read_bytes, write_atomic

log = logging.getLogger("veil.serve")

ENDED = ("done", "failed", "cancelled")
WATCH_EVERY_S = 2.0
UNKNOWN = object()  # the cluster did not answer: ask again later
# What a job.json still running says when Ray reports its driver gone, by Ray's final status.
DRIVER_GONE = {
    "STOPPED": ("cancelled", "the Ray job was stopped: approve_job resumes it"),
    "FAILED": ("failed", "the Ray job failed ({message}): approve_job resumes it"),
    "SUCCEEDED": ("failed", "the Ray job ended without finishing the job: approve_job resumes it"),
    None: ("failed", "the Ray cluster has no record of the job (restarted?): approve_job resumes it"),
}


def service_spec(spec: JobSpec, config: ServiceConfig) -> JobSpec:
    """The spec the cluster runs for a service job: the service's tighter image-size limit and its
    pricing file go with it, so the items are priced as the quote was. It travels whole, as JSON
    (jobs.submit.entrypoint), so every JobSpec field reaches the driver, whether `veil run` has a
    flag for it or not."""
    spec = spec.model_copy(update={"max_pixels": min(spec.max_pixels, config.max_pixels)})
    if config.pricing:
        spec = spec.model_copy(update={"pricing": os.path.abspath(config.pricing)})  # the driver's cwd is elsewhere
    return spec


class JobBook(Protocol):
    """What RayJobs uses of the service's jobs (service_jobs.ServiceJobs): their records and callbacks."""

    output: str  # STORAGE/jobs
    storage_options: dict

    def load(self, job_id: str) -> dict: ...
    def spec(self, doc: dict) -> JobSpec: ...
    def report(self, doc: dict) -> JobReport: ...
    def lock(self, job_id: str) -> threading.Lock: ...
    def notify(self, job_id: str) -> None: ...


class RayJobs:
    def __init__(self, jobs: JobBook, config: ServiceConfig, accounts: Accounts, hooks: ThreadPoolExecutor):
        self.jobs, self.config, self.accounts, self.hooks = jobs, config, accounts, hooks
        self.address = config.ray_address
        self.storage_options = jobs.storage_options
        self._client = None
        self._client_lock = threading.Lock()  # held while a client connects: never with _watch_lock
        self._watch_lock = threading.Lock()
        self._watched: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- records ---
    def _url(self, job_id: str, name: str) -> str:
        return join(self.jobs.output, job_id, name)

    def record(self, job_id: str) -> dict | None:
        """ray.json: the job's latest submission, or None when it was never submitted."""
        try:
            return json.loads(read_bytes(self._url(job_id, "ray.json"), self.storage_options))
        except FileNotFoundError:
            return None

    def _write(self, job_id: str, record: dict) -> None:
        write_atomic(self._url(job_id, "ray.json"), json.dumps(record).encode(), self.storage_options)

    def settled(self, job_id: str, record: dict | None = None) -> bool:
        """Whether the job's latest attempt was settled (by any replica)."""
        record = record if record is not None else self.record(job_id)
        if record is None:
            return False
        fs, path = filesystem(self._url(job_id, f"settled-{record['attempt']}"), self.storage_options)
        fs.invalidate_cache(path.rsplit("/", 1)[0])  # another replica may have made it since we listed
        return fs.exists(path)

    # --- submitting ---
    def submit(self, report: JobReport) -> None:
        """Submit the job (`queued` in job.json; called under its lock). A refused submission (the
        cluster unreachable, a spec it takes no more) leaves the job failed; approve_job retries it."""
        from jobs.submit import submit

        doc = report.doc
        job_id = doc["job_id"]
        earlier = self.record(job_id) or {}
        # written before the submission: a replica that stops right after it leaves a record that
        # lets another one recognise the Ray job as this attempt
        record = {"attempt": int(earlier.get("attempt", 0)) + 1, "submission_id": None,
                  "address": self.address, "state": "submitting", "at": now_iso(),
                  "approved_by": doc.get("approved_by") or earlier.get("approved_by")}
        self._write(job_id, record)
        try:
            spec = service_spec(self.jobs.spec(doc), self.config)
            _, record["submission_id"] = submit(self.address, spec, {"approve": True})
        except Exception as exc:
            log.warning("job %s: not submitted to %s: %s", job_id, self.address, exc)
            record["state"] = "refused"
            self._write(job_id, record)
            report.set("failed", f"not submitted to the Ray cluster: {type(exc).__name__}: {exc}"[:500],
                       finished_at=now_iso())
        else:
            record.update(state="submitted", submitted_at=now_iso())
            self._write(job_id, record)
            log.info("job %s: submitted to %s as %s (attempt %d)", job_id, self.address, record["submission_id"],
                     record["attempt"])
        self.watch(job_id)

    # --- following and settling ---
    def settle(self, doc: dict) -> dict:
        """The job's job.json, settled first if it ended (see the module doc); never charges or
        calls back twice for an attempt. The caller must not hold the job's lock."""
        job_id = doc["job_id"]
        if doc["status"] in ("new", "awaiting_approval", "deleted"):
            return doc
        with self.jobs.lock(job_id):
            record = self.record(job_id)
            if record is None or self.settled(job_id, record):
                return doc
            doc = self.jobs.load(job_id)  # as it is now, under the lock
            if doc["status"] not in ENDED:
                doc = self._check_driver(doc, record)
            if doc["status"] not in ENDED:
                return doc
            if record["state"] == "submitting" and (doc.get("finished_at") or "") < record["at"]:
                return doc  # an earlier attempt's end, read while this one is being submitted
            if doc["status"] == "done":
                self.accounts.charge(doc["service"]["account"], job_id, doc["credits"]["total"])
            won = claim(self._url(job_id, f"settled-{record['attempt']}"), self.storage_options,
                        {"status": doc["status"], "credits": doc["credits"]["total"] if doc["status"] == "done" else 0})
        if won:
            log.info("job %s: %s on the Ray cluster (attempt %d)", job_id, doc["status"], record["attempt"])
            self.hooks.submit(self.jobs.notify, job_id)
        return doc

    def _check_driver(self, doc: dict, record: dict) -> dict:
        """A job.json still queued/processing whose driver is gone is ended here, as Ray saw it end."""
        if record["state"] == "submitting" and _age_s(record["at"]) < 600:
            return doc  # being submitted (Ray may still hold the last attempt), or its replica stopped a moment ago
        info = self._info(doc["job_id"], record.get("submission_id"))
        if info is UNKNOWN or (info is not None and not info.status.is_terminal()):
            return doc
        doc = self.jobs.load(doc["job_id"])  # the driver's last write came before Ray saw it end
        if doc["status"] in (*ENDED, "deleted"):
            return doc
        status, why = DRIVER_GONE[None if info is None else info.status.value]
        message = getattr(info, "message", None) or "no message"
        self.jobs.report(doc).set(status, why.format(message=message[:1000]), finished_at=now_iso())
        return doc

    def _info(self, job_id: str, sid: str | None):
        """Ray's JobDetails of the attempt `sid` (None: the job's latest); None when the cluster has no
        such job; UNKNOWN when it did not answer."""
        try:
            with self._client_lock:
                if self._client is None:
                    from ray.job_submission import JobSubmissionClient

                    self._client = JobSubmissionClient(self.address)
                client = self._client
            return client.get_job_info(sid) if sid else latest_submission(client, job_id)
        except RayJobNotFound:
            return None
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                return None
            log.warning("job %s: Ray cluster at %s: %s", job_id, self.address, exc)
        except Exception as exc:  # unreachable now: the next look will tell
            log.warning("job %s: Ray cluster at %s unreachable: %s", job_id, self.address, exc)
            with self._client_lock:
                self._client = None
        return UNKNOWN

    def watch(self, job_id: str) -> None:
        """Follow the job until it is settled (a thread of this replica, every WATCH_EVERY_S)."""
        with self._watch_lock:
            self._watched.add(job_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="veil-ray-jobs", daemon=True)
                self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY_S):
            with self._watch_lock:
                watched = list(self._watched)
            for job_id in watched:
                try:
                    doc = self.settle(self.jobs.load(job_id))
                    finished = doc["status"] == "deleted" or self.settled(job_id)
                except JobNotFound:
                    finished = True
                except Exception:  # a storage hiccup: try again next round
                    log.exception("job %s: following it failed", job_id)
                    finished = False
                if finished:
                    with self._watch_lock:
                        self._watched.discard(job_id)

    def unsettled(self) -> list[str]:
        """Jobs of the storage submitted to Ray whose latest attempt nobody has settled."""
        fs, root = filesystem(self.jobs.output, self.storage_options)
        fs.invalidate_cache(root)
        found = fs.glob(root.rstrip("/") + "/*/ray.json") if fs.exists(root) else []
        out = []
        for path in found:
            job_id = path.rstrip("/").rsplit("/", 2)[-2]
            try:
                if not self.settled(job_id):
                    out.append(job_id)
            except (OSError, ValueError):
                continue  # being replaced right now: the next sweep sees it
        return out

    def close(self) -> None:
        """Stop following (the jobs go on on the cluster; another replica's sweep settles them)."""
        self._stop.set()


def _age_s(iso_time: str) -> float:
    return time.time() - datetime.fromisoformat(iso_time).timestamp()
