"""fsspec access shared by every stage: open a URL with the job's storage options, write atomically."""

from __future__ import annotations

import errno
import os
import posixpath
import tempfile
from functools import lru_cache

import fsspec
from fsspec import AbstractFileSystem

LOCAL_PROTOCOLS = {"file", "local"}


def is_local(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in LOCAL_PROTOCOLS


def filesystem(url: str, storage_options: dict | None = None) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for `url`. Storage options apply to remote protocols only, so
    one set of options (say an S3 endpoint) serves a job that reads S3 and writes locally."""
    protocol = fsspec.utils.get_protocol(url)
    opts = {} if protocol in LOCAL_PROTOCOLS else dict(storage_options or {})
    fs = _cached_fs(protocol, _freeze(opts))
    return fs, fs._strip_protocol(url)


@lru_cache(maxsize=16)
def _cached_fs(protocol: str, frozen_opts: tuple) -> AbstractFileSystem:
    return fsspec.filesystem(protocol, **_thaw(frozen_opts))


def _freeze(opts: dict) -> tuple:
    return tuple(sorted((k, _freeze(v) if isinstance(v, dict) else v) for k, v in opts.items()))


def _thaw(frozen: tuple) -> dict:
    return {k: _thaw(v) if isinstance(v, tuple) else v for k, v in frozen}


def join(url: str, *parts: str) -> str:
    """Join URL path parts with '/', whatever the protocol."""
    return posixpath.join(url.rstrip("/"), *[p.strip("/") for p in parts if p])


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    races with other threads creating files); /proc on Linux, the set-and-restore elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write so that a reader never sees a half-written file: temp name + rename on local disks,
    a single PUT on object stores (an object appears whole or not at all)."""
    fs, path = filesystem(url, storage_options)
    if fs.protocol in LOCAL_PROTOCOLS or "file" in fs.protocol:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".veil-", suffix=".part")
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs are for others to read
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, data)


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _chain(exc: BaseException):
    """The exception, its causes and contexts (and a Ray task error's own cause)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "cause", None)


def is_no_space(exc: BaseException) -> bool:
    """A write that failed because the disk (or quota) is full: the job's fault, not the item's."""
    return any((isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS) or "No space left on device" in str(e)
               for e in _chain(exc))


# botocore / aiohttp exceptions of a network or endpoint that may answer next time (by name: neither
# package is needed to read local files)
TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                   "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError", "HTTPClientError",
                   "ClientConnectionError", "ClientOSError", "ServerDisconnectedError", "ClientPayloadError",
                   "ServerTimeoutError", "ClientConnectorError"}
TRANSIENT_TEXT = ("SlowDown", "Service Unavailable", "ServiceUnavailable", "InternalError", "RequestTimeout",
                  "Bad Gateway", "Gateway Timeout", "Internal Server Error", "(500)", "(502)", "(503)", "(504)")


def is_unavailable(exc: BaseException) -> bool:
    """A storage error that a later try may not meet (network, timeouts, 5xx, throttling), after
    the client's own retries: SOURCE_UNAVAILABLE, which `--retry-failed` processes again."""
    for e in _chain(exc):
        if isinstance(e, FileNotFoundError | PermissionError):
            return False
        if isinstance(e, ConnectionError | TimeoutError) or type(e).__name__ in TRANSIENT_NAMES:
            return True
        status = (getattr(e, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode") \
            if isinstance(getattr(e, "response", None), dict) else None
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        if any(t in str(e) for t in TRANSIENT_TEXT):
            return True
    return False
