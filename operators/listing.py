"""Streaming listing: the rows of `sources.list_sources`, one folder at a time, never all at once.

`list_sources` sorts each input's whole listing and checks output-path collisions against every
row seen (a set of all paths): memory in the driver grows with the job. Here each folder is listed
(os.walk locally; elsewhere one LIST per folder, many in flight: operators/remote_walk.py) and its
rows yielded before the next is read, so memory is that of the largest folders. Item ids are the same as list_sources'.

Collisions are found without a set of every path, from where they can come from:
- a name that `safe_rel_path` rewrites (`a\\b.jpg` -> `a/b.jpg`) can take another file's path: it
  yields to a real file at that path (asked of the filesystem: such names are rare), and the
  rewritten paths kept (few) make a later plain file of that path fail, as before;
- a file and a folder of one name (S3 keys `x.jpg` and `x.jpg/y.jpg`) meet in one folder listing;
- one file named by two inputs (`in/` and `in/sub/`): only then are item ids kept in a set.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator

from operators.input_lists import is_list_input, iter_list_rows, list_name
from operators.items import UnsafePath, item_id, kind_of, safe_rel_path
from operators.remote_walk import walk_remote
from operators.rows import FailureCause
from operators.sources import GLOB_CHARS, InputError, _entries, _unique_prefix, local_entry
from operators.storage import filesystem, is_local

Entry = tuple[str, int, tuple | None]  # (path, size, verdict) as in operators.sources


def iter_sources(inputs: list[str], storage_options: dict | None = None) -> Iterator[dict]:
    """The rows list_sources would give (same ids, paths and verdicts), streamed folder by folder."""
    taken: set[str] = set()
    roots = [_root_of(url, storage_options) for url in inputs if not is_list_input(url)]
    ids: set[str] | None = set() if _overlapping(roots) else None
    for url in inputs:
        if is_list_input(url):  # no listing: the list names the items (operators/input_lists.py)
            prefix = _unique_prefix(list_name(url), taken) if len(inputs) > 1 else ""
            yield from iter_list_rows(url, storage_options, prefix)
            continue
        fs, root, entries = _expand_stream(url, storage_options)
        prefix = _unique_prefix(posixpath.basename(root.rstrip("/")) or "input", taken) if len(inputs) > 1 else ""
        guard = _Collisions(fs, root)
        for path, size, verdict in entries:
            rel = posixpath.relpath(path, root) if root else posixpath.basename(path)
            source_url = fs.unstrip_protocol(path) if "://" in url else path
            status, cause, error = verdict or ("", "", "")
            raw = posixpath.join(prefix, rel)
            try:
                rel_path = safe_rel_path(raw)
            except UnsafePath as exc:
                rel_path, status, cause, error = raw, "failed", FailureCause.UNSAFE_PATH, str(exc)
            row = {"item_id": item_id(source_url), "source_url": source_url, "member": "", "rel_path": rel_path,
                   "size": int(size or 0), "kind": kind_of(path), "status": status, "failure_cause": cause,
                   "error": error}
            if ids is not None:
                if row["item_id"] in ids:
                    row.update(item_id=item_id(source_url, "\0" + rel_path), status="skipped", failure_cause="",
                               error="the same file is listed by an earlier input")
                ids.add(row["item_id"])
            if not (status == "failed" and cause == FailureCause.UNSAFE_PATH):
                clash = guard.check(rel_path, raw, posixpath.join(prefix, ""))
                if clash and not row["status"]:
                    row.update(status="failed", failure_cause=FailureCause.OUTPUT_PATH_ERROR, error=clash)
            yield row


class _Collisions:
    """Output-path clashes within one input, with memory for the rare rewritten names only."""

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root.rstrip("/")
        self.rewritten: dict[str, str] = {}  # rel_path -> the rewritten name that took it

    def check(self, rel_path: str, raw: str, prefix: str) -> str:
        """Why `rel_path` (made from the name `raw`) cannot be written, or ""."""
        inside = rel_path[len(prefix):] if prefix and rel_path.startswith(prefix) else rel_path
        if rel_path in self.rewritten:
            return f"output path {rel_path!r} is already that of {self.rewritten[rel_path]!r}"
        parent = ""
        if rel_path != raw:  # safe_rel_path rewrote the name: it may now be another file's path
            real = posixpath.join(self.root, inside)
            if self.fs.isfile(real):
                return f"output path {rel_path!r} is already that of {real!r}"
            inner = [inside[:i] for i, ch in enumerate(inside) if ch == "/"]
            real_parent = next((p for p in inner if kind_of(p) == "image" and self.fs.isfile(
                posixpath.join(self.root, p))), "")
            if real_parent:
                parent = prefix + real_parent
            if not parent:
                self.rewritten[rel_path] = raw
        if parent:
            return f"output path {rel_path!r} needs a folder where the image {parent!r} is written"
        return ""


def _root_of(url: str, storage_options: dict | None) -> str:
    fs, path = filesystem(url, storage_options)
    if any(ch in path for ch in GLOB_CHARS):
        path = path[: min(path.find(ch) for ch in GLOB_CHARS if ch in path)].rsplit("/", 1)[0]
    return f"{type(fs).__name__}:{path.rstrip('/')}/"


def _overlapping(roots: list[str]) -> bool:
    """Whether an input lies inside another (then one file can be listed twice)."""
    return any(a != b and b.startswith(a) for a in roots for b in roots) or len(set(roots)) < len(roots)


def _expand_stream(url: str, storage_options: dict | None):
    """(fs, root, iterator of entries) for one input: list_sources' _expand, streamed."""
    fs, path = filesystem(url, storage_options)
    local = is_local(url)
    if any(ch in path for ch in GLOB_CHARS):  # a pattern: listed whole (patterns name few files)
        root = path[: min(path.find(ch) for ch in GLOB_CHARS if ch in path)].rsplit("/", 1)[0]
        files = sorted(_entries(fs.glob(path, detail=True), root, local))
        if not files:
            raise InputError(f"input {url!r}: the pattern matches no file")
        return fs, root, iter(files)
    if fs.isdir(path):
        root = path.rstrip("/")
        return fs, root, (walk_local(root) if local else walk_remote(fs, root))  # remote: parallel LISTs
    if fs.isfile(path):
        return fs, posixpath.dirname(path), iter([(path, fs.size(path), None)])
    raise InputError(f"input {url!r} does not exist")


def walk_local(root: str) -> Iterator[Entry]:
    """local_tree's entries (links followed inside the input, refused out of it), folder by folder."""
    real_root = os.path.realpath(root)
    for folder, dirs, names in os.walk(root, followlinks=False):
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in sorted(names + links):
            yield local_entry(os.path.join(folder, name), real_root)
        dirs[:] = sorted(d for d in dirs if d not in links)
