"""Request bodies in: read with a cap (images) or streamed to the storage (archives), never buffered past
their limit."""

from __future__ import annotations

import asyncio
import os
import tempfile

from fastapi import Request

from operators.storage import LOCAL_PROTOCOLS, filesystem, join


class UploadTooLarge(Exception):
    pass


def _refuse_declared_size(request: Request, limit: int) -> None:
    """UploadTooLarge at once when Content-Length already says the body is over `limit`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(f"the body is {int(declared)} bytes, over the {limit} byte limit")


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (never buffered past it)."""
    _refuse_declared_size(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise UploadTooLarge(f"the body passes the {limit} byte limit")
    return bytes(body)


async def receive_file(request: Request, url: str, limit: int, storage: str, storage_options: dict) -> int:
    """Stream the request body to the storage object `url` through a temporary file, refusing it
    past `limit` bytes (UploadTooLarge): memory holds one chunk whatever the size, and the
    object appears whole or not at all. `storage`: the service's root (a local one holds the
    temporary file, so the final rename is atomic). Returns the size."""
    _refuse_declared_size(request, limit)
    fs, path = filesystem(url, storage_options)
    local = fs.protocol in LOCAL_PROTOCOLS or "file" in fs.protocol
    spool = None
    if local:  # on the storage's disk, so the final rename is atomic; not in the folder a job lists
        spool = filesystem(join(storage, ".partial"), {})[1]
        os.makedirs(spool, exist_ok=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="veil-upload-", suffix=".part", dir=spool)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise UploadTooLarge(f"the body passes the {limit} byte limit")
                f.write(chunk)
        if local:
            os.replace(tmp, path)
        else:
            await asyncio.to_thread(fs.put_file, tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return size
