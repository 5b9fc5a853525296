"""The job report: running totals, `job.json` (written while the job runs) and the summary."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.detections import CLASSES
from operators.storage import filesystem, is_local, is_no_space, join, read_bytes, write_atomic

END_STATES = ("done", "failed", "cancelled", "awaiting_approval")
RESERVE_BYTES = 64 * 1024  # kept free next to job.json on a local disk, for the report of a full disk


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    """{value: count} of a string column, nulls and empty strings left out."""
    return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(column).to_pylist() if v["values"]}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def iso(ts: float) -> str:
    """A POSIX time as ISO 8601, UTC, to the second (the form now_iso writes)."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


@dataclass
class Totals:
    """Counters over the stats rows the writer streams back; constant size, whatever the job."""

    items: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_cause: Counter = field(default_factory=Counter)
    detections: Counter = field(default_factory=Counter)
    anonymized: int = 0
    megapixels: float = 0.0
    credits: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    cpu_by_stage: dict = field(default_factory=dict)  # from the manifest only: {prepare, detect, write}

    def add(self, stats: dict[str, np.ndarray]) -> None:
        self.items += len(stats["status"])
        self.by_status.update(str(s) for s in stats["status"])
        self.by_cause.update(str(c) for c in stats["failure_cause"] if c)
        for c in CLASSES:
            self.detections[c] += int(np.sum(stats[f"n_{c}"]))
        self.anonymized += int(np.sum(stats["anonymized"]))
        self.megapixels += float(np.sum(stats["megapixels"]))
        self.credits += float(np.sum(stats.get("credits", 0.0)))
        self.cpu_s += float(np.sum(stats.get("cpu_ms", 0.0))) / 1e3
        self.gpu_s += float(np.sum(stats.get("gpu_ms", 0.0))) / 1e3

    # The manifest columns from_manifest reads (with latest_rows' item_id and processed_at).
    COLUMNS = ["item_id", "processed_at", "status", "failure_cause", "anonymized", "width", "height", "credits",
               "cpu_prepare_ms", "cpu_detect_ms", "cpu_write_ms", "gpu_detect_ms", *(f"n_{c}" for c in CLASSES)]

    @classmethod
    def from_manifest(cls, images: pa.Table) -> Totals:
        """Totals over the manifest's latest row per item: the job's whole history, resumes included.
        Arrow aggregates, so a job of millions of items never becomes Python objects here."""
        t = cls()
        t.items = images.num_rows
        t.by_status.update(_value_counts(images.column("status")))
        t.by_cause.update(_value_counts(images.column("failure_cause")))
        done = images.filter(pc.equal(images.column("status"), "done"))

        def total(table: pa.Table, expr) -> float:
            return float(pc.sum(expr if not isinstance(expr, str) else table.column(expr)).as_py() or 0)

        for c in CLASSES:
            t.detections[c] = int(total(done, f"n_{c}"))
        t.anonymized = int(total(done, pc.cast(done.column("anonymized"), pa.int64())))
        pixels = pc.multiply(pc.cast(done.column("width"), pa.int64()), pc.cast(done.column("height"), pa.int64()))
        t.megapixels = total(done, pixels) / 1e6
        t.credits = total(done, "credits")
        t.cpu_by_stage = {k[4:-3]: total(images, k) / 1e3 for k in ("cpu_prepare_ms", "cpu_detect_ms", "cpu_write_ms")}
        t.cpu_s = sum(t.cpu_by_stage.values())
        t.gpu_s = total(images, "gpu_detect_ms") / 1e3
        return t

    def as_dict(self) -> dict:
        return {
            "items": self.items,
            "done": self.by_status.get("done", 0),
            "failed": self.by_status.get("failed", 0),
            "skipped": self.by_status.get("skipped", 0),
            "failure_causes": dict(self.by_cause),
            "detections": {c: self.detections.get(c, 0) for c in CLASSES},
            "anonymized_images": self.anonymized,
            "megapixels": round(self.megapixels, 3),
            "item_credits": round(self.credits, 6),
            "cpu_s": round(self.cpu_s, 3),
            "gpu_s": round(self.gpu_s, 3),
            "cpu_s_by_stage": {k: round(v, 3) for k, v in self.cpu_by_stage.items()},
        }


class JobReport:
    """`OUTPUT/JOB_ID/job.json`: spec, status, timestamps, totals. Rewritten atomically, at most
    every `interval` seconds while running, so another process can follow progress."""

    def __init__(self, job_root: str, spec: dict, storage_options: dict | None, interval: float = 5.0,
                 earlier: dict | None = None):
        """`earlier`: the job.json of an earlier run of this job (resume): its history is kept."""
        self.url = join(job_root, "job.json")
        self.storage_options = storage_options
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()  # the Ray watchdog may end the job from its thread
        self._ended = False  # once an end state is written, progress lines no longer overwrite it
        self._reserve = join(job_root, ".job.json.reserve") if is_local(job_root) else None
        self.doc = {
            "job_id": spec["job_id"],
            "status": "new",
            "description": "",
            "created_at": now_iso(),
            "started_at": None,
            "finished_at": None,
            "spec": spec,
            "totals": Totals().as_dict(),
            "credits": {"total": 0.0},
            "cost": {},
            "webhook": {"status": "", "events": []},
            "runs": [],
            "outputs": {"root": job_root, "images": join(job_root, "images"), "manifest": join(job_root, "manifest")},
        }
        if earlier:
            for key in ("created_at", "webhook", "runs", "quote", "approved_at", "spec_changes"):
                if key in earlier:
                    self.doc[key] = earlier[key]

    def set(self, status: str, description: str = "", **fields) -> None:
        with self._lock:
            if self._ended and status not in END_STATES:
                return
            self.doc.update(status=status, description=description, **fields)
            self._save(final=status in END_STATES)

    def progress(self, totals: Totals, expected: int | None, started: float, note: str = "") -> bool:
        """Totals into job.json, at most every `interval` s; True when it was written. `expected`: the
        job's item count, archive members included (None while they are being listed)."""
        if time.monotonic() - self._last < self.interval or self._ended:
            return False
        with self._lock:
            if self._ended:
                return False
            self.doc["totals"] = totals.as_dict()
            of = f" of {expected}" if expected is not None else ""
            self.doc["description"] = f"{totals.items}{of} items" + note
            self.doc["throughput_img_s"] = round(totals.items / max(time.monotonic() - started, 1e-9), 3)
            self._save()
        return True

    @property
    def ended(self) -> bool:
        return self._ended

    def save(self) -> None:
        with self._lock:
            self._save(final=self.doc["status"] in END_STATES)

    def _save(self, final: bool = False) -> None:
        self._last = time.monotonic()
        data = json.dumps(self.doc, indent=2, default=str).encode()
        try:
            write_atomic(self.url, data, self.storage_options)
        except OSError as exc:
            # A full disk must not leave the job `processing`: its end state takes the reserved room.
            if not (final and is_no_space(exc) and self.release_room()):
                raise
            write_atomic(self.url, data, self.storage_options)
        self._ended = self._ended or (final and self.doc["status"] != "awaiting_approval")

    def reserve_room(self) -> None:
        """On a local disk, hold RESERVE_BYTES next to job.json (released to write the report
        when the disk fills, and when the job ends)."""
        if self._reserve:
            path = filesystem(self._reserve)[1]
            try:
                with open(path, "wb") as f:
                    f.write(b"\0" * RESERVE_BYTES)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.release_room()

    def release_room(self) -> bool:
        """Remove the reserve; True if there was one."""
        if not self._reserve:
            return False
        try:
            os.unlink(filesystem(self._reserve)[1])
            return True
        except FileNotFoundError:
            return False


def load_report(job_root: str, storage_options: dict | None = None) -> dict:
    return json.loads(read_bytes(join(job_root, "job.json"), storage_options))


def try_load_report(job_root: str, storage_options: dict | None = None) -> dict | None:
    """The job.json of an existing job, or None when the job does not exist yet."""
    try:
        return load_report(job_root, storage_options)
    except FileNotFoundError:
        return None


def summary_text(doc: dict) -> str:
    t = doc["totals"]
    credits, cost = doc.get("credits") or {}, doc.get("cost") or {}
    causes = ", ".join(f"{k} {v}" for k, v in sorted(t["failure_causes"].items())) or "none"
    dets = ", ".join(f"{k} {v}" for k, v in t["detections"].items() if v) or "none"
    return "\n".join([
        f"job {doc['job_id']}: {doc['status']}" + (f" ({doc['description']})" if doc["description"] else ""),
        f"  items      {t['items']}: {t['done']} done, {t['failed']} failed, {t['skipped']} skipped",
        f"  failures   {causes}",
        f"  detections {dets} ({t['anonymized_images']} images anonymized)",
        f"  credits    {credits.get('total', 0.0):g}"
        + (f" (cap {credits['max_credits']:g})" if credits.get("max_credits") is not None else ""),
        f"  cost       {cost.get('total', 0.0):.4f} {cost.get('currency', '')} "
        f"({cost.get('cpu_s', 0.0):.1f} CPU-s, {cost.get('gpu_s', 0.0):.1f} GPU-s; "
        f"{cost.get('per_1000_images', 0.0):.4f} per 1000 images)",
        f"  speed      {doc.get('throughput_img_s', 0):.2f} img/s, "
        f"{t['megapixels']:.1f} MP in {doc.get('wall_s', 0):.1f} s",
        f"  outputs    {doc['outputs']['root']}",
    ])
