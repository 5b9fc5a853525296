"""Expand archives (zip, 7z, rar) into one item row per member, and read any member by itself.

The expand stage runs as a Ray Data `flat_map`, so archives are listed in parallel on the
workers, never on the driver. Listing reads headers only, through fsspec ranged reads (a zip's
central directory, a 7z's end header, RAR's per-file headers); nothing downloads a whole archive
when the format allows random access.

Where a member's bytes travel (the choice documented in DESIGN.md's "expand" step):
- a member that can be read alone (zip; non-solid 7z/RAR) leaves expand with empty `data`;
  prepare calls `read_member`, which does a ranged read of that member only, so one archive is
  spread over the whole cluster;
- members of a solid block (7z folder, solid RAR), of a nested archive, and encrypted members
  (the password stays in this stage) are read here, front to back in one pass, and carried in
  the row's `data`. The generator yields one row at a time and Ray cuts its output into blocks
  by size, so a worker holds about one output block plus one member, whatever the archive size.

Every member row has the same keys and types as a listing row (Arrow blocks need one schema).
A member that cannot be used becomes a row with status `failed` / `skipped`, a `failure_cause`
and an `error`; those rows flow through the later stages untouched.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

from operators.archive_formats import (
    Encrypted,
    Member,
    TooLarge,
    detect_format,
    rar_volume_number,
)
from operators.archive_open import (
    CACHE_LOCK,
    DEFAULT_MAX_MEMBER_BYTES,
    ArchiveOptions,
    OpenArchive,
    cached_archive,
    open_reader,
)
from operators.items import UnsafePath, item_id, kind_of, safe_rel_path
from operators.rows import VERDICT_DEFAULTS, FailureCause, Status, failure_cause

NEST = "!/"  # separates the members of nested archives in `member`: "inner.zip!/cam/1.jpg"
RATIO_FLOOR = 1 << 20  # members smaller than this are too small to be bombs: ratio not checked


def normalize_row(row: dict) -> dict:
    """The row with the status/failure/data keys every stage after listing relies on."""
    out = dict(row)
    for key, value in VERDICT_DEFAULTS.items():
        if out.get(key) is None:
            out[key] = value
    return out


def expand_rows(row: dict, options: ArchiveOptions) -> Iterator[dict]:
    """The flat_map function: a non-archive row passes through; an archive becomes its members."""
    row = normalize_row(row)
    if row["kind"] != "archive" or row["status"] != Status.UNDECIDED:
        yield row
    elif options.depth < 1:
        yield _verdict(row, Status.SKIPPED, "", "archive not expanded (--archive-depth 0)")
    else:
        yield from iter_archive(row, options)


def expand_archive(row: dict, options: ArchiveOptions) -> list[dict]:
    """All rows of one archive source row (see `iter_archive`)."""
    return list(iter_archive(normalize_row(row), options))


def iter_archive(row: dict, options: ArchiveOptions) -> Iterator[dict]:
    """Item rows for the members of one archive, then failure rows for what could not be listed."""
    url = row["source_url"]
    if rar_volume_number(url) > 1:
        yield _verdict(row, Status.SKIPPED, "", "continuation volume of a multi-volume RAR (read with part1)")
        return
    try:
        opened = OpenArchive(url, options, spill_solid=True)
    except Exception as exc:  # not an archive, truncated, unknown format, encrypted...: the archive fails alone
        yield _failure(row, exc, "cannot open archive: ")
        return
    try:
        yield from _walk(opened.handle, row, "", row["rel_path"], 1, opened.spilled, options)
    finally:
        opened.close()


def _walk(
    handle, base: dict, chain: str, rel_root: str, level: int, inline_all: bool, options: ArchiveOptions
) -> Iterator[dict]:
    try:
        members = handle.members()
    except Exception as exc:
        yield _verdict(
            _member_row(base, chain, rel_root, 0), Status.FAILED, FailureCause.ARCHIVE_ERROR,
            f"cannot list members: {_describe(exc)}")
        return
    if not any(not m.is_dir for m in members) and not getattr(handle, "stopped", ""):  # an empty archive's row
        yield _verdict(base, Status.SKIPPED, "", "empty archive (no members)")
        return
    total, taken, seen = 0, set(), {}
    images = _image_paths(members)
    to_read: dict[int, list[tuple[Member, dict]]] = {}
    for m in members:
        if m.is_dir:
            continue
        row = _member_row(base, chain + m.name, rel_root, m.size)
        seen[m.name] = seen.get(m.name, 0) + 1
        if seen[m.name] > 1:  # a repeated name: its own id, so that each member keeps its row
            row["item_id"] = item_id(base["source_url"], f"{chain}{m.name}\0{seen[m.name]}")
        try:
            rel = safe_rel_path(m.name)
            if NEST in m.name:
                raise UnsafePath(f"{NEST!r} in name {m.name!r} (reserved for nested archives)")
        except UnsafePath as exc:
            yield _verdict(row, Status.FAILED, FailureCause.UNSAFE_PATH, str(exc))
            continue
        row.update(rel_path=f"{rel_root}/{rel}", kind=kind_of(rel))
        if m.is_symlink:
            yield _verdict(row, Status.FAILED, FailureCause.UNSAFE_PATH, f"{m.name!r} is a symbolic link")
            continue
        if row["rel_path"] in taken:
            yield _verdict(row, Status.FAILED, FailureCause.OUTPUT_PATH_ERROR,
                           f"{m.name!r} repeats an earlier member's path")
            continue
        parent = next((p for p in _parents(rel) if p in images), "")
        if parent:  # members "x.jpg" and "x.jpg/y.jpg": one path cannot be a file and a folder
            yield _verdict(row, Status.FAILED, FailureCause.OUTPUT_PATH_ERROR,
                           f"{m.name!r} needs a folder where the image {parent!r} is written")
            continue
        taken.add(row["rel_path"])
        over = _over_limit(m, total if row["kind"] != "other" else 0, options)
        if over:  # before the kind check: a 4 GiB "readme" is worth reporting as what it is
            yield _verdict(row, Status.FAILED, FailureCause.TOO_LARGE, over)
            continue
        if row["kind"] == "other":
            yield _verdict(row, Status.SKIPPED, "", "not an image")
            continue
        if m.encrypted and not options.password:
            yield _verdict(row, Status.FAILED, FailureCause.ENCRYPTED,
                           f"{m.name!r} is encrypted (give --archive-password)")
            continue
        total += m.size  # only what is read counts towards --max-archive-bytes
        if row["kind"] == "archive" and level >= options.depth:
            yield _verdict(row, Status.SKIPPED, "", f"nested archive beyond --archive-depth {options.depth}")
        elif row["kind"] == "archive":
            yield from _nested(handle, m, row, level, options)
        elif inline_all or m.block >= 0 or m.encrypted:
            to_read.setdefault(m.block, []).append((m, row))
        else:
            yield row
    for block in to_read.values():
        rows = {m.name: row for m, row in block}
        for name, got in handle.iter_block(list(rows), options.max_member_bytes):
            row = rows.pop(name, None)
            if row is not None:
                yield row | {"data": got} if isinstance(got, bytes) else _failure(row, got)
        for row in rows.values():  # the block ended early (a corrupt or truncated archive)
            yield _verdict(row, Status.FAILED, FailureCause.ARCHIVE_ERROR, "member missing from its block")
    stopped = getattr(handle, "stopped", "")
    if stopped:  # RAR: a bad header cut the listing short; what came before it is listed above
        yield _verdict(
            _member_row(base, chain, rel_root, 0), Status.FAILED, FailureCause.ARCHIVE_ERROR,
            f"listing stopped early: {stopped}")


def _image_paths(members: list[Member]) -> set[str]:
    """Safe relative paths of the image members: the output files of this archive level."""
    out = set()
    for m in members:
        try:
            rel = safe_rel_path(m.name)
        except UnsafePath:
            continue
        if not m.is_dir and kind_of(rel) == "image":
            out.add(rel)
    return out


def _parents(rel: str) -> list[str]:
    return [rel[:i] for i, ch in enumerate(rel) if ch == "/"]


def _nested(handle, m: Member, row: dict, level: int, options: ArchiveOptions) -> Iterator[dict]:
    """An archive inside an archive: read it whole (it is at most --max-member-bytes) and walk it."""
    try:
        data = handle.read(m.name, options.max_member_bytes)
        fmt = detect_format(data[:8], m.name)
        inner = open_reader(fmt, io.BytesIO(data), options.password) if fmt else None
        if inner is None:
            raise ValueError("unknown archive format")
    except Exception as exc:
        yield _failure(row, exc)
        return
    try:
        yield from _walk(inner, row, row["member"] + NEST, row["rel_path"], level + 1, True, options)
    finally:
        inner.close()


def read_member(
    row: dict, storage_options: dict | None = None, password: str = "", max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> bytes:
    """The bytes of one archive member (row["member"], nested members joined by NEST).

    Ranged reads through a small per-process cache of open archives, so the members of one
    archive that land on the same worker share one central directory read.
    """
    if row.get("data"):
        return row["data"]
    options = ArchiveOptions(
        password=password, max_member_bytes=max_member_bytes, storage_options=dict(storage_options or {})
    )
    parts = row["member"].split(NEST)
    with CACHE_LOCK:
        handle = cached_archive(row["source_url"], options).handle
        data = handle.read(parts[0], max_member_bytes)
    for part in parts[1:]:
        fmt = detect_format(data[:8], part)
        if fmt is None:
            raise ValueError(f"nested member {part!r}: unknown archive format")
        inner = open_reader(fmt, io.BytesIO(data), password)
        try:
            data = inner.read(part, max_member_bytes)
        finally:
            inner.close()
    return data


def read_member_head(row: dict, n: int, storage_options: dict | None = None, password: str = "") -> bytes:
    """About the first `n` bytes of a member (image headers, for quotes). A zip member is
    decompressed only as far as needed through the readahead file; other formats (solid blocks,
    RAR tools, nested archives) cannot stop early and read the whole member."""
    if row.get("data"):
        return row["data"][:n]
    if NEST not in row["member"]:
        options = ArchiveOptions(password=password, storage_options=dict(storage_options or {}))
        with CACHE_LOCK:
            handle = cached_archive(row["source_url"], options).handle
            if hasattr(handle, "read_head"):
                return handle.read_head(row["member"], n)
    return read_member(row, storage_options, password)[:n]


def _over_limit(m: Member, total: int, o: ArchiveOptions) -> str:
    if m.size > o.max_member_bytes:
        return f"{m.name!r} declares {m.size} bytes, over --max-member-bytes ({o.max_member_bytes})"
    if total + m.size > o.max_archive_bytes:
        return f"archive passes --max-archive-bytes ({o.max_archive_bytes}) uncompressed at {m.name!r}"
    ratio = m.size / m.csize if m.csize else m.block_ratio
    if m.size >= RATIO_FLOOR and ratio > o.max_compression_ratio:
        return f"{m.name!r} compression ratio {ratio:.0f} is over --max-compression-ratio ({o.max_compression_ratio:g})"
    return ""


def _member_row(base: dict, member: str, rel_path: str, size: int) -> dict:
    return base | {
        "item_id": item_id(base["source_url"], member),
        "member": member,
        "rel_path": rel_path,
        "size": int(size),
        "kind": base["kind"],
        **VERDICT_DEFAULTS,
    }


def _verdict(row: dict, status: str, cause: str, error: str) -> dict:
    return row | {"status": status, "failure_cause": cause, "error": error, "data": b""}


def _failure(row: dict, exc: BaseException, what: str = "") -> dict:
    """The failed row of a member (or archive) that raised `exc`: its cause (operators.rows), ARCHIVE_ERROR
    unless the exception says otherwise."""
    cause = failure_cause(exc, FailureCause.ARCHIVE_ERROR)
    named = isinstance(exc, TooLarge | Encrypted)  # their message says it all
    return _verdict(row, Status.FAILED, cause, str(exc) if named else what + _describe(exc))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
