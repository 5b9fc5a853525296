"""`--repack zip`: archive in, archive out. The anonymized members of one input archive are
streamed into one zip under `OUTPUT/JOB_ID/archives/`, keeping their paths inside the archive.

Only members that ended `done` go in (anonymized, or unchanged when nothing was found): a member
that failed or was skipped was not anonymized, so copying it would leak what the job exists to
hide. Members are stored, not deflated (JPEG/PNG do not compress further), and copied in 1 MiB
chunks, so memory stays flat whatever the archive size. A remote zip becomes visible only when
its multipart upload completes; a local one is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
import zipfile

from operators.storage import filesystem, is_local, join

CHUNK = 1 << 20


def repacked_name(archive_rel: str) -> str:
    """`batch-07.zip` stays; `drive.7z` becomes `drive.7z.zip` (the input's name stays visible)."""
    return archive_rel if archive_rel.lower().endswith(".zip") else archive_rel + ".zip"


def repack_archive(
    archive_rel: str, members: list[tuple[str, str]], job_root: str, storage_options: dict | None = None
) -> dict:
    """Write `members` ((name inside the zip, URL of the anonymized file)) as one zip; returns
    {archive, url, members, bytes}."""
    url = join(job_root, "archives", repacked_name(archive_rel))
    fs, path = filesystem(url, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    target = f"{path}.tmp-{uuid.uuid4().hex}" if is_local(url) else path
    stamp = time.localtime()[:6]
    written = 0
    try:
        with fs.open(target, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, source in members:
                sfs, spath = filesystem(source, storage_options)
                info = zipfile.ZipInfo(name, date_time=stamp)
                info.file_size = sfs.size(spath)
                with sfs.open(spath, "rb") as src, z.open(info, "w", force_zip64=info.file_size >= 2**31) as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                written += info.file_size
        if target != path:
            os.replace(target, path)
    finally:
        if target != path and os.path.exists(target):
            os.remove(target)
    return {"archive": archive_rel, "url": url, "members": len(members), "bytes": written}


def members_by_archive(images_rows: list[dict], archives: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """Group the done member rows of the manifest by their archive's rel path.

    `archives`: {archive source URL: its rel path}. The name inside the zip is the member's path
    below the archive (nested archives flattened: `inner.zip/cam/1.jpg`)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for r in sorted(images_rows, key=lambda r: r["rel_path"]):
        rel = archives.get(r["source_url"])
        if rel is None or not r["member"] or r["status"] != "done" or not r["output_url"]:
            continue
        out.setdefault(rel, []).append((r["rel_path"][len(rel) + 1:], r["output_url"]))
    return out
