"""Sealing plan shards (see operators/shard_resume.py): a shard whose items all reached a final
state gets `plan/done/<shard>.json` with its totals, written by a small Ray task that reads only
that shard's manifest parts. The driver counts the stats rows per shard as they stream back and
seals a shard of plain files as soon as its last item is written; shards with archives (member
counts unknown up front) and shards finished by earlier runs are sealed when the run ends."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc
import ray

from jobs.report import Totals
from operators.plan import Plan, Shard, read_shard
from operators.resume import drop_duplicates, is_final, latest_rows
from operators.shard_resume import load_markers, part_filter, part_prefix, read_parts, write_marker

SEAL_CPUS = 0.25  # mostly waiting on storage; it must not hold a CPU the pipeline's tasks need


def totals_doc(t: Totals) -> dict:
    """A Totals as JSON numbers, to be summed again (as_dict rounds and renames)."""
    return {"items": t.items, "by_status": dict(t.by_status), "by_cause": dict(t.by_cause),
            "detections": dict(t.detections), "anonymized": t.anonymized, "megapixels": t.megapixels,
            "credits": t.credits, "cpu_s": t.cpu_s, "gpu_s": t.gpu_s, "cpu_by_stage": dict(t.cpu_by_stage)}


def add_doc(t: Totals, d: dict) -> Totals:
    """`t` plus the totals of one marker (in place; returns t)."""
    t.items += d["items"]
    t.by_status.update(d["by_status"])
    t.by_cause.update(d["by_cause"])
    t.detections.update(d["detections"])
    t.anonymized += d["anonymized"]
    t.megapixels += d["megapixels"]
    t.credits += d["credits"]
    t.cpu_s += d["cpu_s"]
    t.gpu_s += d["gpu_s"]
    for k, v in d["cpu_by_stage"].items():
        t.cpu_by_stage[k] = t.cpu_by_stage.get(k, 0.0) + v
    return t


def seal_shard(job_root: str, plan_root: str, shard: Shard, ended: bool, storage_options: dict | None) -> dict | None:
    """The shard's marker doc if it is complete (and then written), else None. `ended`: the run went
    through every item (needed for archives, whose members the plan does not name)."""
    if shard.archives and not ended:
        return None
    prefix = part_prefix(shard.key)
    drop_duplicates(job_root, storage_options, prefix=prefix)  # a killed run's late writers
    images = latest_rows(read_parts(job_root, storage_options, Totals.COLUMNS, prefix=prefix))
    if images.num_rows == 0 or not bool(np.all(is_final(images, retry_failed=False))):
        return None
    listed = read_shard(f"{plan_root}/{shard.name}", storage_options, columns=["item_id", "kind"])
    plain = listed.filter(pc.not_equal(listed.column("kind"), "archive")).column("item_id")
    if not pc.all(pc.is_in(plain, value_set=images.column("item_id"))).as_py() and len(plain):
        return None  # an item of the shard has no row here (e.g. written before plans): not sealed
    totals = Totals.from_manifest(images)
    doc = {"items": totals.items, "failed": totals.by_status.get("failed", 0), "totals": totals_doc(totals)}
    write_marker(plan_root, shard, doc, storage_options)
    return doc


class ShardSealer:
    """Counts stats rows per shard while the job runs and seals each shard as it completes."""

    def __init__(self, plan: Plan, job_root: str, left: dict[str, int], storage_options: dict | None):
        self.plan, self.job_root, self.storage_options = plan, job_root, storage_options
        self.by_key = {s.key: s for s in plan.shards}
        # shards of plain files with items to run: sealed when their count reaches zero
        self.pending = {k: n for k, n in left.items() if n > 0 and not self.by_key[k].archives}
        self.submitted: dict[str, ray.ObjectRef] = {}
        self.task = ray.remote(num_cpus=SEAL_CPUS)(seal_shard)

    def add(self, wave: Plan) -> None:
        """Shards first seen in a wave (a plan written while the job runs): all their items to run."""
        for s in wave.shards:
            if s.key not in self.by_key:
                self.by_key[s.key] = s
                if s.items and not s.archives:
                    self.pending[s.key] = s.items

    def update(self, stats: dict) -> None:
        if "plan_shard" not in stats:
            return
        for key, n in Counter(str(k) for k in stats["plan_shard"]).items():
            if key in self.pending:
                self.pending[key] -= n
                if self.pending[key] <= 0:
                    del self.pending[key]
                    self._submit(key, ended=False)

    def _submit(self, key: str, ended: bool) -> None:
        self.submitted[key] = self.task.remote(self.job_root, self.plan.root, self.by_key[key], ended,
                                               self.storage_options)

    def close(self, ended: bool) -> dict[str, dict]:
        """Seal what is left (when the run `ended` normally) and wait: {shard key: marker} sealed now."""
        if ended:
            for key in self.by_key:
                if key not in self.submitted:
                    self._submit(key, ended=True)
        keys, refs = list(self.submitted), list(self.submitted.values())
        return {k: d for k, d in zip(keys, ray.get(refs), strict=True) if d is not None}


@dataclass
class Sealed:
    """The sealed shards of a job: their keys and their totals summed (the markers are not kept)."""

    keys: set[str] = field(default_factory=set)
    totals: Totals = field(default_factory=Totals)

    def add(self, markers: dict[str, dict]) -> None:
        for key, doc in markers.items():
            if key not in self.keys:
                self.keys.add(key)
                add_doc(self.totals, doc["totals"])

    def parts(self):
        """The manifest parts still read on the driver: those of unsealed shards (and pre-plan jobs)."""
        return part_filter(frozenset(self.keys))


def load_sealed(plan: Plan, storage_options: dict | None, retry_failed: bool) -> Sealed:
    sealed = Sealed()
    sealed.add(load_markers(plan, storage_options, retry_failed))
    return sealed


def manifest_totals(job_root: str, storage_options: dict | None, sealed: Sealed) -> Totals:
    """The job's totals: the sealed shards' markers plus the latest rows of the rest of the manifest."""
    images = read_parts(job_root, storage_options, Totals.COLUMNS, parts=sealed.parts())
    totals = Totals.from_manifest(latest_rows(images))
    done = Totals()
    add_doc(done, totals_doc(sealed.totals))
    return add_doc(done, totals_doc(totals))
