"""`veil quote`: price a job before anything runs, from image headers only.

The input is listed (archive members included), and each image's header is read with a small
ranged read (no full download, no decode) to get its dimensions. Items are priced with the
pricing table and summed per source prefix (the first folder of the item's path, or the archive)
and in total. Unreadable headers are counted, not priced: failed items cost nothing.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from itertools import chain

from PIL import Image

from jobs.pricing import Pricing
from operators.archives import ArchiveOptions, expand_rows, read_member_head
from operators.storage import filesystem, is_local

HEAD_BYTES = 16 * 1024  # JPEG/PNG/WebP/TIFF sizes sit in the first few KiB; PIL reads on when EXIF is larger
MAX_HEAD_BYTES = 4 << 20  # give up on an archive member whose header is not in its first 4 MiB
THREADS = 16  # header reads are latency-bound


def image_size(row: dict, storage_options: dict | None, password: str = "") -> tuple[int, int]:
    """(width, height) of one listed image from its header; raises if the header is unreadable."""
    if row.get("member"):
        n = HEAD_BYTES
        while True:
            head = read_member_head(row, n, storage_options, password)
            try:
                return _size_of(io.BytesIO(head))
            except Exception:
                if len(head) < n or n >= MAX_HEAD_BYTES:
                    raise
                n *= 2
    fs, path = filesystem(row["source_url"], storage_options)
    kwargs = {} if is_local(row["source_url"]) else {"block_size": HEAD_BYTES, "cache_type": "readahead"}
    with fs.open(path, "rb", **kwargs) as f:  # PIL reads only until the size is known
        return _size_of(f)


def _size_of(f) -> tuple[int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(f) as img:
            return img.size


def listed_items(sources: list[dict], archive: ArchiveOptions) -> Iterable[dict]:
    """The sources with each archive replaced by its member rows (headers only, as in the job)."""
    with ThreadPoolExecutor(THREADS) as pool:
        for rows in pool.map(lambda r: list(expand_rows(r, archive)), sources):
            yield from rows


def prefix_of(rel_path: str) -> str:
    return rel_path.split("/", 1)[0] if "/" in rel_path else "."


def quote_items(
    sources: list[dict], pricing: Pricing, classes: list[str], archive: ArchiveOptions,
    storage_options: dict | None = None,
) -> dict:
    """Items, megapixels and credits per source prefix and in total."""
    rows = [r for r in listed_items(sources, archive)]
    images = [r for r in rows if r["kind"] == "image" and not r.get("status")]

    def measure(row: dict) -> tuple[int, int] | None:
        try:
            return image_size(row, storage_options, archive.password)
        except Exception:
            return None

    with ThreadPoolExecutor(THREADS) as pool:
        sizes = list(pool.map(measure, images))
    by_prefix: dict[str, dict] = {}
    total = _empty()
    for row in rows:
        for bucket in (total, by_prefix.setdefault(prefix_of(row["rel_path"]), _empty())):
            bucket["items"] += 1
    for row, size in zip(images, sizes, strict=True):
        for bucket in (total, by_prefix[prefix_of(row["rel_path"])]):
            if size is None:
                bucket["unreadable"] += 1
                continue
            bucket["images"] += 1
            bucket["megapixels"] += size[0] * size[1] / 1e6
            bucket["credits"] += pricing.item_credits(size[0], size[1], classes)
    _quote_videos(rows, pricing, classes, archive, storage_options, total, by_prefix)
    for bucket in (total, *by_prefix.values()):
        bucket["not_billable"] = bucket["items"] - bucket["images"] - bucket["videos"]
        bucket["megapixels"] = round(bucket["megapixels"], 3)
        bucket["credits"] = round(bucket["credits"], 6)
    total["credits"] = pricing.job_credits(total["credits"])
    return {
        "items": total["items"],
        "images": total["images"],
        "videos": total["videos"],
        "unreadable": total["unreadable"],
        "not_billable": total["not_billable"],
        "megapixels": total["megapixels"],
        "credits": total["credits"],
        "minimum_per_job": pricing.minimum_per_job,
        "classes": classes,
        "by_prefix": dict(sorted(by_prefix.items())),
    }


QUOTE_CHUNK = 10_000  # listed rows priced at a time (a plan shard's worth): the driver holds no more


def quote_stream(sources: Iterable[dict], pricing: Pricing, classes: list[str], archive: ArchiveOptions,
                 storage_options: dict | None = None, chunk: int = QUOTE_CHUNK) -> dict:
    """quote_items over a streamed listing, `chunk` rows at a time, summed: what a job of any size
    quotes with one chunk of rows (and its header reads) in memory."""
    per_chunk = pricing.model_copy(update={"minimum_per_job": 0.0})  # the minimum applies to the sum
    out: dict | None = None
    rows: list[dict] = []
    for row in chain(sources, [None]):  # None: the end, the last chunk
        if row is not None:
            rows.append(row)
        if rows and (row is None or len(rows) >= chunk):
            out = _add_quotes(out, quote_items(rows, per_chunk, classes, archive, storage_options))
            rows = []
    out = out or quote_items([], per_chunk, classes, archive, storage_options)
    out.update(credits=pricing.job_credits(out["credits"]), minimum_per_job=pricing.minimum_per_job)
    return out


def _add_quotes(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    counts = ("items", "images", "videos", "unreadable", "not_billable", "megapixels", "credits")
    for bucket, other in [(a, b), *((a["by_prefix"].setdefault(k, dict.fromkeys(counts, 0)), v)
                                    for k, v in b["by_prefix"].items())]:
        for k in counts:
            bucket[k] = round(bucket[k] + other[k], 6)
    a["by_prefix"] = dict(sorted(a["by_prefix"].items()))
    return a


def _empty() -> dict:
    return {"items": 0, "images": 0, "videos": 0, "unreadable": 0, "megapixels": 0.0, "credits": 0.0}


def _quote_videos(rows: list[dict], pricing: Pricing, classes: list[str], archive: ArchiveOptions,
                  storage_options: dict | None, total: dict, by_prefix: dict[str, dict]) -> None:
    """Videos are priced by their duration, read from the container header only (no frame decoded)."""
    from operators.video_io import probe_source

    videos = [r for r in rows if r["kind"] == "video" and not r.get("status")]

    def duration(row: dict) -> float | None:
        try:
            data = None
            if row.get("member"):
                from operators.archives import read_member

                data = read_member(row, storage_options)
            return probe_source(row["source_url"], storage_options, data).duration_s
        except Exception:
            return None

    with ThreadPoolExecutor(THREADS) as pool:
        durations = list(pool.map(duration, videos))
    for row, seconds in zip(videos, durations, strict=True):
        for bucket in (total, by_prefix[prefix_of(row["rel_path"])]):
            if seconds is None:
                bucket["unreadable"] += 1
                continue
            bucket["videos"] += 1
            bucket["credits"] += pricing.video_credits(seconds, classes)


def quote_text(quote: dict) -> str:
    def line(name: str, b: dict) -> str:
        return f"{name[:32]:<32} {b['items']:>8} {b['images']:>8} {b['megapixels']:>10.1f} {b['credits']:>12.2f}"

    lines = [f"{'prefix':<32} {'items':>8} {'images':>8} {'MP':>10} {'credits':>12}"]
    lines += [line(prefix, b) for prefix, b in quote["by_prefix"].items()]
    lines.append(line("total", quote))
    notes = []
    if quote["not_billable"]:
        notes.append(f"{quote['not_billable']} items not billable (not images, unreadable or refused archive members)")
    if quote["minimum_per_job"]:
        notes.append(f"minimum per job: {quote['minimum_per_job']} credits")
    return "\n".join(lines + notes)
