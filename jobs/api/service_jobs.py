"""Jobs made through the API (Syntonym): uploads -> quote -> approval -> run -> report, charged once.

    STORAGE/uploads/<job_id>/<file name>     what the client uploaded: images, zip / 7z / rar archives
    STORAGE/jobs/<job_id>/job.json           the job report (jobs.report), as `veil status|report` read it
    STORAGE/jobs/<job_id>/manifest/ images/ masks/ metadata/    as in any veil job
    STORAGE/jobs/<job_id>/callback.json      notify_on_job_status: the URL, and the outcome of the POST
    STORAGE/jobs/<job_id>/service.json       whose job it is (also in job.json, which a Ray job rewrites)
    STORAGE/credits/<account>/<job_id>.json  the job's reservation, then its charge (credits.py)

Status: new (waiting for its uploads) -> awaiting_approval (quoted) -> queued -> processing -> done |
failed | cancelled; deleted. A job quoted under the auto-approve limit (the API key's, else the
server's, else the pricing table's; none: every job waits) and covered by the key's balance is
approved by itself.

Where the images are processed, and why not `jobs.run.run_job` on a local Ray: a service replica
already holds the models and a bounded pool of `workers` threads that every request shares; a Ray
session per replica would load the models a second time, compete with it for the same cores, and
run one job at a time (`ray_session` shuts Ray down when its job ends). So a job here goes through
`jobs.run.execute`, the path `veil run` takes (resume -> process -> finish), with the in-process
executor (`jobs.api.processor.InProcessExecutor`: the Ray pipeline's own stage functions on batches of
4 items, on the same pool at asynchronous priority, at most `workers` batches in flight) in place of
the Ray one. Archives are walked lazily (`operators.archives.expand_rows`, a generator: zip members
are read by ranged reads when their batch is prepared, members of solid blocks one at a time as the
walk reaches them), for the quote and for the run alike. What comes out is a veil job (manifest,
job.json, outputs); its totals and credits come from the manifest (`jobs.run.finish`), as for `veil run`.
With `ray_address` (`veil serve --ray-address`) none of this runs here: an approved job is submitted
to that Ray cluster as a `veil run` (ray_jobs.py), and settled when any replica sees it end.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

from jobs.api.auth import ApiKey, Auth
from jobs.api.config import ServiceConfig
from jobs.api.credits import Accounts, InsufficientCredits
from jobs.api.links import Links
from jobs.api.pool import PriorityPool
from jobs.api.processor import QUOTE_BYTES, ImageProcessor, InProcessExecutor, chunks
from jobs.api.ray_jobs import RayJobs
from jobs.api.tasks import TASK_ID
from jobs.job_store import JobBusy, JobNotFound, delete_job, syntonym_report
from jobs.pricing import load_pricing
from jobs.quote import quote_items
from jobs.report import JobReport, Totals, iso, now_iso, try_load_report
from jobs.run import execute
from jobs.spec import JobSpec, build_spec
from jobs.stage_options import archive_options, write_options
from jobs.webhook import post_report
from operators.archives import expand_rows
from operators.budget import Billing
from operators.listing import iter_sources
from operators.resume import resume_state
from operators.storage import filesystem, join, read_bytes, write_atomic

log = logging.getLogger("veil.serve")

ENDED = ("done", "failed", "cancelled")
QUOTE_ROWS = 64  # a quote holds this many listed rows at most (and QUOTE_BYTES: solid members carry bytes)


class ServiceJobs:
    def __init__(self, config: ServiceConfig, auth: Auth, accounts: Accounts, processor: ImageProcessor,
                 pool: PriorityPool, hooks: ThreadPoolExecutor, links: Links):
        self.config, self.auth, self.accounts, self.links = config, auth, accounts, links
        self.processor, self.pool, self.hooks = processor, pool, hooks  # the service's: shared with image tasks
        self.output = join(config.storage, "jobs")
        self.uploads = join(config.storage, "uploads")
        self.storage_options = config.storage_options
        self.pricing = load_pricing(config.pricing)
        limit = config.auto_approve_below
        self.auto_approve_below = limit if limit is not None else self.pricing.auto_approve_below
        self.runner = ThreadPoolExecutor(config.job_threads, thread_name_prefix="veil-job")
        self._locks = [threading.Lock() for _ in range(64)]  # striped: one state change per job at a time
        self._stopping = threading.Event()
        self._queued: dict[str, Future] = {}  # jobs this replica queued and has not finished
        self.ray = RayJobs(self, config, accounts, hooks) if config.ray_address else None  # where approved jobs run

    def close(self) -> None:
        """Running jobs end `cancelled` at their next batch; queued ones are marked so now: either
        way approve_job resumes them (on any replica)."""
        self._stopping.set()
        if self.ray is not None:
            self.ray.close()
        for job_id, future in list(self._queued.items()):
            if future.cancel():
                try:
                    self.report(self.load(job_id)).set("cancelled", "the server stopped before it started: "
                                                       "approve_job starts it", finished_at=now_iso())
                except (JobNotFound, OSError):
                    pass
        self.runner.shutdown(wait=False, cancel_futures=True)

    def lock(self, job_id: str) -> threading.Lock:
        """The job's lock in this replica (not reentrant: take it once)."""
        return self._locks[int(job_id[:8], 16) % len(self._locks)]

    # --- making and finding jobs ---
    def create(self, api: str, owner: str, key: ApiKey, fields: dict, files: list[str], base_url: str) -> dict:
        """A `new` job waiting for `files` (SpecError for bad fields)."""
        job_id = secrets.token_hex(16)
        spec = build_spec({**fields, "inputs": [join(self.uploads, job_id)], "output": self.output,
                           "job_id": job_id, "storage_options": self.storage_options})
        classes, _ = spec.resolve_models()
        report = JobReport(join(self.output, job_id), spec.public_dict(), self.storage_options)
        # base_url: where the links in a callback point when the server has no --public-url
        report.doc.update(classes=classes, service={"api": api, "owner": owner, "account": key.account,
                                                    "files": files, "base_url": base_url})
        write_atomic(join(self.output, job_id, "service.json"), json.dumps(report.doc["service"]).encode(),
                     self.storage_options)
        report.set("new", f"waiting for {len(files)} upload(s)")
        return report.doc

    def load(self, job_id: str, owner: str | None = None, api: str | None = None) -> dict:
        """job.json; JobNotFound for an id this service could not have made, or another owner's job."""
        if not isinstance(job_id, str) or not TASK_ID.fullmatch(job_id):
            raise JobNotFound(job_id)
        doc = try_load_report(join(self.output, job_id), self.storage_options)
        if doc is not None and "service" not in doc:  # run_job on a Ray cluster rewrote it without ours
            try:
                doc["service"] = json.loads(read_bytes(join(self.output, job_id, "service.json"),
                                                       self.storage_options))
            except FileNotFoundError:
                doc = None  # a job of the same output that this service did not make
        mine = doc is not None and (owner is None or doc["service"]["owner"] == owner) and (
            api is None or doc["service"]["api"] == api)
        if not mine:
            raise JobNotFound(job_id)
        return doc

    def spec(self, doc: dict) -> JobSpec:
        # job.json masks credential-like storage options: the server's own are put back
        return build_spec({**doc["spec"], "storage_options": self.storage_options})

    def report(self, doc: dict) -> JobReport:
        report = JobReport(doc["outputs"]["root"], doc["spec"], self.storage_options)
        report.doc = doc
        return report

    def upload_object(self, job_id: str, file: str) -> str:
        """The upload's path under the storage root."""
        return f"uploads/{job_id}/{file}"

    def key_of(self, doc: dict) -> ApiKey | None:
        """The API key entry the job is billed to (None once it left the users file)."""
        account = doc["service"]["account"]
        return next((k for k in self.auth.api_keys.values() if k.account == account), None)

    # --- uploads in, quote, approval ---
    def refresh(self, doc: dict) -> dict:
        """A `new` job whose uploads are all in the storage is quoted: `awaiting_approval`, or queued
        at once when under the auto-approve limit and covered by the balance. A job on a Ray cluster
        that ended is settled first (charged, called back), by whichever replica sees it first."""
        if self.ray is not None:
            doc = self.ray.settle(doc)
        if doc["status"] != "new":
            return doc
        job_id = doc["job_id"]
        with self.lock(job_id):
            doc = self.load(job_id)
            if doc["status"] != "new" or self.missing(doc):
                return doc
            spec = self.spec(doc)
            report = self.report(doc)
            quote = self.quote(spec)
            report.doc["quote"] = quote
            key = self.key_of(doc)
            limit = key.auto_approve_below if key and key.auto_approve_below is not None else self.auto_approve_below
            waiting = (f"quoted {quote['credits']:g} credits for {quote['images']} images "
                       f"({quote['items']} items): approve_job starts it")
            if key is None or limit is None or quote["credits"] >= limit:
                report.set("awaiting_approval", waiting)
                return report.doc
            try:
                self.accounts.reserve(key.account, key.credits, job_id, quote["credits"])
            except InsufficientCredits as exc:
                report.set("awaiting_approval", f"{waiting}; {exc}")
                return report.doc
            report.doc.update(approved_at=now_iso(), approved_by="auto")
            self._queue(report, f"quoted {quote['credits']:g} credits, under the auto-approve limit of {limit:g}")
            return report.doc

    def missing(self, doc: dict) -> list[str]:
        fs, root = filesystem(join(self.uploads, doc["job_id"]), self.storage_options)
        fs.invalidate_cache(root)  # presigned PUTs go around this process's listing cache
        return [f for f in doc["service"]["files"] if not fs.exists(f"{root}/{f}")]

    def quote(self, spec: JobSpec) -> dict:
        """`jobs.quote.quote_items` over the listing walked lazily, a bounded chunk at a time: the same
        header-only pricing as `veil quote`, without holding a whole archive's listing."""
        classes = spec.resolve_models()[0]
        per_chunk = self.pricing.model_copy(update={"minimum_per_job": 0.0})  # the minimum applies to the sum
        archive = archive_options(spec)
        total = {"items": 0, "images": 0, "unreadable": 0, "not_billable": 0, "megapixels": 0.0, "credits": 0.0}
        for chunk in chunks(self.rows(spec), QUOTE_ROWS, QUOTE_BYTES):
            part = quote_items(chunk, per_chunk, classes, archive, self.storage_options)
            for k in total:
                total[k] += part[k]
        total.update(megapixels=round(total["megapixels"], 3), credits=self.pricing.job_credits(total["credits"]),
                     minimum_per_job=self.pricing.minimum_per_job, classes=classes)
        return total

    def rows(self, spec: JobSpec) -> Iterator[dict]:
        """The job's items, archives expanded, one at a time."""
        archive = archive_options(spec)
        for source in iter_sources(spec.inputs, self.storage_options):  # streamed, folder by folder
            yield from expand_rows(source, archive)

    def approve(self, doc: dict) -> tuple[str, dict]:
        """("approved" | "auto" | "already" | "not_ready", job); InsufficientCredits when the key's
        balance does not cover the quote. A failed or cancelled job is resumed."""
        doc = self.refresh(doc)
        job_id = doc["job_id"]
        with self.lock(job_id):
            doc = self.load(job_id)
            status = doc["status"]
            if status == "new":
                return "not_ready", doc
            if status == "deleted":
                raise JobNotFound(job_id)
            report = self.report(doc)
            if status in ("failed", "cancelled"):
                self._queue(report, "resumed: items finished earlier are kept")
                return "approved", report.doc
            if status != "awaiting_approval":
                by = doc.get("approved_by")  # a Ray job's run rewrote job.json: its submission record has it
                by = by or ((self.ray.record(job_id) or {}).get("approved_by") if self.ray else None)
                return ("auto" if by == "auto" else "already"), doc
            key = self.key_of(doc)
            if key is None:
                raise InsufficientCredits("the API key this job is billed to is no longer valid")
            self.accounts.reserve(key.account, key.credits, job_id, doc["quote"]["credits"])
            report.doc.update(approved_at=now_iso(), approved_by="api_key")
            self._queue(report, f"approved: {doc['quote']['credits']:g} credits reserved")
            return "approved", report.doc

    def _queue(self, report: JobReport, description: str) -> None:
        job_id = report.doc["job_id"]
        report.set("queued", description)
        if self.ray is not None:
            self.ray.submit(report)  # the cluster runs it; this replica may stop meanwhile
            return
        future = self.runner.submit(self._run, job_id)
        self._queued[job_id] = future
        future.add_done_callback(lambda _: self._queued.pop(job_id, None))

    # --- running ---
    def _run(self, job_id: str) -> None:
        try:
            doc = self.load(job_id)
        except JobNotFound:
            return
        if doc["status"] != "queued":
            return
        report = self.report(doc)
        run, started_at = Totals(), now_iso()
        try:
            spec = self.spec(doc)
            root = doc["outputs"]["root"]
            resume = resume_state(root, False, self.storage_options)  # a resumed job keeps what it finished
            executor = InProcessExecutor(
                self.processor, self.pool, self.config.workers, self.rows,
                write_options(spec, root, job_id=job_id, storage_options=self.storage_options),
                Billing(self.pricing, spec.resolve_models()[0]), self._stopping)
            expected = int((doc.get("quote") or {}).get("items", 0)) - len(resume.finished)
            report.set("processing", f"0 of {expected} items", started_at=doc.get("started_at") or started_at)
            started = time.monotonic()
            execute(spec, report, self.pricing, executor, resume, run, started_at,
                    on_batch=lambda totals: report.progress(totals, expected, started))
        except BaseException as exc:  # whatever stops it, the job's status says so
            stopped = isinstance(exc, CancelledError) or self._stopping.is_set()
            if not stopped:
                log.exception("job %s failed", job_id)
            report.doc["totals"] = run.as_dict()
            report.set("cancelled" if stopped else "failed",
                       "the server stopped: approve_job resumes it" if stopped else f"{type(exc).__name__}"[:200],
                       finished_at=now_iso())
        else:
            # the charge replaces the reservation: the credits of the items that ended done, once
            self.accounts.charge(doc["service"]["account"], job_id, report.doc["credits"]["total"])
        self.notify(job_id)

    # --- results ---
    def result(self, doc: dict, base: str) -> dict:
        """Syntonym's JobReport (jobs.job_store.syntonym_report), with expiring download links in
        place of storage locations, which stay inside the service."""
        out = syntonym_report(doc, self.storage_options)
        expires = int(time.time()) + self.config.link_ttl_s
        for task in out["tasks"]:
            task["source"] = task["file_name"]
            done = task["task_status"] == "done" and task["output_location"]
            relative = f"jobs/{doc['job_id']}/images/{task['file_name']}"
            task["output_location"] = task["download_url"] = (
                self.links.link(base, f"/syntonym/download/{relative}", relative, "GET", expires) if done else None)
        quote = doc.get("quote") or {}
        out.update(job_quoted_credit_cost=quote.get("credits"), files=doc["service"]["files"],
                   created_at=doc.get("created_at"), finished_at=doc.get("finished_at"),
                   totals=doc.get("totals"), links_expire_at=iso(expires))
        return out

    # --- notification ---
    def set_callback(self, doc: dict, url: str) -> dict:
        """Remember `url`; a job that already ended is reported now. The callback is written before
        the status is read again, and a job reads it after writing its final status, so an ending
        job is reported at least once (twice in a close race)."""
        job_id = doc["job_id"]
        write_atomic(self._callback_url(job_id), json.dumps({"url": url, "registered_at": now_iso()}).encode(),
                     self.storage_options)
        ended = self.load(job_id)["status"] in ENDED
        if ended and (self.ray is None or self.ray.settled(job_id)):  # else whoever settles it calls back
            self.hooks.submit(self.notify, job_id)
        return {"job_id": job_id, "callback_url": url, "registered": True}

    def notify(self, job_id: str) -> None:
        """POST the job's JobReport to its callback, if it has one and the job has ended; the outcome
        goes to callback.json. A job running again (approve_job retried it since this call was
        queued) is reported when that run ends, not with its `queued` status."""
        try:
            callback = json.loads(read_bytes(self._callback_url(job_id), self.storage_options))
            doc = self.load(job_id)
        except (FileNotFoundError, JobNotFound):
            return
        if doc["status"] not in ENDED:
            return
        base = self.config.public_url or doc["service"]["base_url"]
        outcome = post_report(callback["url"], self.result(doc, base))
        log.info("job %s callback %s after %s attempt(s)", job_id, outcome["status"], outcome["attempts"])
        callback["outcome"] = {**outcome, "event": doc["status"]}
        write_atomic(self._callback_url(job_id), json.dumps(callback).encode(), self.storage_options)

    def _callback_url(self, job_id: str) -> str:
        return join(self.output, job_id, "callback.json")

    # --- deleting ---
    def delete(self, doc: dict) -> dict:
        """Outputs, manifest and uploads removed, the reservation dropped (a charge stays); JobBusy
        while it runs."""
        job_id = doc["job_id"]
        if self.ray is not None:
            self.ray.settle(doc)  # a Ray job whose driver died ends here, instead of staying busy
        with self.lock(job_id):
            deleted = delete_job(self.output, job_id, storage_options=self.storage_options)
            fs, path = filesystem(join(self.uploads, job_id), self.storage_options)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            self.accounts.release(doc["service"]["account"], job_id)
        return {**deleted, "service": doc["service"]}  # a Ray job's job.json has no service part of its own


__all__ = ["JobBusy", "JobNotFound", "ServiceJobs", "chunks"]
