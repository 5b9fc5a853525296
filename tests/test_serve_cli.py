"""`veil serve` as a user runs it: the hashing helpers and the server started from the command line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from jobs.api.auth import Auth, AuthError, hash_api_key, verify_password

VEIL = [sys.executable, "-m", "jobs.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hash_password_and_api_key_for_the_users_file(tmp_path):
    out = subprocess.run([*VEIL, "serve", "--hash-password"], input="s3cret pass\n", capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out.startswith("scrypt$") and verify_password("s3cret pass", out) and not verify_password("other", out)
    lines = subprocess.run([*VEIL, "serve", "--hash-api-key"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    key, key_hash = lines[0].rsplit(" ", 1)[1], lines[1].split(": ", 1)[1]
    assert key_hash == hash_api_key(key)

    users = tmp_path / "users.yaml"
    users.write_text(json.dumps({"users": {"carol": {"password_hash": out}},
                                 "api_keys": [{"user": "carol", "key_hash": key_hash}]}))
    auth = Auth.from_file(users)
    assert auth.check_api_key(key) == "carol"  # Syntonym's x-api-key (its routes come in part 2)
    with pytest.raises(AuthError):
        auth.check_api_key(key + "x")
    assert auth.secret_generated  # no `secret` in the file: tokens die with the process

    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"users": {"dave": {"password": "plain text"}}}))
    with pytest.raises(ValueError, match="password_hash"):
        Auth.from_file(bad)


def test_veil_serve_starts_answers_and_stops(tmp_path):
    hashed = subprocess.run([*VEIL, "serve", "--hash-password"], input="pw-of-erin\n", capture_output=True, text=True,
                            check=True).stdout.strip()
    (tmp_path / "users.yaml").write_text(json.dumps({"secret": "x" * 32, "users": {"erin": {"password_hash": hashed}}}))
    port = _free_port()
    proc = subprocess.Popen([*VEIL, "serve", "--port", str(port), "--storage", str(tmp_path / "storage"),
                             "--users", str(tmp_path / "users.yaml"), "--warm", "", "--max-upload-mb", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health").json() == {"status": "ok"}:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "veil serve did not start"
            time.sleep(0.2)
        token = httpx.post(f"{base}/v1/signin", json={"username": "erin", "password": "pw-of-erin"}).json()
        assert httpx.get(f"{base}/v1/list", headers={"Authorization": token["AccessToken"]}).status_code == 200
        assert "/v1/file" in httpx.get(f"{base}/openapi.json").json()["paths"]
        big = httpx.post(f"{base}/task?face=true", content=b"\xff\xd8\xff" + bytes(600_000),
                         headers={"Authorization": token["AccessToken"], "Content-Type": "image/jpeg"})
        assert big.status_code == 413  # --max-upload-mb 0.5
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "GET /v1/list 200" in output  # the access log...
    assert "pw-of-erin" not in output and token["AccessToken"] not in output  # ...without secrets
