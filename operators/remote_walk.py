"""Listing a remote folder tree (S3, GCS, Azure) with many LIST calls in flight.

One LIST is a round trip (20-50 ms on S3, more for a page of 1,000 keys) against a few
microseconds of CPU per key, so a sequential walk waits almost all the time. Here the tree is
fanned out by the delimiter (each folder's listing names its subfolders, S3's common prefixes)
and up to `LIST_THREADS` folders are listed at once, ahead of the one being yielded.

Threads in the driver, not Ray tasks: the work is waiting, which threads overlap at no CPU cost
and without starting worker processes (seconds each, taken from the pipeline on a small machine),
and the plan needs the entries in one stable order anyway (a resume recognises a finished shard by
the digest of its ids). The order is that of the sequential walk: depth first, folders and files
sorted. Memory is bounded: at most `LOOKAHEAD` listed folders wait to be yielded, and no listing
cache is kept (fsspec's dircache would hold every key of the job). On S3 a LIST is read without
botocore's parser (operators/s3_list.py: 6 µs of driver CPU per key instead of ~100).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from operators.rows import FailureCause
from operators.s3_list import can_list_fast, list_s3_folder

Entry = tuple[str, int, tuple | None]  # (path, size, verdict) as in operators.sources
LIST_THREADS = 16  # LIST calls in flight (botocore's pool allows 10 unless config_kwargs raise it)
LOOKAHEAD = 256  # listed folders waiting to be yielded, at most


def list_threads() -> int:
    """VEIL_LIST_THREADS, else 16 (1: the sequential walk, one LIST at a time)."""
    return max(1, int(os.environ.get("VEIL_LIST_THREADS") or LIST_THREADS))


def walk_remote(fs, root: str, threads: int | None = None) -> Iterator[Entry]:
    """Every file under `root`, folder by folder (files sorted within a folder), listed in parallel."""
    threads = threads or list_threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="veil-list") as pool:
        # the folders still to yield, next on top; each gets its listing future when near the top
        stack: list[list] = [[root.rstrip("/"), None]]
        while stack:
            for entry in stack[-min(LOOKAHEAD, threads * 4):]:
                if entry[1] is None:
                    entry[1] = pool.submit(_list_folder, fs, entry[0])
            folder, future = stack.pop()
            files, dirs = future.result()
            yield from files
            names = {f[0] for f in files}
            clashing = [d for d in dirs if d in names]  # S3: a key `x.jpg` and keys under `x.jpg/`
            for d in clashing:
                yield from _clashing_folder(fs, d, root)
            stack.extend([d, None] for d in sorted(set(dirs) - set(clashing), reverse=True))


def _list_folder(fs, folder: str) -> tuple[list[Entry], list[str]]:
    """(files, subfolders) of one folder: one LIST (more for a folder of over 1,000 keys)."""
    if can_list_fast(fs):
        try:
            files, dirs = list_s3_folder(fs, folder)
            return sorted(files, key=lambda f: f[0]), dirs
        except Exception:  # noqa: BLE001 - fs.ls lists it again, and raises what is really wrong
            pass
    try:
        listed = fs.ls(folder, detail=True)
    finally:
        fs.invalidate_cache(folder)  # the driver keeps no listing: it would grow with the job
    files, dirs = [], []
    for info in listed:
        name = info["name"].rstrip("/")
        if name == folder:  # a folder's own marker key (`folder/`)
            continue
        if info.get("type") == "directory":
            dirs.append(name)
        else:
            files.append((name, int(info.get("size") or 0), None))
    files.sort(key=lambda f: f[0])
    return files, dirs


def _clashing_folder(fs, folder: str, root: str) -> Iterator[Entry]:
    """The files under a folder that has the name of a file: each fails, its path is the file's."""
    for path in sorted(_files_under(fs, folder)):
        yield path, 0, _clash(path, folder, root)


def _clash(path: str, folder: str, root: str) -> tuple:
    return ("failed", FailureCause.OUTPUT_PATH_ERROR,
            f"output path {posixpath.relpath(path, root)!r} needs a folder where the "
            f"image {posixpath.relpath(folder, root)!r} is written")


def _files_under(fs, folder: str) -> Iterator[str]:
    """fs.find without its listing cache (such a folder is rare and small)."""
    files, dirs = _list_folder(fs, folder)
    yield from (f[0] for f in files)
    for d in dirs:
        yield from _files_under(fs, d)


def sequential_walk(fs, root: str) -> Iterator[Entry]:
    """The walk before parallel listing (fsspec `walk`, one LIST at a time): kept for the benchmark."""
    for folder, dirs, files in fs.walk(root, detail=True):
        for name in sorted(files):
            yield posixpath.join(folder, name), int(files[name].get("size") or 0), None
        if isinstance(dirs, dict):
            for name in list(dirs):
                if name in files:
                    for path in sorted(fs.find(posixpath.join(folder, name))):
                        yield path, 0, _clash(path, posixpath.join(folder, name), root)
                    del dirs[name]
