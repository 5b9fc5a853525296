"""One run of a job at a time: a lease in the job folder (`OUTPUT/JOB_ID/lease.json`).

A run takes the lease before it writes anything and renews it every RENEW_EVERY_S seconds from a
thread of the driver; a second run of the same job id meanwhile is refused (JobBusy, exit 2).
A lease is stale, and the next run takes it over, when it was not renewed for `ttl` seconds
(LEASE_TTL_S, or VEIL_LEASE_TTL_S: a driver killed on another machine), or at once when it was
taken on this machine by a process that is gone (pid and start time: a killed or crashed driver,
the usual case of a resume).

Taking and renewing are compare-and-swap operations, so two runs racing for a free or stale lease
cannot both win: on S3, conditional PUTs (`If-None-Match: *` to create, `If-Match: <ETag>` to
take over or renew); on a local disk, the read-compare-write under an flock of `.lease.lock`.
Other fsspec stores get a best effort (write, then read back our token).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager

import psutil
from fsspec.asyn import sync

from jobs.job_store import JobBusy
from operators.storage import LOCAL_PROTOCOLS, filesystem, join

LEASE_FILE = "lease.json"
LEASE_TTL_S = 90.0
RENEW_EVERY_S = 10.0


def lease_ttl() -> float:
    return float(os.environ.get("VEIL_LEASE_TTL_S") or LEASE_TTL_S)


def lease_wait() -> float:
    """Seconds a run waits for a held lease before JobBusy: 0, unless VEIL_LEASE_WAIT_S says (set by
    jobs.submit for a resumed Ray attempt, whose predecessor Ray calls stopped may still be exiting)."""
    return float(os.environ.get("VEIL_LEASE_WAIT_S") or 0.0)


def _precondition_failed(exc: BaseException) -> bool:
    """s3fs turns S3's 412 into FileExistsError (If-None-Match) or OSError(EINVAL) (If-Match)."""
    text = str(exc).lower().replace("-", "")
    return isinstance(exc, FileExistsError) or "precondition" in text or "conditionalrequestconflict" in text


def stale_reason(doc: dict, ttl: float, now: float | None = None) -> str | None:
    """Why a lease may be taken over (None: its holder may still run)."""
    now = time.time() if now is None else now
    age = now - float(doc.get("renewed", 0))
    if age > ttl:
        return f"not renewed for {age:.0f} s (stale after {ttl:.0f} s)"
    if doc.get("host") == socket.gethostname():
        try:
            holder = psutil.Process(int(doc["pid"]))
            # a killed driver not yet reaped by its parent is a zombie: gone all the same (Ray's
            # job stop SIGKILLs it and says STOPPED before its parent waits for it)
            if (abs(holder.create_time() - float(doc.get("pid_started", 0))) < 1
                    and holder.status() != psutil.STATUS_ZOMBIE):
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
            pass
        return f"its driver (pid {doc.get('pid')} on this machine) is gone"
    return None


class JobLease:
    def __init__(self, job_root: str, storage_options: dict | None = None, ttl: float | None = None):
        self.url = join(job_root, LEASE_FILE)
        self.fs, self.path = filesystem(self.url, storage_options)
        self.local = self.fs.protocol in LOCAL_PROTOCOLS or "file" in self.fs.protocol
        self.s3 = not self.local and "s3" in self.fs.protocol
        self.ttl = lease_ttl() if ttl is None else ttl
        self.token = secrets.token_hex(16)
        self.version: str | None = None  # ETag (S3) or the text written (elsewhere) of our lease
        self.lost = threading.Event()  # set when a renewal found the lease taken by another run
        self.took_over: str | None = None  # why an earlier holder's lease was stale, if one was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self, acquired_at: float | None = None) -> bytes:
        me = psutil.Process()
        now = time.time()
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_started": me.create_time(), "acquired": acquired_at or now, "renewed": now,
                           "ttl_s": self.ttl}).encode()

    # --- the store: read and compare-and-swap ---
    def _read(self) -> tuple[dict | None, str | None]:
        try:
            if self.s3:
                bucket, key = self.path.split("/", 1)
                got = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
                body = sync(self.fs.loop, got["Body"].read)  # aiobotocore's stream: read on s3fs's loop
                return json.loads(body), got["ETag"]
            text = self.fs.cat_file(self.path).decode()
            return json.loads(text), text
        except FileNotFoundError:
            return None, None
        except ValueError:  # a torn or foreign file: treat it as stale
            return {"renewed": 0}, "?"

    def _swap(self, data: bytes, expected: str | None) -> bool:
        """Write `data` if the lease is still `expected` (None: absent); False if it changed."""
        if self.s3:
            bucket, key = self.path.split("/", 1)
            cond = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
            try:
                self.version = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
                return True
            except OSError as exc:
                if _precondition_failed(exc):
                    return False
                raise
        with self._local_lock():
            _, now = self._read()
            if now != expected:
                return False
            self.fs.pipe_file(self.path, data) if not self.local else _write_local(self.path, data)
            self.version = data.decode()
        if not self.local:  # best effort: another run may have written meanwhile
            time.sleep(0.2)
            return self._read()[1] == self.version
        return True

    @contextmanager
    def _local_lock(self):
        if not self.local:
            yield
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(os.path.join(os.path.dirname(self.path), ".lease.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- the life of a lease ---
    def acquire(self, job_id: str, wait_s: float = 0.0) -> JobLease:
        """Take the lease, or JobBusy naming its live holder (after waiting up to `wait_s` for it to go)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._acquire(job_id)
            except JobBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def _acquire(self, job_id: str) -> JobLease:
        for _ in range(5):  # a lost race re-reads: the winner's fresh lease then refuses us
            doc, version = self._read()
            if doc is not None and doc.get("token") == self.token:
                # our own create landed although its answer was lost (the client retried it)
                self.version = version
                return self._started()
            if doc is not None:
                reason = stale_reason(doc, self.ttl)
                if reason is None:
                    since = time.time() - float(doc.get("acquired", 0))
                    raise JobBusy(
                        f"job {job_id} is running (pid {doc.get('pid')} on {doc.get('host')}, for {since:.0f} s, "
                        f"lease {self.url}); wait for it, or `veil cancel` it. A run that died leaves a lease "
                        f"taken over after {self.ttl:.0f} s without renewal (at once on the same machine)")
                self.took_over = reason
            if self._swap(self._doc(), version):
                return self._started()
        raise JobBusy(f"job {job_id}: another run keeps taking its lease ({self.url})")

    def _started(self) -> JobLease:
        self._thread = threading.Thread(target=self._renew_loop, name="veil-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        doc, version = self._read()
        if doc is None or doc.get("token") != self.token:
            self.lost.set()
            return False
        if not self._swap(self._doc(doc.get("acquired")), version):
            doc, version = self._read()  # a retried write of ours may have landed: then it is still ours
            if doc is None or doc.get("token") != self.token:
                self.lost.set()
                return False
            self.version = version
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                if not self.renew():
                    return
            except Exception:  # a storage hiccup: the next renewal tries again, well within the TTL
                continue

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            doc, _ = self._read()
            if doc is not None and doc.get("token") == self.token:
                with self._local_lock():
                    self.fs.rm_file(self.path)
        except OSError:
            pass  # left behind, it goes stale (at once on this machine: the pid is gone)

    def __enter__(self) -> JobLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def no_live_run(job_root: str, storage_options: dict | None = None) -> str | None:
    """Why no run holds the job now (its lease is missing or stale), or None while one does:
    `veil status` says so for a job job.json still calls queued/processing."""
    lease = JobLease(job_root, storage_options)
    doc, _ = lease._read()
    if doc is None:
        return "no run holds its lease"
    return stale_reason(doc, lease.ttl)


def _write_local(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
