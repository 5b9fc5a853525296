"""Plans, not lists: a job's listed items as Parquet shards under OUTPUT/JOB_ID/plan/.

The listing streams into shards of `shard_items` rows (default 10,000) and the driver keeps only
one shard's rows and a few numbers per shard; the dataset is built from the shard files (one row
per shard, read by a worker), so nothing in the driver grows with the items. Layout:

    plan/shard-000000.parquet ...   the rows list_sources gives (item_id ... error), in listing order
    plan/plan.json                  shard names and counts, written last (a plan is whole or absent)
    plan/done/<shard>.json          a shard whose items all reached a final state, with its totals
                                    (operators/shard_resume.py)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.archive_tools import RAR_SUFFIXES
from operators.archives import ArchiveOptions, expand_rows
from operators.storage import filesystem, join, read_bytes, write_atomic

SHARD_ITEMS = 10_000
# The first shard is small: a first run's first wave is that shard alone (jobs/plan_stream.py), and
# on a small machine Ray Data gives the write tasks a CPU only once the wave's items have gone
# through detection, so the first items appear after 1,000 items' work, not 10,000.
FIRST_SHARD_ITEMS = 1_000
PLAN_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("source_url", pa.string()),
    ("member", pa.string()),
    ("rel_path", pa.string()),
    ("size", pa.int64()),
    ("kind", pa.string()),
    ("status", pa.string()),  # a verdict reached when listing ("" = not decided yet), as in list_sources
    ("failure_cause", pa.string()),
    ("error", pa.string()),
])


@dataclass
class Shard:
    name: str  # file name under plan/, e.g. shard-000000.parquet
    items: int  # rows (an archive counts 1: its members are listed by the workers)
    archives: int = 0
    archive_bytes: int = 0
    digest: str = ""  # of its item ids: a shard's done marker holds only for the same items
    videos: int = 0  # listed videos: the pipeline spreads them over the detection actors one by one

    @property
    def key(self) -> str:
        """`shard-000003`: in its manifest parts' names (part-shard-000003-...) and its marker's."""
        return self.name.removesuffix(".parquet")


@dataclass
class Plan:
    root: str  # OUTPUT/JOB_ID/plan
    shards: list[Shard] = field(default_factory=list)
    has_rar: bool = False

    @property
    def items(self) -> int:
        return sum(s.items for s in self.shards)

    @property
    def archives(self) -> int:
        return sum(s.archives for s in self.shards)

    @property
    def videos(self) -> int:
        return sum(s.videos for s in self.shards)

    def without(self, keys: set[str] | frozenset[str]) -> Plan:
        """The plan less the shards named (sealed ones: a resume skips them)."""
        return Plan(self.root, [s for s in self.shards if s.key not in keys], self.has_rar)

    def waves(self, max_items: int) -> list[Plan]:
        """The plan cut into runs of whole shards of about `max_items` rows each (at least one shard)."""
        waves: list[Plan] = []
        for s in self.shards:
            if not waves or (waves[-1].items + s.items > max_items and waves[-1].shards):
                waves.append(Plan(self.root, [], self.has_rar))
            waves[-1].shards.append(s)
        return waves or [Plan(self.root, [], self.has_rar)]

    def urls(self) -> list[str]:
        return [join(self.root, s.name) for s in self.shards]

    def save(self, storage_options: dict | None = None) -> None:
        doc = {"version": 1, "has_rar": self.has_rar, "shards": [asdict(s) for s in self.shards]}
        write_atomic(join(self.root, "plan.json"), json.dumps(doc).encode(), storage_options)

    @classmethod
    def load(cls, root: str, storage_options: dict | None = None) -> Plan | None:
        try:
            doc = json.loads(read_bytes(join(root, "plan.json"), storage_options))
        except FileNotFoundError:
            return None
        return cls(root, [Shard(**s) for s in doc["shards"]], bool(doc.get("has_rar")))


def plan_root(job_root: str) -> str:
    return join(job_root, "plan")


def write_plan(rows: Iterable[dict], job_root: str, storage_options: dict | None = None,
               shard_items: int = SHARD_ITEMS, on_shard: Callable[[Shard], None] | None = None) -> Plan:
    """Stream `rows` (list_sources' dicts) into shards under JOB_ROOT/plan/; returns the plan.
    Shards of an earlier plan of the job beyond the new count are removed (a shorter listing).
    `on_shard(shard)`: called as each shard is written (jobs/plan_stream.py starts on it)."""
    plan = Plan(plan_root(job_root))
    pending: list[dict] = []
    for row in rows:
        pending.append(row)
        if row["kind"] == "archive" and row["rel_path"].lower().endswith(RAR_SUFFIXES):
            plan.has_rar = True
        if len(pending) >= (shard_items if plan.shards else min(shard_items, FIRST_SHARD_ITEMS)):
            plan.shards.append(_write_shard(plan, pending, storage_options))
            pending = []
            if on_shard:
                on_shard(plan.shards[-1])
    if pending or not plan.shards:
        plan.shards.append(_write_shard(plan, pending, storage_options))
        if on_shard:
            on_shard(plan.shards[-1])
    _remove_stale(plan, storage_options)
    plan.save(storage_options)
    return plan


def _write_shard(plan: Plan, rows: list[dict], storage_options: dict | None) -> Shard:
    name = f"shard-{len(plan.shards):06d}.parquet"
    table = pa.Table.from_pylist([{k: r.get(k, "") for k in PLAN_SCHEMA.names} for r in rows], schema=PLAN_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_atomic(join(plan.root, name), buf.getvalue(), storage_options)
    archives = [r for r in rows if r["kind"] == "archive"]
    digest = hashlib.sha256("\n".join(r["item_id"] for r in rows).encode()).hexdigest()[:24]
    return Shard(name, len(rows), len(archives), sum(int(r.get("size") or 0) for r in archives), digest,
                 sum(r["kind"] == "video" for r in rows))


def _remove_stale(plan: Plan, storage_options: dict | None) -> None:
    fs, path = filesystem(plan.root, storage_options)
    keep = {s.name for s in plan.shards}
    for p in fs.glob(path.rstrip("/") + "/shard-*.parquet") if fs.exists(path) else []:
        if posixpath.basename(p) not in keep:
            fs.rm(p)


def read_shard(url: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(url, storage_options)
    return pq.read_table(path, filesystem=fs, schema=PLAN_SCHEMA, columns=columns)


def iter_plan(plan: Plan, storage_options: dict | None = None, kinds: tuple[str, ...] | None = None) -> Iterator[dict]:
    """The plan's rows, one shard in memory at a time (`kinds`: only rows of those kinds)."""
    for url, shard in zip(plan.urls(), plan.shards, strict=True):
        if kinds == ("archive",) and not shard.archives:
            continue
        for row in read_shard(url, storage_options).to_pylist():
            if kinds is None or row["kind"] in kinds:
                yield row


SLICE_ITEMS = 256  # plan rows per first-stage task (see slices)


def slices(plan: Plan, size: int = SLICE_ITEMS) -> list[dict]:
    """The dataset rows of a wave: {"shard": url, "start": i, "stop": j}, `size` plan rows each.
    A task that streamed a whole shard (10,000 items) held its CPU until the shard had gone
    through detection, so on a small machine no write task could start: the first item was
    written only after a whole shard (4 min on 2 busy CPUs). A slice's task ends in seconds."""
    return [{"shard": url, "start": a, "stop": min(a + size, s.items)}
            for url, s in zip(plan.urls(), plan.shards, strict=True) for a in range(0, max(s.items, 1), size)]


def shard_rows(row: dict, storage_options: dict | None = None) -> Iterator[dict]:
    """One dataset row {"shard": url[, "start", "stop"]} as that slice of the shard's item rows (on
    a worker), each tagged with the shard (`plan_shard`), which the writer puts in its part names
    (operators/shard_resume.py)."""
    key = posixpath.basename(str(row["shard"])).removesuffix(".parquet")
    table = read_shard(str(row["shard"]), storage_options)
    if row.get("stop") is not None:
        table = table.slice(int(row["start"]), int(row["stop"]) - int(row["start"]))
    for item in table.to_pylist():
        item["plan_shard"] = key
        yield item


def expand_shard(row: dict, options: ArchiveOptions) -> Iterator[dict]:
    """The first stage of a planned job: a shard's rows, each archive expanded into its members."""
    for item in shard_rows(row, options.storage_options):
        yield from expand_rows(item, options)


WAVE_ITEMS = 200_000


def wave_items() -> int:
    """Items per Ray Dataset (VEIL_WAVE_ITEMS, else 200,000). Ray Data keeps a stats object per
    output block in the driver until its Dataset ends (ray-project/ray#66016, ~3 KiB per item
    here), so a job runs as consecutive Datasets over runs of shards: that state stays bounded
    (~600 MiB), at the cost of restarting the detection actors between waves (seconds)."""
    return max(1, int(os.environ.get("VEIL_WAVE_ITEMS") or WAVE_ITEMS))


def shard_items() -> int:
    """Rows per plan shard: VEIL_PLAN_SHARD_ITEMS, else 10,000 (a shard is one worker task's read)."""
    return max(1, int(os.environ.get("VEIL_PLAN_SHARD_ITEMS") or SHARD_ITEMS))


@dataclass
class PlanTodo:
    """What a run of a planned job has left, in counts (and the archive rows, which are few)."""

    files: int = 0  # plan rows not finished (an archive counts 1)
    plain: int = 0  # of which not archives
    archives: list[dict] = field(default_factory=list)  # archive rows not finished
    all_archives: list[dict] = field(default_factory=list)  # every archive row (--repack)
    left: dict[str, int] = field(default_factory=dict)  # shard key -> rows not finished


def plan_todo(plan: Plan, finished: set[str] | frozenset[str] = frozenset(),
              storage_options: dict | None = None) -> PlanTodo:
    """Counts of the rows left to run. Without a finished set, from plan.json alone; with one,
    the shards' item ids are read one shard at a time (vectorised) against it."""
    todo = PlanTodo()
    done = pa.array(list(finished), pa.string()) if finished else None
    for url, shard in zip(plan.urls(), plan.shards, strict=True):
        left = shard.items
        if done is not None:
            ids = read_shard(url, storage_options, columns=["item_id", "kind"])
            fin = pc.is_in(ids.column("item_id"), value_set=done)
            left = shard.items - int(pc.sum(fin).as_py() or 0)
            left_archives = int(pc.sum(pc.and_(pc.invert(fin), pc.equal(ids.column("kind"), "archive"))).as_py()
                                or 0)
        else:
            left_archives = shard.archives
        todo.files += left
        todo.left[shard.key] = left
        todo.plain += left - left_archives
        if shard.archives:
            rows = [r for r in read_shard(url, storage_options).to_pylist() if r["kind"] == "archive"]
            todo.all_archives += rows
            todo.archives += [r for r in rows if r["item_id"] not in finished]
    return todo
