"""Resume and totals per plan shard: no global finished set, no whole-manifest read on the driver.

Each item row carries its plan shard (`plan_shard`, set when the shard is read), and the writer
names its manifest parts after it: `manifest/images/part-shard-000003-<digest>.parquet`
(`write_by_shard` keeps one shard per part). So one shard's rows are found by a prefix listing.

Once all items of a shard reach a final state (done, failed, or skipped for a reason other than
the budget), a task "seals" it (jobs/shard_seal.py): it drops the shard's duplicate rows and
writes `plan/done/<shard>.json` with the shard's totals. A resume leaves sealed shards out of
the dataset and out of the manifest it reads (`part_filter`); `finish` sums the markers' totals
and reads only the unsealed shards' rows (and those of jobs run before plans: parts without a
shard in their name are always read).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from operators.manifest import IMAGES_SCHEMA, part_urls, read_parts_folded
from operators.plan import Plan, Shard
from operators.storage import filesystem, join, read_bytes, write_atomic
from operators.write import WriteOptions, write_batch

_SHARD_PART = re.compile(r"^part-(shard-\d+)-")
MARKER_READ_THREADS = 16  # markers are small files: a resume of 100,000 shards reads them in parallel


def shard_of_part(part_name: str) -> str:
    """`part-shard-000003-ab12.parquet` -> `shard-000003`; "" for a part written before plans."""
    m = _SHARD_PART.match(part_name)
    return m.group(1) if m else ""


def part_prefix(key: str) -> str:
    return f"part-{key}-"


def part_filter(sealed: set[str] | frozenset[str]) -> Callable[[str], bool]:
    """The manifest parts a resume still reads: all but those of sealed shards."""
    return lambda name: shard_of_part(name) not in sealed


def marker_url(plan_root: str, key: str) -> str:
    return join(plan_root, "done", f"{key}.json")


def write_marker(plan_root: str, shard: Shard, doc: dict, storage_options: dict | None = None) -> None:
    body = {"shard": shard.name, "digest": shard.digest, **doc}
    write_atomic(marker_url(plan_root, shard.key), json.dumps(body).encode(), storage_options)


def load_markers(plan: Plan, storage_options: dict | None = None, retry_failed: bool = False) -> dict[str, dict]:
    """{shard key: marker} of the plan's sealed shards. A marker holds only for the same items
    (its digest); with --retry-failed a shard with failed items is not sealed (they run again)."""
    fs, path = filesystem(join(plan.root, "done"), storage_options)
    present = {posixpath.basename(p).removesuffix(".json") for p in fs.glob(path.rstrip("/") + "/shard-*.json")} \
        if fs.exists(path) else set()
    wanted = [s for s in plan.shards if s.key in present]

    def load(shard: Shard) -> tuple[str, dict | None]:
        try:
            doc = json.loads(read_bytes(marker_url(plan.root, shard.key), storage_options))
        except (FileNotFoundError, ValueError):
            return shard.key, None
        if doc.get("digest") != shard.digest or (retry_failed and doc.get("failed", 0)):
            return shard.key, None
        return shard.key, doc

    with ThreadPoolExecutor(MARKER_READ_THREADS) as pool:
        return {k: d for k, d in pool.map(load, wanted) if d is not None}


def write_by_shard(batch: dict[str, np.ndarray], options: WriteOptions) -> dict[str, np.ndarray]:
    """write_batch, one call per plan shard in the batch (so each part belongs to one shard);
    the stats rows say their shard (`plan_shard`), which the driver counts to seal shards."""
    shards = np.asarray(batch["plan_shard"]).astype(str)
    out: list[dict[str, np.ndarray]] = []
    for key in dict.fromkeys(shards.tolist()):  # in order of first appearance
        keep = shards == key
        stats = write_batch({k: np.asarray(v)[keep] for k, v in batch.items()}, options)
        rows = len(next(iter(stats.values()))) if stats else 0  # fewer than given: a video's early segments
        stats["plan_shard"] = np.asarray([key] * rows)
        out.append(stats)
    if not out:  # an empty batch: write_batch's own empty stats
        return write_batch(batch, options)
    return {k: np.concatenate([s[k] for s in out]) for k in out[0]}


def read_parts(job_root: str, storage_options: dict | None = None, columns: list[str] | None = None,
               parts: Callable[[str], bool] | None = None, prefix: str = "part-") -> pa.Table:
    """manifest.read_table over the images parts `parts` keeps (or of one shard, by `prefix`)."""
    schema = IMAGES_SCHEMA if columns is None else pa.schema([IMAGES_SCHEMA.field(c) for c in columns])
    fs, _ = filesystem(job_root, storage_options)
    urls = list(part_urls(job_root, "images", storage_options, prefix, keep=parts).values())
    return read_parts_folded(urls, fs, schema, columns)
