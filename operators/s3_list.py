"""One S3 folder's LIST, parsed without botocore's response parser.

botocore turns each listed key's LastModified into a datetime with dateutil: 64 µs of CPU per key
measured (about 100 with s3fs's info dicts), so one driver process could not list more than
~10,000 keys a second however many LISTs were in flight (2.8 hours of CPU per billion keys just
parsing). Here the request is signed by s3fs's own client (a presigned ListObjectsV2 URL: the same
credentials, endpoint and requester-pays setting), fetched with urllib3 and read with ElementTree:
about 6 µs per key. Any answer but a 200 (or a proxy in the environment, which urllib3 would not
use) makes the caller fall back to `fs.ls`, which then raises the usual errors.
"""

from __future__ import annotations

import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from urllib.parse import unquote_plus

import urllib3
from fsspec.asyn import sync

Entry = tuple[str, int, tuple | None]  # (path, size, verdict) as in operators.sources
_HTTP = urllib3.PoolManager(maxsize=64, timeout=urllib3.Timeout(connect=10, read=120),
                            retries=urllib3.Retry(total=6, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504),
                                                  allowed_methods=None))


class NotListed(RuntimeError):
    """The fast path could not list the folder: list it with fs.ls instead."""


def can_list_fast(fs) -> bool:
    return "s3" in fs.protocol and not any(k in urllib.request.getproxies() for k in ("http", "https"))


def list_s3_folder(fs, folder: str) -> tuple[list[Entry], list[str]]:
    """(files, subfolders) directly under `folder` ("bucket/key/prefix"), every page of it."""
    files: list[Entry] = []
    dirs: list[str] = []
    for page_files, page_dirs in s3_pages(fs, folder):
        files += page_files
        dirs += page_dirs
    return files, dirs


def s3_pages(fs, folder: str, name_prefix: str = "") -> Iterator[tuple[list[Entry], list[str]]]:
    """(files, subfolders) of `folder` whose names start with `name_prefix`, one LIST page (up to
    1,000 keys) at a time: a caller that filters them holds one page, not the folder."""
    bucket, key, _ = fs.split_path(folder)
    prefix = key.rstrip("/") + "/" if key else ""
    token = ""
    while True:
        params = {"Bucket": bucket, "Prefix": prefix + name_prefix, "Delimiter": "/", "EncodingType": "url",
                  **fs.req_kw}
        if token:
            params["ContinuationToken"] = token
        url = sync(fs.loop, fs.s3.generate_presigned_url, "list_objects_v2", Params=params, ExpiresIn=900)
        answer = _HTTP.request("GET", url)
        if answer.status != 200:
            raise NotListed(f"LIST {bucket}/{prefix}{name_prefix}: HTTP {answer.status}")
        files: list[Entry] = []
        dirs: list[str] = []
        token = _read_page(ET.fromstring(answer.data), bucket, prefix, files, dirs)
        yield files, dirs
        if not token:
            return


def _read_page(root: ET.Element, bucket: str, prefix: str, files: list[Entry], dirs: list[str]) -> str:
    """Adds one ListObjectsV2 page's keys and common prefixes; returns the next page's token or ""."""
    token, truncated = "", False
    for node in root:
        tag = node.tag.rpartition("}")[2]
        if tag == "Contents":
            fields = {c.tag.rpartition("}")[2]: c.text or "" for c in node}
            name = unquote_plus(fields["Key"])
            if name != prefix:  # a folder's own marker key
                files.append((f"{bucket}/{name}", int(fields.get("Size") or 0), None))
        elif tag == "CommonPrefixes":
            sub = unquote_plus(next((c.text or "" for c in node), ""))
            dirs.append(f"{bucket}/{sub.rstrip('/')}")
        elif tag == "IsTruncated":
            truncated = (node.text or "").strip() == "true"
        elif tag == "NextContinuationToken":
            token = node.text or ""
    return token if truncated else ""
