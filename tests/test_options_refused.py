"""Bad options are refused before work starts: the real `veil run` command line (a subprocess),
exit code 2, one line naming the option, no traceback, no secret echoed; and the service's 422."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import running, signin, write_users

from jobs.api.service import ServiceConfig
from jobs.run import run_job
from jobs.spec import SpecError, build_spec

SECRET = "s3cr3t-header-value"


def veil(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}  # never join a cluster by accident
    env.pop("RAY_ADDRESS")
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def one_photo(photos):
    folder, _ = photos("faces", 1)
    return folder


@pytest.mark.parametrize("flag, value, option", [
    ("--archive-password-file", "missing-password.txt", "archive-password-file"),
    ("--models", "missing-catalog.yaml", "models"),
    ("--spec", "missing-spec.yaml", "spec"),
    ("--auto-approve-below", "-1", "auto-approve-below"),
])
def test_bad_option_refused_before_ray(one_photo, tmp_path, flag, value, option):
    """Refused in seconds (no Ray started: a local Ray takes longer than that here), naming the
    option; nothing written under the output."""
    t0 = time.monotonic()
    out = tmp_path / "out"
    arg = str(tmp_path / value) if value.endswith((".txt", ".yaml")) else value
    r = veil("run", str(one_photo), str(out), "--job-id", "j", flag, arg)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith(f"veil run: {option}:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "j").exists()
    assert time.monotonic() - t0 < 60


def test_webhook_header_with_newline_refused(one_photo, tmp_path):
    """A header value with CR/LF would be refused by urllib only when the job ends, in a
    traceback printing it: now it is refused first, and never echoed."""
    r = veil("run", str(one_photo), str(tmp_path / "out"), "--job-id", "j", "--webhook", "http://127.0.0.1:9/x",
             "--web-auth-header-name", "Authorization", "--web-auth-header-value", f"Bearer {SECRET}\r\nX-Evil: 1")
    assert r.returncode == 2 and r.stderr.startswith("veil run: web-auth-header-value:"), r.stderr
    assert SECRET not in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "j").exists()


def test_webhook_header_with_newline_refused_by_the_service(tmp_path, face_photo_bytes):
    """In the service the webhook used to be dropped silently: now the upload is a 422."""
    config = ServiceConfig(storage=str(tmp_path / "s"), users_file=str(write_users(tmp_path / "u.yaml")))
    with running(config) as url:
        token = signin(url, "alice")
        r = httpx.post(f"{url}/v1/file", params={"face": "true", "webhook": "http://127.0.0.1:9/x",
                                                 "web-auth-header-name": "Authorization",
                                                 "web-auth-header-value": f"{SECRET}\nX-Evil: 1"},
                       headers={"Authorization": token, "Content-Type": "image/jpeg"}, content=face_photo_bytes)
    assert r.status_code == 422 and "web-auth-header-value" in r.json()["message"], r.text
    assert SECRET not in r.text


@pytest.fixture
def face_photo_bytes(photos) -> bytes:
    folder, chosen = photos("faces", 1)
    return next(folder.iterdir()).read_bytes()


def test_cuda_without_gpu_refused(ray_local, one_photo, tmp_path):
    """`--device cuda` on a Ray without GPUs used to wait forever for a GPU actor: refused as soon
    as the cluster's resources are known, the job `failed` with the cause."""
    if ray_local.cluster_resources().get("GPU"):
        pytest.skip("this machine has a GPU")
    spec = build_spec({"inputs": [str(one_photo)], "output": str(tmp_path / "out"), "job_id": "gpu",
                       "device": "cuda", "face": True})
    t0 = time.monotonic()
    with pytest.raises(SpecError, match="^device: cuda, but this Ray cluster has no GPU"):
        run_job(spec, log=lambda *_: None)
    assert time.monotonic() - t0 < 60
    doc = json.loads((tmp_path / "out" / "gpu" / "job.json").read_text())
    assert doc["status"] == "failed" and "device: cuda" in doc["description"]
