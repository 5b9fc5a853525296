"""`veil serve` under attack, over real HTTP (uvicorn on 127.0.0.1 in a thread; no models loaded):
password guessing, oversized bodies, forged access-log lines, and Retry-After on 429 answers."""

from __future__ import annotations

import base64
import logging
import socket
import time

import httpx
import pytest
import serve_helpers
from serve_helpers import PASSWORDS, running, signin, write_users

from jobs.api.service import ServiceConfig

base = serve_helpers.base


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    config = ServiceConfig(storage=str(root / "storage"), users_file=str(write_users(root / "users.yaml")),
                           rate_limit_per_minute=120)
    with running(config) as url:
        yield url, root / "storage"


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_failed_signins_are_throttled_per_user(base):
    """300 wrong passwords for one user: at most the budget (10) is checked, the rest are 429 at
    once with a Retry-After of at least 1 s; while it lasts the right password is refused too."""
    t0 = time.monotonic()
    with httpx.Client(base_url=base, timeout=30) as client:
        codes = [client.post("/v1/signin", json={"username": "bob", "password": f"guess-{i}"}) for i in range(300)]
        blocked = client.post("/v1/signin", json={"username": "bob", "password": PASSWORDS["bob"]})
    statuses = [r.status_code for r in codes]
    assert set(statuses) == {401, 429}
    assert statuses.count(401) <= 12, statuses.count(401)  # 10, plus what refilled meanwhile (10 a minute)
    refused = [r for r in codes if r.status_code == 429]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert "message" in refused[0].json() and "password" not in refused[0].text.lower()
    assert blocked.status_code == 429
    assert time.monotonic() - t0 < 20  # the refusals cost no scrypt


def test_failed_basic_auth_is_throttled_per_address(tmp_path):
    """Wrong Basic passwords (FaceBlurest) for many user names from one address: after the
    address's budget (30) every try is 429 in FaceBlurest's shape, before any hashing. (A service
    of its own: this module's must keep its address budget for the other tests.)"""
    config = ServiceConfig(storage=str(tmp_path / "s"), users_file=str(write_users(tmp_path / "u.yaml")))
    with running(config) as url, httpx.Client(base_url=url, timeout=30) as client:
        answers = [client.post("/faceblurest", headers=_basic(f"user{i}", "wrong"), content=b"{}")
                   for i in range(60)]
    statuses = [r.status_code for r in answers]
    assert statuses.count(401) <= 32 and statuses[-1] == 429, statuses
    assert answers[-1].json()[0]["cd"] == "1029" and int(answers[-1].headers["Retry-After"]) >= 1


def test_signin_still_works_for_other_users_on_other_addresses(tmp_path):
    """The per-user budget of one name does not lock out another, the per-address one does not
    lock out another address (a second service: this module's is throttled by now)."""
    config = ServiceConfig(storage=str(tmp_path / "s"), users_file=str(write_users(tmp_path / "u.yaml")),
                           auth_failures_per_user=2, auth_failures_per_address=100)
    with running(config) as url:
        for _ in range(4):
            httpx.post(f"{url}/v1/signin", json={"username": "bob", "password": "wrong"})
        assert httpx.post(f"{url}/v1/signin", json={"username": "bob", "password": PASSWORDS["bob"]}).status_code \
            == 429
        assert signin(url, "alice")  # another user, same address


def _raw(base: str, request: bytes, chunks=(), timeout: float = 10) -> tuple[bytes, float]:
    """Send a raw HTTP request (and body chunks), return (the response head, seconds to it)."""
    host, port = base.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the body ended: what we want
        data = b""
        while b"\r\n\r\n" not in data:
            got = s.recv(65536)
            if not got:
                break
            data += got
    return data, time.monotonic() - t0


def test_huge_declared_json_body_is_refused_unread(base):
    """A 200 MB JSON body to /v1/signin without credentials: 413 from its Content-Length alone,
    in Celantur's shape, without the body being sent or parsed."""
    head = (b"POST /v1/signin HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200000000\r\n\r\n")
    answer, took = _raw(base, head + b'{"username": "')
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert took < 5


def test_huge_chunked_json_body_is_cut_off(base):
    """The same without a Content-Length (chunked): refused once past the route's cap (16 KiB for
    sign-in, 1 MiB for other JSON routes such as Syntonym's, whose key is checked after the body
    is parsed), long before 200 MB have been sent."""
    def chunks(total: int):
        piece = b"a" * 65536
        sent = 0
        yield b'{"file_names": ["'
        while sent < total:
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
            sent += len(piece)

    for path, cap in (("/v1/signin", 16 * 1024), ("/syntonym/create_upload_session", 2**20)):
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Transfer-Encoding: chunked\r\n\r\n").encode()
        body = chunks(200_000_000)
        first = next(body)
        answer, took = _raw(base, head + b"%x\r\n%s\r\n" % (len(first), first), body)
        assert answer.startswith(b"HTTP/1.1 413"), (path, answer[:300])
        assert str(cap).encode() in answer or took < 10, answer


def test_access_log_escapes_the_path(base, caplog):
    """`/health%0aFAKE` must not start a forged log line; NUL and other control bytes are escaped."""
    caplog.set_level(logging.INFO, logger="veil.serve")
    httpx.get(f"{base}/health%0aFAKE%200%20ms")
    httpx.get(f"{base}/health%00nul%0d%1b[31m")
    lines = [r.getMessage() for r in caplog.records if r.name == "veil.serve" and "health" in r.getMessage()]
    assert len(lines) == 2, lines
    for line in lines:
        assert all(c.isprintable() for c in line), repr(line)
    assert "/health\\nFAKE 0 ms" in lines[0] and "\\x00nul\\r\\x1b[31m" in lines[1]


def test_retry_after_is_never_zero(base):
    """The per-user request limit (120 a minute here: a token every 0.5 s): the 429s of a burst
    say when to come back in whole seconds, never 0 (which invites an immediate retry)."""
    with httpx.Client(base_url=base, headers={"Authorization": signin(base, "alice")}, timeout=30) as client:
        answers = [client.get("/v1/file/nothing/status") for _ in range(140)]
    refused = [r for r in answers if r.status_code == 429]
    assert refused, [r.status_code for r in answers][:5]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused), {r.headers["Retry-After"] for r in refused}
