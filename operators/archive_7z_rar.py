"""The 7z (py7zr) and RAR (rarfile) readers: archives whose members may sit in solid blocks, read
front to back in one pass (`iter_block`). The contract they keep is archive_formats.py's."""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator
from typing import IO, Any

import py7zr
import py7zr.exceptions
import py7zr.io
import rarfile

from operators.archive_formats import Encrypted, Member, TooLarge, bounded_read, read_each
from operators.archive_tools import RAR_TOOL_HINT

TOOL_TIMEOUT_S = 120  # one RAR member through unar; a killed tool makes the member ARCHIVE_ERROR


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


def _kill_tool(f: Any) -> None:
    proc = getattr(f, "_proc", None)  # rarfile's PipeReader keeps the tool's Popen here
    if proc is not None:
        proc.kill()
