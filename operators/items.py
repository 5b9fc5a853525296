"""What an item is: its stable id, its safe relative output path, and the formats veil reads."""

from __future__ import annotations

import hashlib
import posixpath
import re

IMAGE_FORMATS = {  # extension -> format name (output keeps the input's format)
    ".jpg": "jpeg", ".jpeg": "jpeg", ".jpe": "jpeg",
    ".png": "png", ".bmp": "bmp", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff",
}
ARCHIVE_EXTENSIONS = (".zip", ".7z", ".rar", ".cbz", ".cbr", ".cb7")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")  # issue 21: one item per video


class UnsafePath(ValueError):
    """A member or file name that cannot be made into a path inside the job folder."""


def item_id(source_url: str, member: str = "") -> str:
    """Stable id of (source url, member path): the same item gets the same id in every run."""
    return hashlib.sha256(f"{source_url}\0{member}".encode()).hexdigest()[:20]


def kind_of(name: str) -> str:
    """"image", "archive", "video" or "other", from the name alone (content is checked when read)."""
    lower = name.lower()
    if lower.endswith(ARCHIVE_EXTENSIONS):
        return "archive"
    if lower.endswith(VIDEO_EXTENSIONS):
        return "video"
    return "image" if posixpath.splitext(lower)[1] in IMAGE_FORMATS else "other"


def format_from_name(name: str) -> str | None:
    return IMAGE_FORMATS.get(posixpath.splitext(name.lower())[1])


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes really hold, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


_DRIVE = re.compile(r"^[a-zA-Z]:")


def safe_rel_path(name: str) -> str:
    """A relative POSIX path that stays inside the output folder, or UnsafePath.

    Refused rather than rewritten: `..` components, absolute paths, drive letters, NUL and
    other control characters. Backslashes are read as separators (Windows-made archives) and
    then checked like any other path.
    """
    if any(ord(ch) < 32 for ch in name):
        raise UnsafePath(f"control character in name {name!r}")
    path = name.replace("\\", "/")
    if path.startswith("/") or _DRIVE.match(path):
        raise UnsafePath(f"absolute path {name!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePath(f"parent-directory component in {name!r}")
    if not parts:
        raise UnsafePath(f"empty path {name!r}")
    return "/".join(parts)
