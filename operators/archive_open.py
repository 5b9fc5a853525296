"""Open an archive for reading, wherever it is: a local file, or ranged reads through fsspec (a
remote RAR the extraction tool needs is copied to a temp folder first); the reader for its format
(`READERS`); a small per-process cache of open archives, so the members of one archive that land on
the same worker share one header read. operators/archives.py expands and reads members through it."""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field

from operators.archive_7z_rar import RarArchive, SevenZipArchive
from operators.archive_formats import TooLarge, ZipArchive, detect_format, rar_volume_number
from operators.archive_zipscan import ScannedZip
from operators.storage import filesystem, is_local

GiB = 1 << 30
DEFAULT_MAX_MEMBER_BYTES = 2 * GiB
DEFAULT_MAX_ARCHIVE_BYTES = 1024 * GiB
DEFAULT_MAX_COMPRESSION_RATIO = 100.0  # JPEG ~1, PNG/BMP street scenes < 10; deflate bombs ~1000
READ_BLOCK = 64 * 1024  # fsspec readahead for header reads (zipfile reads a whole central directory at once)
READERS = {"zip": ZipArchive, "7z": SevenZipArchive, "rar": RarArchive}


@dataclass(frozen=True)
class ArchiveOptions:
    depth: int = 1  # archives inside archives are expanded up to this level; 0 = archives skipped
    password: str = ""
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES
    max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO
    storage_options: dict = field(default_factory=dict)


def open_reader(fmt: str, src, password: str = "", fetch=None):
    """The reader for `fmt` over `src` (a seekable file, or a local path for RAR). A zip whose
    central directory cannot be read is walked by its local headers instead (ScannedZip)."""
    if fmt != "zip":
        return READERS[fmt](src, password)
    try:
        return ZipArchive(src, password, fetch=fetch)
    except zipfile.BadZipFile:
        size = src.seek(0, 2)
        return ScannedZip(src, size, password)


class OpenArchive:
    """An archive open for reading: the back end plus what must be closed or deleted with it."""

    def __init__(self, url: str, options: ArchiveOptions, spill_solid: bool):
        self.files: list = []
        self.tmpdir = ""
        self.spilled = False
        fs, path = filesystem(url, options.storage_options)
        local = is_local(url)
        f = fs.open(path, "rb") if local else fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead")
        self.files.append(f)
        fmt = detect_format(f.read(8), path)
        f.seek(0)
        if fmt is None:
            self.close()
            raise ValueError("not a zip, 7z or rar archive")
        try:
            if fmt == "rar" and local:  # the tool reads the file itself; volumes are found beside it
                self.close()
                self.handle = READERS[fmt](path, options.password)
            elif fmt == "zip":
                self.handle = open_reader(fmt, f, options.password, fetch=_ranged(fs, path))
            else:
                self.handle = READERS[fmt](f, options.password)
            if fmt == "rar" and not local and (rar_volume_number(path) or (spill_solid and self.handle.solid)):
                self.handle.close()
                self.handle = READERS[fmt](self._spill(fs, path, options), options.password)
                self.spilled = True
        except BaseException:
            self.close()
            raise

    def _spill(self, fs, path: str, options: ArchiveOptions) -> str:
        """Copy a remote RAR (or its volume set) to a temp folder: the tool needs local files.
        Bounded by --max-archive-bytes and by the free temp space; deleted in close()."""
        self.close()
        number = rar_volume_number(path)
        paths = [path]
        if number:
            stem = path[: path.lower().rfind(".part")]
            paths = sorted(p for p in fs.glob(stem + ".part*.rar") if rar_volume_number(p))
        size = sum(fs.size(p) for p in paths)
        if size > options.max_archive_bytes:
            raise TooLarge(f"RAR of {size} bytes is over --max-archive-bytes ({options.max_archive_bytes})")
        self.tmpdir = tempfile.mkdtemp(prefix="veil-rar-")
        if shutil.disk_usage(self.tmpdir).free < size + (256 << 20):
            raise OSError(f"not enough temp space to spill a {size}-byte RAR")
        for p in paths:
            fs.get_file(p, os.path.join(self.tmpdir, posixpath.basename(p)))
        return os.path.join(self.tmpdir, posixpath.basename(path))

    def close(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.close()
        for f in self.files:
            f.close()
        self.files = []
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = ""


def _ranged(fs, path: str):
    size = fs.size(path)
    return lambda start, end: fs.cat_file(path, start=start, end=min(end, size))


_CACHE: OrderedDict = OrderedDict()
CACHE_LOCK = threading.Lock()  # held while a cached archive is used: its reader is not thread-safe
CACHE_SIZE = 4  # open archives per worker process (each holds its member index)


def cached_archive(url: str, options: ArchiveOptions) -> OpenArchive:
    key = (url, repr(sorted(options.storage_options.items())), options.password)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    opened = OpenArchive(url, options, spill_solid=False)
    _CACHE[key] = opened
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)[1].close()
    return opened
