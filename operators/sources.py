"""List the inputs: expand files, folders, globs and fsspec URLs into one row per source file.

Listing is ours (fsspec `find`/`glob`), not Ray's metadata resolution, which is slow on large
prefixes. Each row names the source, its kind (image / archive / other) and its path relative to
its input root, which becomes its path under OUTPUT/JOB_ID/images/.
"""

from __future__ import annotations

import os
import posixpath
import stat

from operators.items import UnsafePath, item_id, kind_of, safe_rel_path
from operators.rows import FailureCause
from operators.storage import filesystem, is_local

GLOB_CHARS = "*?["


class InputError(ValueError):
    """An input that cannot be used: refused before any work starts."""


def list_sources(inputs: list[str], storage_options: dict | None = None) -> list[dict]:
    """One row per file under `inputs`, sorted per input, with a unique `rel_path`.

    With several inputs, each one's files sit under the input's own name (`a/x.jpg`, `b/x.jpg`),
    so two inputs never write to the same output path. Every entry found gets a row: a name that
    cannot be an output path, a link out of the input, a FIFO or an output-path collision is a
    row decided here (failed or skipped, with its cause), never an error that stops the job.
    """
    rows: list[dict] = []
    taken: set[str] = set()
    for url in inputs:
        fs, root, files = _expand(url, storage_options)
        prefix = _unique_prefix(posixpath.basename(root.rstrip("/")) or "input", taken) if len(inputs) > 1 else ""
        for path, size, verdict in files:
            rel = posixpath.relpath(path, root) if root else posixpath.basename(path)
            source_url = fs.unstrip_protocol(path) if "://" in url else path
            status, cause, error = verdict or ("", "", "")
            try:
                rel_path = safe_rel_path(posixpath.join(prefix, rel))
            except UnsafePath as exc:  # e.g. a newline in a file name: this file fails, the rest runs
                rel_path, cause, error = posixpath.join(prefix, rel), FailureCause.UNSAFE_PATH, str(exc)
                status = "failed"
            rows.append(
                {
                    "item_id": item_id(source_url),
                    "source_url": source_url,
                    "member": "",
                    "rel_path": rel_path,
                    "size": int(size or 0),
                    "kind": kind_of(path),
                    # a verdict reached before prepare (archive expand); "" = not decided yet
                    "status": status,
                    "failure_cause": cause,
                    "error": error,
                }
            )
    return refuse_collisions(rows)


def refuse_collisions(rows: list[dict]) -> list[dict]:
    """Fail (FailureCause.OUTPUT_PATH_ERROR) each row whose output path is already another row's (a file
    `a\\b.jpg` beside a folder `a/b.jpg`: backslashes read as separators) or lies under an image
    row's path (S3 keys `x.jpg` and `x.jpg/y.jpg`: a file and a folder of one name). The first
    row in listing order keeps the path; nothing is overwritten silently."""
    owners: dict[str, str] = {}
    files = {r["rel_path"] for r in rows if r["kind"] == "image" and not r["status"]}
    ids: set[str] = set()
    for r in rows:
        if r["item_id"] in ids:  # one file named by two inputs (`in/` and `in/sub/`): one item
            r.update(item_id=item_id(r["source_url"], "\0" + r["rel_path"]), status="skipped", failure_cause="",
                     error="the same file is listed by an earlier input")
        ids.add(r["item_id"])
        if r["status"] == "failed" and r["failure_cause"] == FailureCause.UNSAFE_PATH:
            continue  # its rel_path is not a path anyone writes to
        rel, clash = r["rel_path"], ""
        if rel in owners:
            clash = f"output path {rel!r} is already that of {owners[rel]!r}"
        else:
            parents = [rel[:i] for i, ch in enumerate(rel) if ch == "/"]
            parent = next((p for p in parents if p in files), "")
            if parent:
                clash = f"output path {rel!r} needs a folder where the image {parent!r} is written"
        if clash and not r["status"]:
            r.update(status="failed", failure_cause=FailureCause.OUTPUT_PATH_ERROR, error=clash)
        owners.setdefault(rel, r["source_url"])
    return rows


def _expand(url: str, storage_options: dict | None):
    """(fs, root folder, [(path, size, verdict)]) for one input URL; InputError if it names
    nothing. `verdict`: None, or (status, cause, error) for an entry that cannot be read."""
    fs, path = filesystem(url, storage_options)
    local = is_local(url)
    if any(ch in path for ch in GLOB_CHARS):
        root = path[: min(path.find(ch) for ch in GLOB_CHARS if ch in path)].rsplit("/", 1)[0]
        found = fs.glob(path, detail=True)
        files = sorted(_entries(found, root, local))
        if not files:
            raise InputError(f"input {url!r}: the pattern matches no file")
        return fs, root, files
    if fs.isdir(path):
        if local:
            return fs, path.rstrip("/"), local_tree(path.rstrip("/"))
        found = fs.find(path, detail=True)
        return fs, path.rstrip("/"), sorted(_entries(found, path.rstrip("/"), local))
    if fs.isfile(path):
        return fs, posixpath.dirname(path), [(path, fs.size(path), None)]
    raise InputError(f"input {url!r} does not exist")


def _entries(found: dict, root: str, local: bool) -> list[tuple[str, int, tuple | None]]:
    out = []
    for p, info in found.items():
        if info.get("type") == "file":
            out.append((p, info.get("size"), None))
        elif local and info.get("type") == "other":  # a link, a FIFO, a device
            out.append(local_entry(p, os.path.realpath(root)))
    return out


def local_tree(root: str) -> list[tuple[str, int, tuple | None]]:
    """Every entry under a local folder, sorted, with a verdict for those that are not regular
    files. Symbolic links are followed when their target is inside the input (a link to a file
    is read like the file; a link to a folder is skipped: its files are listed under their own
    path); a link out of the input is refused (FailureCause.UNSAFE_PATH), so an input folder cannot leak
    files it does not hold. Folder links are never descended, so loops cannot hang the listing."""
    real_root = os.path.realpath(root)
    out = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in sorted(names + links):
            out.append(local_entry(os.path.join(folder, name), real_root))
        dirs[:] = sorted(d for d in dirs if d not in links)
    return sorted(out)


def local_entry(path: str, real_root: str) -> tuple[str, int, tuple | None]:
    """(path, size, verdict) of one local entry: None for a readable file or a link to one."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(path, strict=True)
            if os.path.commonpath([target, real_root]) != real_root:
                return path, 0, ("failed", FailureCause.UNSAFE_PATH,
                                 f"symbolic link to {target!r}, outside the input (not followed)")
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                return path, 0, ("skipped", "", f"symbolic link to the folder {target!r} inside the input: "
                                 "its files are listed under their own path")
        if not stat.S_ISREG(st.st_mode):
            return path, 0, ("skipped", "", f"not a regular file ({_file_type(st.st_mode)})")
        return path, st.st_size, None
    except FileNotFoundError:
        return path, 0, ("failed", FailureCause.TASK_FILE_DOESNT_EXIST, "symbolic link to a missing target")
    except OSError as exc:  # ELOOP: a link loop
        return path, 0, ("failed", FailureCause.UNSAFE_PATH, f"symbolic link cannot be resolved ({exc.strerror})")


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _unique_prefix(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}~{n}"
    taken.add(candidate)
    return candidate


def check_output_outside_inputs(inputs: list[str], output: str, storage_options: dict | None = None) -> None:
    """Refuse an OUTPUT inside an INPUT: the job would list and re-anonymize its own results."""
    out_fs, out_path = filesystem(output, storage_options)
    out_path = out_path.rstrip("/") + "/"
    for url in inputs:
        fs, path = filesystem(url, storage_options)
        if type(fs) is not type(out_fs):
            continue
        if any(ch in path for ch in GLOB_CHARS):
            path = path[: min(path.find(ch) for ch in GLOB_CHARS if ch in path)].rsplit("/", 1)[0]
        elif not fs.isdir(path):
            continue
        root = path.rstrip("/") + "/"
        if out_path.startswith(root):
            raise InputError(f"output {output!r} is inside input {url!r}; choose an output outside it")
