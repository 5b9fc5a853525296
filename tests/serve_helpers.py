"""What the `veil serve` tests share: a server on 127.0.0.1 in a thread, users files, sign-in, polling,
a pixel check of anonymized faces, and fixtures for a face photo and a webhook receiver.

Test modules import the fixtures by name (`from serve_helpers import face_photo`), which is how
pytest finds fixtures outside a conftest.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import uvicorn

from jobs.api.app import create_app
from jobs.api.auth import hash_api_key, hash_password
from jobs.api.service import ServiceConfig

MAX_UPLOAD = 1 * 2**20  # small, so the 413 cases are cheap; the eval photos are ~100 KB
SECRET = "test-secret-0123456789"
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "shorty": "shorty-pw-3", "fuzz": "fuzz-pw-4"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(config: ServiceConfig):
    """uvicorn serving create_app(config) on a free port of 127.0.0.1, in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # start-up loads the models named in warm_classes
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def write_users(path: Path, api_keys: dict[str, dict] | None = None) -> Path:
    """The users of PASSWORDS (shorty's tokens live 2 s), and `api_keys`: {key: {user, credits, ...}}."""
    users = {name: {"password_hash": hash_password(pw)} for name, pw in PASSWORDS.items()}
    users["shorty"]["token_ttl_s"] = 2
    keys = [{**entry, "key_hash": hash_api_key(key)} for key, entry in (api_keys or {}).items()]
    path.write_text(json.dumps({"secret": SECRET, "token_ttl_s": 600, "users": users, "api_keys": keys}))
    return path


def signin(base: str, user: str) -> str:
    r = httpx.post(f"{base}/v1/signin", json={"username": user, "password": PASSWORDS[user]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["TokenType"] == "Bearer" and body["ExpiresIn"] > 0
    return body["AccessToken"]


def zip_of(folder: Path, chosen: list[dict]) -> bytes:
    """A zip of the chosen photos under cam/, plus a text file (a member that is not an image)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for im in chosen:
            z.write(folder / Path(im["file"]).name, f"cam/{Path(im['file']).name}")
        z.writestr("cam/readme.txt", "not a photo")
    return buf.getvalue()


def wait_for(fetch, done, timeout: float = 90, every: float = 0.2) -> dict:
    """Call `fetch()` until `done(result)` or the timeout; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        doc = fetch()
        if done(doc) or time.monotonic() > deadline:
            return doc
        time.sleep(every)


def wait_done(client: httpx.Client, url: str, timeout: float = 90) -> dict:
    return wait_for(lambda: client.get(url).json(), lambda d: d["task_status"] in ("done", "failed"), timeout)


def face_and_rest_diff(original: bytes, anonymized: bytes, boxes: list[dict]) -> tuple[float, float]:
    """Mean absolute difference inside the labelled faces, and outside them (with a margin for the feathering)."""
    a = cv2.imdecode(np.frombuffer(original, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
    b = cv2.imdecode(np.frombuffer(anonymized, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
    assert a.shape == b.shape
    diff = np.abs(a - b).max(axis=2)
    inside, near = np.zeros(diff.shape, bool), np.zeros(diff.shape, bool)
    for box in boxes:
        x1, y1, x2, y2 = box["xyxy"]
        w, h = x2 - x1, y2 - y1
        inside[y1 + h // 4: y2 - h // 4, x1 + w // 4: x2 - w // 4] = True  # the face's core
        near[max(0, y1 - h): y2 + h, max(0, x1 - w): x2 + w] = True  # the face and its feathered surroundings
    return float(diff[inside].mean()), float(diff[~near].mean())


@pytest.fixture
def face_photo(photos):
    """(bytes, annotation) of a faces/ photo with several faces."""
    folder, chosen = photos("faces", 1)
    return (folder / Path(chosen[0]["file"]).name).read_bytes(), chosen[0]


class _Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 -- http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook_receiver():
    """A real HTTP server on 127.0.0.1 that records the JSON POSTed to it; yields (URL, received list)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Receiver.received
    server.shutdown()


@pytest.fixture(scope="module")
def base(service) -> str:
    """The base URL of the module's own `service` fixture."""
    return service[0]


@pytest.fixture(scope="module")
def alice(base) -> httpx.Client:
    with httpx.Client(base_url=base, headers={"Authorization": signin(base, "alice")}, timeout=120) as client:
        yield client
