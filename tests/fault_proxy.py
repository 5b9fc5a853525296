"""A fault-injecting HTTP proxy for the S3 tests: on 127.0.0.1, in front of moto's server.

Requests are numbered as they arrive; request n is failed with a 503 SlowDown when n % fail_every
== 0, its connection reset (RST, no answer) when n % reset_every == 0 (before it reaches the
store, or after, when n is also even: the client then retries a PUT that did happen), and delayed
by `delay_s` when n % delay_every == 0; the rest pass through unchanged. Keys containing one of
`unavailable` answer 503 to every GET, as a store that stays down for them would.
The fraction of faults is fixed; which request gets one follows the order the client sends them.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, fail_every: int = 0, reset_every: int = 0, delay_every: int = 0,
                 delay_s: float = 0.2, unavailable: tuple[str, ...] = ()):
        self.upstream = urlsplit(upstream)
        self.fail_every, self.reset_every, self.delay_every = fail_every, reset_every, delay_every
        self.delay_s, self.unavailable = delay_s, unavailable
        self.stats: Counter = Counter()
        self._n, self._lock = 0, threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_any(self):
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_any  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def heal(self) -> None:
        """No more faults: every request passes."""
        self.fail_every = self.reset_every = self.delay_every = 0
        self.unavailable = ()

    def _next(self) -> int:
        with self._lock:
            self._n += 1
            return self._n

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        n = self._next()
        self.stats["requests"] += 1
        if h.command == "GET" and any(k in h.path for k in self.unavailable):
            self.stats["unavailable"] += 1
            return _answer(h, 503, SLOW_DOWN)
        if self.fail_every and n % self.fail_every == 0:
            self.stats["failed"] += 1
            return _answer(h, 503, SLOW_DOWN)
        reset = self.reset_every and n % self.reset_every == 0
        if reset and n % 2:
            self.stats["reset_before"] += 1
            return _reset(h)
        if self.delay_every and n % self.delay_every == 0:
            self.stats["delayed"] += 1
            time.sleep(self.delay_s)
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if reset:
                self.stats["reset_after"] += 1
                return _reset(h)
            h.send_response(resp.status)
            for k, v in resp.getheaders():  # a HEAD answer keeps its Content-Length: the object's size
                if k.lower() not in HOP_BY_HOP and (k.lower() != "content-length" or h.command == "HEAD"):
                    h.send_header(k, v)
            if h.command != "HEAD":
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        finally:
            conn.close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the resets break the handler's own last flush: expected


def _read_body(h: BaseHTTPRequestHandler) -> bytes | None:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else (b"" if h.command in ("PUT", "POST") else None)


def _answer(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/xml")
    h.send_header("Content-Length", str(len(body)))
    h.send_header("Retry-After", "1")
    h.end_headers()
    h.wfile.write(body)


def _reset(h: BaseHTTPRequestHandler) -> None:
    """Close the connection with a TCP RST: the client sees 'connection reset', no answer."""
    h.close_connection = True
    try:
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
    except OSError:
        pass
