"""The job report: running totals, `job.json` (written while the job runs) and the summary."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from models.detections import CLASSES
from operators.storage import join, read_bytes, write_atomic


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Totals:
    """Counters over the stats rows the writer streams back; constant size, whatever the job."""

    items: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_cause: Counter = field(default_factory=Counter)
    detections: Counter = field(default_factory=Counter)
    anonymized: int = 0
    megapixels: float = 0.0

    def add(self, stats: dict[str, np.ndarray]) -> None:
        self.items += len(stats["status"])
        self.by_status.update(str(s) for s in stats["status"])
        self.by_cause.update(str(c) for c in stats["failure_cause"] if c)
        for c in CLASSES:
            self.detections[c] += int(np.sum(stats[f"n_{c}"]))
        self.anonymized += int(np.sum(stats["anonymized"]))
        self.megapixels += float(np.sum(stats["megapixels"]))

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
        }


class JobReport:
    """`OUTPUT/JOB_ID/job.json`: spec, status, timestamps, totals. Rewritten atomically, at most
    every `interval` seconds while running, so another process can follow progress."""

    def __init__(self, job_root: str, spec: dict, storage_options: dict | None, interval: float = 5.0):
        self.url = join(job_root, "job.json")
        self.storage_options = storage_options
        self.interval = interval
        self._last = 0.0
        self.doc = {
            "job_id": spec["job_id"],
            "status": "new",
            "description": "",
            "created_at": now_iso(),
            "started_at": None,
            "finished_at": None,
            "spec": spec,
            "totals": Totals().as_dict(),
            "outputs": {"root": job_root, "images": join(job_root, "images"), "manifest": join(job_root, "manifest")},
        }

    def set(self, status: str, description: str = "", **fields) -> None:
        self.doc.update(status=status, description=description, **fields)
        self.save()

    def progress(self, totals: Totals, expected: int, started: float) -> None:
        if time.monotonic() - self._last < self.interval:
            return
        self.doc["totals"] = totals.as_dict()
        self.doc["description"] = f"{totals.items} of {expected} items"
        self.doc["throughput_img_s"] = round(totals.items / max(time.monotonic() - started, 1e-9), 3)
        self.save()

    def save(self) -> None:
        self._last = time.monotonic()
        write_atomic(self.url, json.dumps(self.doc, indent=2, default=str).encode(), self.storage_options)


def load_report(job_root: str, storage_options: dict | None = None) -> dict:
    return json.loads(read_bytes(join(job_root, "job.json"), storage_options))


def summary_text(doc: dict) -> str:
    t = doc["totals"]
    causes = ", ".join(f"{k} {v}" for k, v in sorted(t["failure_causes"].items())) or "none"
    dets = ", ".join(f"{k} {v}" for k, v in t["detections"].items() if v) or "none"
    return "\n".join([
        f"job {doc['job_id']}: {doc['status']}" + (f" ({doc['description']})" if doc["description"] else ""),
        f"  items      {t['items']}: {t['done']} done, {t['failed']} failed, {t['skipped']} skipped",
        f"  failures   {causes}",
        f"  detections {dets} ({t['anonymized_images']} images anonymized)",
        f"  speed      {doc.get('throughput_img_s', 0):.2f} img/s, "
        f"{t['megapixels']:.1f} MP in {doc.get('wall_s', 0):.1f} s",
        f"  outputs    {doc['outputs']['root']}",
    ])
