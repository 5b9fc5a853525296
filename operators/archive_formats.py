"""Format back ends for operators.archives: zip (zipfile), 7z (py7zr) and rar (rarfile).

Each back end lists `Member`s from headers alone and reads one member with a hard cap on the bytes
it will produce, whatever the headers claim. `iter_block` reads a solid block (7z folder, solid
RAR) front to back in one pass, handing members over one at a time so memory holds one member.
"""

from __future__ import annotations

import io
import queue
import re
import stat
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import py7zr
import py7zr.exceptions
import py7zr.io
import rarfile

from operators.archive_tools import RAR_TOOL_HINT
from operators.rows import FailureCause

CHUNK = 1 << 20
AES_METHOD = 99  # WinZip AES: the "compression method" of an AES-encrypted zip member
TOOL_TIMEOUT_S = 120  # one RAR member through unar; a killed tool makes the member ARCHIVE_ERROR


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


class _CappedIO(py7zr.io.Py7zIO):
    """py7zr output buffer that stops decompression (by raising) once past the limit."""

    def __init__(self, limit: int, done: Any = None):
        self.limit, self.buf, self.done = limit, io.BytesIO(), done

    def write(self, s: bytes | bytearray) -> int:
        if self.buf.tell() + len(s) > self.limit:
            raise TooLarge(f"member produces more than {self.limit} bytes")
        return self.buf.write(s)

    def read(self, size: int | None = None) -> bytes:
        return self.buf.getvalue()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.buf.seek(offset, whence)

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return self.buf.tell()

    def close(self) -> None:
        if self.done is not None:
            self.done(self)


class _Factory(py7zr.io.WriterFactory):
    def __init__(self, limit: int, on_done: Any = None):
        self.limit, self.on_done, self.products = limit, on_done, {}

    def create(self, filename: str) -> py7zr.io.Py7zIO:
        done = (lambda io_: self.on_done(filename, io_.buf.getvalue())) if self.on_done else None
        self.products[filename] = _CappedIO(self.limit, done)
        return self.products[filename]


class SevenZipArchive:
    """py7zr over a seekable file: headers sit at the end; py7zr decompresses only the folders
    holding the targets, and inside a solid folder only up to the last target."""

    def __init__(self, src: IO[bytes] | str, password: str = ""):
        try:
            self.z = py7zr.SevenZipFile(src, password=password or None)
        except py7zr.exceptions.PasswordRequired as exc:
            raise Encrypted(f"7z headers are encrypted: {exc}") from None
        self.encrypted = self.z.needs_password()  # names are listed; each member then fails ENCRYPTED
        self.solid: dict[int, float] = {}
        streams = getattr(self.z.header, "main_streams", None)
        self.folders = list(streams.unpackinfo.folders) if streams is not None else []
        packsizes = list(streams.packinfo.packsizes) if streams is not None else []
        for i, folder in enumerate(self.folders):
            files = [f for f in getattr(folder, "files", None) or [] if not f.emptystream]
            if len(files) > 1:
                unpacked = sum(f.uncompressed for f in files)
                self.solid[i] = unpacked / max(packsizes[i] if i < len(packsizes) else 1, 1)

    def members(self) -> list[Member]:
        index = {id(folder): i for i, folder in enumerate(self.folders)}
        out = []
        for f in self.z.files:
            block = index.get(id(f.folder), -1) if f.folder is not None else -1
            solid = block in self.solid
            out.append(
                Member(
                    name=f.filename,
                    size=int(f.uncompressed or 0),
                    csize=0 if solid else int(f.compressed or 0),
                    is_dir=f.is_directory,
                    is_symlink=f.is_symlink or f.is_junction,
                    encrypted=self.encrypted,
                    block=block if solid else -1,
                    block_ratio=self.solid.get(block, 0.0),
                )
            )
        return out

    def read(self, name: str, limit: int) -> bytes:
        factory = _Factory(limit)
        try:
            self.z.extract(targets=[name], factory=factory)
        except Exception as exc:
            raise self._explain(exc) from None
        finally:
            self.z.reset()
        return factory.products[name].buf.getvalue()

    def _explain(self, exc: BaseException) -> BaseException:
        """A decrypted-with-the-wrong-key stream reads as corrupt data ("Corrupt input data",
        a CRC error): for an encrypted archive, say that the password is the likely cause."""
        if not self.encrypted or isinstance(exc, (TooLarge, InterruptedError)):
            return exc
        return Encrypted(f"cannot decrypt: wrong password? ({type(exc).__name__}: {exc})"[:500])

    def iter_block(self, names: list[str], limit: int) -> Iterator[tuple[str, bytes | Exception]]:
        # py7zr pushes members into our buffers; a thread and a one-slot queue turn that into a
        # pull, so a solid block of any size passes through holding one member at a time.
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def done(name: str, data: bytes) -> None:
            while not stop.is_set():
                try:
                    q.put((name, data), timeout=0.5)
                    return
                except queue.Full:
                    continue
            raise InterruptedError("reader gone")

        def run() -> None:
            try:
                self.z.extract(targets=names, factory=_Factory(limit, done))
            except BaseException as exc:  # handed to the consumer, which decides per member
                q.put(("", self._explain(exc)))
            q.put(None)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        seen: set[str] = set()
        try:
            while (got := q.get()) is not None:
                name, data = got
                if name:
                    seen.add(name)
                    yield name, data
                else:
                    for rest in names:
                        if rest not in seen:
                            yield rest, data
        finally:
            stop.set()
            while worker.is_alive():  # drain so the thread is never stuck on a full queue
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            self.z.reset()

    def close(self) -> None:
        self.z.close()


class RarArchive:
    """rarfile: headers are read in place; stored members are read directly, compressed ones by
    the extraction tool rarfile finds (unar here), which needs a local file."""

    def __init__(self, src: IO[bytes] | str, password: str = ""):
        # errors="stop" keeps the members listed before a bad header; strerror() says why it stopped
        self.rf = rarfile.RarFile(src, errors="stop")
        if self.rf._file_parser.has_header_encryption():  # no public API says headers vs. data
            if not password:
                raise Encrypted("rar headers are encrypted (give --archive-password)")
            try:
                self.rf.setpassword(password)
            except (rarfile.Error, ValueError) as exc:  # RAR4 says a wrong password this way
                raise Encrypted(f"cannot read encrypted rar headers: {exc}") from None
        self.password = password or None
        self.solid = self.rf.is_solid()
        self.stopped = self.rf.strerror() or ""

    def members(self) -> list[Member]:
        return [
            Member(
                name=info.filename,
                size=int(info.file_size or 0),
                csize=int(info.compress_size or 0),
                is_dir=info.is_dir(),
                is_symlink=info.is_symlink() or info.file_redir is not None,
                encrypted=info.needs_password(),
                block=0 if self.solid else -1,
            )
            for info in self.rf.infolist()
        ]

    def read(self, name: str, limit: int) -> bytes:
        try:
            with self.rf.open(name, pwd=self.password) as f:
                # rarfile waits on the tool forever; a hostile file can make a tool hang
                timer = threading.Timer(TOOL_TIMEOUT_S, _kill_tool, (f,))
                timer.start()
                try:
                    return bounded_read(f, limit)
                finally:
                    timer.cancel()
        except (rarfile.RarWrongPassword, rarfile.PasswordRequired) as exc:
            raise Encrypted(str(exc)) from None
        except rarfile.RarCannotExec:
            raise RuntimeError(RAR_TOOL_HINT) from None

    def iter_block(self, names: list[str], limit: int) -> Iterator[tuple[str, bytes | Exception]]:
        # The tool re-reads a solid archive from its start for each member: CPU grows with the
        # square of the member count, memory stays one member. Good enough for RAR's share.
        yield from read_each(self.read, names, limit)

    def close(self) -> None:
        self.rf.close()


def read_each(read: Any, names: list[str], limit: int) -> Iterator[tuple[str, bytes | Exception]]:
    """Members read one by one; a failing member yields its exception, the rest go on."""
    for name in names:
        try:
            yield name, read(name, limit)
        except Exception as exc:
            yield name, exc


def _kill_tool(f: Any) -> None:
    proc = getattr(f, "_proc", None)  # rarfile's PipeReader keeps the tool's Popen here
    if proc is not None:
        proc.kill()


BACKENDS = {"zip": ZipArchive, "7z": SevenZipArchive, "rar": RarArchive}
