"""Archive readers for operators.archives: their contract (`Member`, TooLarge, Encrypted, bounded
reads), format detection, and the zip reader (zipfile); the 7z and RAR readers are in
archive_7z_rar.py, a zip cut short in archive_zipscan.py.

Each reader lists `Member`s from headers alone and reads one member with a hard cap on the bytes
it will produce, whatever the headers claim. `iter_block` reads a solid block (7z folder, solid
RAR) front to back in one pass, handing members over one at a time so memory holds one member.
"""

from __future__ import annotations

import re
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from operators.rows import FailureCause

CHUNK = 1 << 20
AES_METHOD = 99  # WinZip AES: the "compression method" of an AES-encrypted zip member


class TooLarge(Exception):
    """A member produced more bytes than allowed (a lying header or a bomb)."""

    cause = FailureCause.TOO_LARGE  # what operators.rows.failure_cause makes of it


class Encrypted(Exception):
    """The archive or member needs a password we do not have (or the one given is wrong)."""

    cause = FailureCause.ENCRYPTED


@dataclass
class Member:
    name: str  # the raw name as stored (checked by safe_rel_path before any use)
    size: int  # declared uncompressed size
    csize: int  # compressed size; 0 when unknown (members of a solid block)
    is_dir: bool = False
    is_symlink: bool = False
    encrypted: bool = False
    block: int = -1  # solid block id (7z folder, 0 for a solid RAR); -1 = readable alone
    block_ratio: float = 0.0  # uncompressed / packed bytes of the whole block, for bomb checks


MAGIC = {b"PK\x03\x04": "zip", b"PK\x05\x06": "zip", b"7z\xbc\xaf": "7z", b"Rar!": "rar"}


def detect_format(head: bytes, name: str) -> str | None:
    """zip / 7z / rar from the magic number (names lie), the extension as a last resort."""
    for magic, fmt in MAGIC.items():
        if head.startswith(magic):
            return fmt
    lower = name.lower()
    for ext, fmt in ((".zip", "zip"), (".cbz", "zip"), (".7z", "7z"), (".cb7", "7z"), (".rar", "rar"), (".cbr", "rar")):
        if lower.endswith(ext):
            return fmt
    return None


_VOLUME = re.compile(r"\.part(\d+)\.rar$", re.IGNORECASE)


def rar_volume_number(name: str) -> int:
    """1-based volume number of a `name.partN.rar` set member, 0 for a single-file archive."""
    match = _VOLUME.search(name)
    return int(match.group(1)) if match else 0


def bounded_read(f: IO[bytes], limit: int) -> bytes:
    """Read `f` to its end, refusing to hold more than `limit` bytes (TooLarge)."""
    buf = bytearray()
    while True:
        chunk = f.read(min(CHUNK, limit + 1 - len(buf)))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise TooLarge(f"member produces more than {limit} bytes")


class ZipArchive:
    """zipfile over a seekable file: the central directory and each member are ranged reads."""

    def __init__(self, src: IO[bytes] | str, password: str = "", fetch: Any = None):
        self.zf = zipfile.ZipFile(src)
        self.password = password.encode() if password else None
        self.fetch = fetch  # fetch(start, end) -> bytes: one ranged GET for a whole member
        self.by_name: dict[str, zipfile.ZipInfo] = {}
        self.aes: Any = None  # a pyzipper reader, for AES members only
        for info in self.zf.infolist():  # the first of duplicate names wins, as in members()
            self.by_name.setdefault(info.orig_filename, info)

    def members(self) -> list[Member]:
        out = []
        for info in self.zf.infolist():
            mode = info.external_attr >> 16
            out.append(
                Member(
                    # orig_filename keeps what zipfile cuts at a NUL byte, so the NUL is seen and refused
                    name=info.orig_filename,
                    size=info.file_size,
                    csize=info.compress_size,
                    is_dir=info.is_dir(),
                    is_symlink=stat.S_ISLNK(mode),
                    encrypted=bool(info.flag_bits & 1),
                )
            )
        return out

    def read(self, name: str, limit: int) -> bytes:
        info = self.by_name[name]
        if info.compress_type == AES_METHOD:
            return self._read_aes(info, limit)
        real = self.zf.fp
        if self.fetch is not None and info.compress_size <= limit:
            # Fetch the local header and the data in one request; zipfile's own small reads
            # would each cost a request (or a whole readahead block) on an object store.
            start = info.header_offset
            end = start + 30 + len(info.orig_filename.encode()) + len(info.extra) + 1024 + info.compress_size
            self.zf.fp = _Prefetched(real, start, self.fetch(start, end))
        try:
            with self.zf.open(info, pwd=self.password) as f:
                return bounded_read(f, limit)
        except RuntimeError as exc:  # zipfile says "password required" / "Bad password" this way
            raise Encrypted(str(exc)) from None
        finally:
            self.zf.fp = real

    def _read_aes(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        """A WinZip AES member (method 99, which zipfile cannot read), through pyzipper over the
        same file; opened on the first such member (one more central directory read)."""
        if not self.password:
            raise Encrypted(f"{info.orig_filename!r} is AES-encrypted (give --archive-password)")
        if self.aes is None:
            import pyzipper

            self.aes = pyzipper.AESZipFile(self.zf.fp)
        try:
            with self.aes.open(self.aes.getinfo(info.filename), pwd=self.password) as f:
                return bounded_read(f, limit)
        except RuntimeError as exc:  # "Bad password for file"
            raise Encrypted(str(exc)) from None

    def read_head(self, name: str, n: int) -> bytes:
        """The first `n` bytes of a member, from one ranged GET of its start (quotes read headers)."""
        info = self.by_name[name]
        if info.flag_bits & 1:
            raise Encrypted(f"{name!r} is encrypted")
        real = self.zf.fp
        if self.fetch is not None:
            start = info.header_offset
            end = start + 30 + len(info.orig_filename.encode()) + len(info.extra) + 1024
            self.zf.fp = _Prefetched(real, start, self.fetch(start, end + min(info.compress_size, n + 4096)))
        try:
            with self.zf.open(info) as f:
                return f.read(n)
        finally:
            self.zf.fp = real

    def iter_block(self, names: list[str], limit: int) -> Iterator[tuple[str, bytes | Exception]]:
        yield from read_each(self.read, names, limit)

    def close(self) -> None:
        if self.aes is not None:
            self.aes.close()
        self.zf.close()


class _Prefetched:
    """A file that answers reads inside [start, start+len(data)) from memory, others from `real`."""

    def __init__(self, real: IO[bytes], start: int, data: bytes):
        self.real, self.start, self.data, self.pos = real, start, data, start

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self.pos = offset
        elif whence == 1:
            self.pos += offset
        else:
            self.pos = self.real.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        lo = self.pos - self.start
        if 0 <= lo and (n >= 0 and lo + n <= len(self.data)):
            out = self.data[lo : lo + n]
        else:
            self.real.seek(self.pos)
            out = self.real.read(n)
        self.pos += len(out)
        return out


def read_each(read: Any, names: list[str], limit: int) -> Iterator[tuple[str, bytes | Exception]]:
    """Members read one by one; a failing member yields its exception, the rest go on."""
    for name in names:
        try:
            yield name, read(name, limit)
        except Exception as exc:
            yield name, exc
