"""Resuming a job: what the manifest says is finished, and a manifest with one row per item.

A job re-run with its job id skips the items whose latest images row is final: `done`, `skipped`
for a reason other than the budget, or `failed` (unless failed items are retried). Credits are
summed from `done` rows, so an item is never charged twice.

A killed job can leave two kinds of leftovers, both removed by `resume_state` before the
job goes on: a detections part whose images part was never written (the writer writes
detections first, under the same part name), and rows of items that will be processed again.
Duplicates are dropped once more by `drop_duplicates` when the resumed job ends. Parts are
rewritten under their own name (an atomic replace), so the pairing survives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.manifest import DETECTIONS_SCHEMA, IMAGES_SCHEMA, part_urls, write_part
from operators.rows import FailureCause
from operators.storage import filesystem

RETRYABLE_SKIPS = (FailureCause.BUDGET_EXCEEDED,)  # skipped for the budget: a resumed job tries them again


@dataclass
class ResumeState:
    finished: set[str] = field(default_factory=set)  # item ids not to process again
    charged: float = 0.0  # credits of the finished `done` items
    rows_dropped: int = 0  # manifest rows removed by compaction (duplicates, items to redo)
    parts_removed: int = 0  # orphan detections parts and emptied parts


def latest_rows(images: pa.Table) -> pa.Table:
    """One row per item_id: the most recently processed one."""
    if images.num_rows == 0:
        return images
    order = pc.sort_indices(images, [("item_id", "ascending"), ("processed_at", "descending")])
    images = images.take(order)
    ids = images.column("item_id").to_numpy(zero_copy_only=False)
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return images.filter(pa.array(first))


def is_final(images: pa.Table, retry_failed: bool) -> np.ndarray:
    status = images.column("status").to_numpy(zero_copy_only=False)
    cause = np.asarray(images.column("failure_cause").to_pylist(), dtype=object)
    final = (status == "done") | ((status == "skipped") & ~np.isin(cause, RETRYABLE_SKIPS))
    return final | ((status == "failed") & (not retry_failed))


def resume_state(job_root: str, retry_failed: bool = False, storage_options: dict | None = None,
                 parts: Callable[[str], bool] | None = None) -> ResumeState:
    """Compact the manifest of an earlier run and say which items are finished. `parts`: which
    part names to read (a planned job leaves out those of its sealed shards)."""
    return _compact(job_root, storage_options, lambda latest: is_final(latest, retry_failed), parts)


def drop_duplicates(job_root: str, storage_options: dict | None = None,
                    parts: Callable[[str], bool] | None = None, prefix: str = "part-") -> ResumeState:
    """One row per item again, the latest, at the end of a resumed run. The writers of a killed
    run can outlive its driver: after a SIGKILL of the driver's process group, its Ray workers
    wrote 2 more parts over 2 s, so a resume started meanwhile processes those items again."""
    return _compact(job_root, storage_options, lambda latest: np.ones(latest.num_rows, dtype=bool), parts, prefix)


def _compact(job_root: str, storage_options: dict | None, keep, parts: Callable[[str], bool] | None = None,
             prefix: str = "part-") -> ResumeState:
    """Drop orphan detections parts and every images row but the latest of its item, of which
    only those `keep(latest)` selects stay; return what stayed (`finished`) and what went."""
    state = ResumeState()
    fs, _ = filesystem(job_root, storage_options)
    images_parts = part_urls(job_root, "images", storage_options, prefix, keep=parts)
    det_parts = part_urls(job_root, "detections", storage_options, prefix, keep=parts)
    for name, path in det_parts.items():
        if name not in images_parts:  # killed between the two writes of a batch
            fs.rm(path)
            state.parts_removed += 1
    if not images_parts:
        return state
    tables = [pq.read_table(p, filesystem=fs, schema=IMAGES_SCHEMA) for p in images_parts.values()]
    names = [n for n, t in zip(images_parts, tables, strict=True) for _ in range(t.num_rows)]
    everything = pa.concat_tables(tables).append_column("_part", pa.array(names))
    latest = latest_rows(everything)
    winners = latest.filter(pa.array(keep(latest)))
    state.finished = set(winners.column("item_id").to_pylist())
    done = pc.equal(winners.column("status"), "done")
    state.charged = float(pc.sum(pc.filter(winners.column("credits"), done)).as_py() or 0.0)

    # keep = (part, item) pairs of the winning rows; rewrite the parts that hold anything else
    keep: dict[str, set[str]] = {}
    for part, item in zip(winners.column("_part").to_pylist(), winners.column("item_id").to_pylist(), strict=True):
        keep.setdefault(part, set()).add(item)
    for (name, path), table in zip(images_parts.items(), tables, strict=True):
        kept_ids = keep.get(name, set())
        mask = pc.is_in(table.column("item_id"), pa.array(sorted(kept_ids), pa.string()))
        if pc.all(mask).as_py():
            continue
        state.rows_dropped += table.num_rows - int(pc.sum(mask).as_py() or 0)
        if name in det_parts:  # detections first: a kill in between leaves the images part to redo
            dets = pq.read_table(det_parts[name], filesystem=fs, schema=DETECTIONS_SCHEMA)
            dmask = pc.is_in(dets.column("item_id"), pa.array(sorted(kept_ids), pa.string()))
            _rewrite(job_root, "detections", name, det_parts[name], dets.filter(dmask), fs, storage_options, state)
        _rewrite(job_root, "images", name, path, table.filter(mask), fs, storage_options, state)
    return state


def _rewrite(job_root, table_name, name, path, table, fs, storage_options, state) -> None:
    if table.num_rows:
        schema = IMAGES_SCHEMA if table_name == "images" else DETECTIONS_SCHEMA
        write_part(job_root, table_name, table, schema, storage_options, part=name)
    else:
        fs.rm(path)
        state.parts_removed += 1


def drop_finished(batch: dict[str, np.ndarray], finished: set[str] | frozenset[str]) -> dict[str, np.ndarray]:
    """The resume filter stage: the rows of a batch whose item is not finished yet."""
    if not finished:
        return batch
    keep = np.fromiter((str(i) not in finished for i in batch["item_id"]), dtype=bool, count=len(batch["item_id"]))
    return {k: v[keep] for k, v in batch.items()}
