"""Inputs given as lists of URLs, read without a single LIST call on the storage.

- `list:FILE` (what `veil run --input-list FILE` adds to the inputs): a .txt with one URL per line,
  or a .csv / .parquet with a `url` column and optional `member`, `rel_path` and `size` columns;
- an AWS S3 Inventory `manifest.json` given as an input (recognised by its name and content): its
  CSV (gzip) or Parquet files, whose Bucket/Key/Size columns name the objects.

Rows are list_sources' rows: the same item id for the same URL (and member) as when its folder is
listed, so a job can switch from listing to a list. `rel_path` (its path under images/) is the
given one, else the URL's path without scheme and bucket. Lists are read in streaming batches
(pyarrow), so the driver holds one batch, not the list. Sizes are the list's (0 when absent):
no HEAD per object either. A URL that cannot be an output path fails alone (FailureCause.UNSAFE_PATH).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import posixpath
from collections.abc import Iterator
from urllib.parse import unquote_plus, urlsplit

import pyarrow.parquet as pq

from operators.items import UnsafePath, item_id, kind_of, safe_rel_path
from operators.rows import FailureCause
from operators.storage import filesystem, read_bytes

LIST_PREFIX = "list:"
BATCH_ROWS = 8192


class InputListError(ValueError):
    """A list that cannot be read (missing, no `url` column, an inventory in ORC)."""


def is_list_input(url: str) -> bool:
    return url.startswith(LIST_PREFIX) or is_inventory(url)


def is_inventory(url: str) -> bool:
    if url.startswith(LIST_PREFIX):
        return False
    return posixpath.basename(url.rstrip("/")) == "manifest.json"


def list_name(url: str) -> str:
    """The name an input list's items sit under when a job has several inputs."""
    path = url[len(LIST_PREFIX):] if url.startswith(LIST_PREFIX) else posixpath.dirname(url.rstrip("/"))
    return posixpath.splitext(posixpath.basename(path.rstrip("/")))[0] or "list"


def iter_list_rows(url: str, storage_options: dict | None = None, prefix: str = "") -> Iterator[dict]:
    """The rows of one list input (`list:FILE` or an inventory manifest), in list order."""
    entries = _inventory_entries(url, storage_options) if is_inventory(url) else \
        _list_entries(url[len(LIST_PREFIX):], storage_options)
    for source_url, member, rel_path, size in entries:
        yield list_row(source_url, member, rel_path, size, prefix)


def list_row(source_url: str, member: str, rel_path: str, size: int, prefix: str = "") -> dict:
    name = member or source_url
    raw = posixpath.join(prefix, rel_path or default_rel_path(source_url, member))
    status = cause = error = ""
    try:
        rel = safe_rel_path(raw)
    except UnsafePath as exc:
        rel, status, cause, error = raw, "failed", FailureCause.UNSAFE_PATH, str(exc)
    return {"item_id": item_id(source_url, member) if member else item_id(source_url), "source_url": source_url,
            "member": member, "rel_path": rel, "size": int(size or 0), "kind": kind_of(name), "status": status,
            "failure_cause": cause, "error": error}


def default_rel_path(source_url: str, member: str = "") -> str:
    """`s3://bucket/a/b.jpg` -> `a/b.jpg`; `/data/a/b.jpg` -> `data/a/b.jpg`; a member under its archive."""
    parts = urlsplit(source_url)
    path = parts.path if parts.scheme and parts.scheme != "file" else source_url.removeprefix("file://")
    rel = path.lstrip("/")
    return posixpath.join(rel, member) if member else rel


def _list_entries(path: str, storage_options: dict | None) -> Iterator[tuple[str, str, str, int]]:
    lower = path.lower()
    fs, p = filesystem(path, storage_options)
    if not fs.exists(p):
        raise InputListError(f"input list {path!r} does not exist")
    if lower.endswith(".parquet"):
        with fs.open(p, "rb") as f:
            yield from _parquet_entries(pq.ParquetFile(f), path)
    elif lower.endswith((".csv", ".csv.gz")):
        with fs.open(p, "rb") as raw:
            text = io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if lower.endswith(".gz") else raw, encoding="utf-8")
            reader = csv.DictReader(text)
            if "url" not in (reader.fieldnames or []):
                raise InputListError(f"input list {path!r}: no `url` column (columns: {reader.fieldnames})")
            for rec in reader:
                if rec.get("url"):
                    yield rec["url"].strip(), rec.get("member") or "", rec.get("rel_path") or "", \
                        int(rec.get("size") or 0)
    else:  # text: one URL per line; blank lines and # comments are skipped
        with fs.open(p, "rt", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line, "", "", 0


def _parquet_entries(pf: pq.ParquetFile, path: str) -> Iterator[tuple[str, str, str, int]]:
    names = set(pf.schema_arrow.names)
    if "url" not in names:
        raise InputListError(f"input list {path!r}: no `url` column (columns: {sorted(names)})")
    cols = [c for c in ("url", "member", "rel_path", "size") if c in names]
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
        d = batch.to_pydict()
        n = batch.num_rows
        for i in range(n):
            if d["url"][i]:
                yield d["url"][i], (d.get("member") or [""] * n)[i] or "", (d.get("rel_path") or [""] * n)[i] or "", \
                    int((d.get("size") or [0] * n)[i] or 0)


def _inventory_entries(url: str, storage_options: dict | None) -> Iterator[tuple[str, str, str, int]]:
    """Objects of an S3 Inventory: manifest.json names its data files (keys in the destination bucket)."""
    try:
        manifest = json.loads(read_bytes(url, storage_options))
    except FileNotFoundError:
        raise InputListError(f"inventory manifest {url!r} does not exist") from None
    fmt = str(manifest.get("fileFormat", "CSV")).upper()
    if fmt not in ("CSV", "PARQUET"):
        raise InputListError(f"inventory {url!r}: fileFormat {fmt} is not read (CSV or Parquet)")
    schema = [c.strip() for c in str(manifest.get("fileSchema", "")).split(",")]
    scheme = urlsplit(url).scheme or "s3"
    dest = str(manifest.get("destinationBucket", "")).rsplit(":", 1)[-1] or urlsplit(url).netloc
    for f in manifest.get("files", []):
        data_url = f"{scheme}://{dest}/{f['key']}"
        fs, p = filesystem(data_url, storage_options)
        with fs.open(p, "rb") as raw:
            if fmt == "PARQUET":
                pf = pq.ParquetFile(raw)
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["bucket", "key", "size"]):
                    d = batch.to_pydict()
                    for b, k, s in zip(d["bucket"], d["key"], d["size"], strict=True):
                        if not k.endswith("/"):
                            yield f"{scheme}://{b}/{k}", "", "", int(s or 0)
            else:  # CSV, gzip, no header, keys URL-encoded; columns as fileSchema says
                text = io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8")
                ib, ik = schema.index("Bucket"), schema.index("Key")
                isz = schema.index("Size") if "Size" in schema else None
                for rec in csv.reader(text):
                    key = unquote_plus(rec[ik])
                    if not key.endswith("/"):  # folder placeholders are no objects
                        yield f"{scheme}://{rec[ib]}/{key}", "", "", int(rec[isz] or 0) if isz is not None else 0
