"""Recover the members of a zip whose central directory is gone (a cut download or upload).

zipfile needs the central directory at the end of the file; a truncated zip has lost it while its
first members are intact. Walking the local file headers from the start finds those members, so
the readable part of the archive is still processed and only the rest fails.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import IO

from operators.archive_formats import Encrypted, Member, TooLarge, read_each

LOCAL = struct.Struct("<4sHHHHHIIIHH")  # signature, version, flags, method, time, date, crc, csize, usize, n, e
MAX_MEMBERS = 1_000_000


class ScannedZip:
    """Stored and deflated members found by walking local headers; `stopped` says where and why
    the walk ended (always set: the central directory is missing or unreadable)."""

    def __init__(self, f: IO[bytes], size: int, password: str = ""):
        self.f = f
        self.entries: dict[str, tuple[int, int, int, int, int, int]] = {}
        self.order: list[str] = []
        pos, why = 0, ""
        while len(self.order) < MAX_MEMBERS:
            f.seek(pos)
            head = f.read(LOCAL.size)
            if len(head) < LOCAL.size:
                why = f"archive ends at offset {pos}"
                break
            sig, _, flags, method, _, _, crc, csize, usize, n, e = LOCAL.unpack(head)
            if sig != b"PK\x03\x04":
                why = f"no member header at offset {pos}"
                break
            if (flags & 8 and csize == 0) or 0xFFFFFFFF in (csize, usize):
                why = f"member at offset {pos} keeps its sizes elsewhere (data descriptor / zip64)"
                break
            raw = f.read(n)
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")
            data_at = pos + LOCAL.size + n + e
            if name not in self.entries:
                self.entries[name] = (data_at, flags, method, crc, csize, usize)
                self.order.append(name)
            pos = data_at + csize + (16 if flags & 8 else 0)
            if pos > size:
                why = f"member {name!r} is cut off at the end of the archive"
                break
        self.stopped = f"central directory missing or unreadable; {len(self.order)} members recovered, {why}"

    def members(self) -> list[Member]:
        out = []
        for name in self.order:
            _, flags, _, _, csize, usize = self.entries[name]
            # A symlink is only marked in the (lost) central directory: such a member is read as
            # plain bytes, fails as "not an image" and is never created as a link.
            out.append(Member(name=name, size=usize, csize=csize, is_dir=name.endswith("/"), encrypted=bool(flags & 1)))
        return out

    def read(self, name: str, limit: int) -> bytes:
        data_at, flags, method, crc, csize, usize = self.entries[name]
        if flags & 1:
            raise Encrypted(f"{name!r} is encrypted (not readable without the central directory)")
        if usize > limit or csize > limit:
            raise TooLarge(f"{name!r} declares {usize} bytes, over the {limit} byte limit")
        self.f.seek(data_at)
        raw = self.f.read(csize)
        if len(raw) < csize:
            raise ValueError(f"{name!r}: data cut off ({len(raw)} of {csize} bytes)")
        if method == 0:
            out = raw
        elif method == 8:
            out = zlib.decompressobj(-15).decompress(raw, limit + 1)
            if len(out) > limit:
                raise TooLarge(f"{name!r} inflates past the {limit} byte limit")
        else:
            raise ValueError(f"{name!r}: compression method {method} not readable without the central directory")
        if zlib.crc32(out) != crc:
            raise ValueError(f"{name!r}: CRC mismatch")
        return out

    def iter_block(self, names: list[str], limit: int) -> Iterator[tuple[str, bytes | Exception]]:
        yield from read_each(self.read, names, limit)

    def close(self) -> None:
        pass
