"""A moto S3 server in its own process, filled with many keys, for the listing benchmark.

    python tests/s3_bench_server.py KEYS DELAY_S   -> prints {"moto": url, "replay": url}, serves until stdin closes

Keys are put straight into moto's backend (no PUT per key): `d00/c0/000000.jpg` ..., folders of
1,000 keys, ten per top folder. In its own process, so the client being measured shares no GIL
with the server.

moto answers a LIST by scanning every key of the bucket and rendering XML in Python (~0.15-0.3 s
of CPU per page of 1,000 keys at 200,000 keys), one at a time: that is moto's cost, not S3's. The
replay proxy answers each distinct LIST from moto once and then from memory, after DELAY_S (the
round trip of a real S3 LIST), so that what is measured is the client.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit


def fill(keys: int) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket("bench", "us-east-1")
    for k in range(keys):
        backend.put_object("bench", f"d{k // 10_000:02d}/c{k // 1000 % 10}/{k:06d}.jpg", b"x")


SIGNATURE = {"x-id", "AWSAccessKeyId", "Signature", "Expires"}  # presigned URLs' query (V2; V4's are X-Amz-*)


class ReplayProxy:
    """Answers each LIST once from moto, then from memory, every answer after `delay` seconds: a
    server whose own CPU is negligible and whose round trip is S3's (the signature's query
    parameters, which differ per request, are not part of the key)."""

    def __init__(self, upstream: str, delay: float):
        target = urlsplit(upstream)
        cache: dict[str, tuple[int, bytes]] = {}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                path, _, query = self.path.partition("?")
                key = path + "?" + urlencode(sorted((k, v) for k, v in parse_qsl(query, keep_blank_values=True)
                                                    if not k.lower().startswith("x-amz-") and k not in SIGNATURE))
                if key not in cache:
                    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
                    conn.request("GET", self.path, headers={"Host": self.headers.get("Host", "")})
                    answer = conn.getresponse()
                    cache[key] = (answer.status, answer.read())
                    conn.close()
                time.sleep(delay)
                status, body = cache[key]
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def main() -> None:
    from moto.server import ThreadedMotoServer

    keys, delay = int(sys.argv[1]), float(sys.argv[2])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    fill(keys)
    host, port = server.get_host_and_port()
    moto = f"http://{host}:{port}"
    replay = ReplayProxy(moto, delay)
    print(json.dumps({"moto": moto, "replay": replay.url}), flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
