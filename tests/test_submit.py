"""`veil submit` / `veil cancel` against a real Ray head (conftest's `ray_head`), reading and writing moto's S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.submit import RayJobNotFound, mark_cancelled, ray_job_info, runtime_env


def _s3_args(s3_endpoint: str) -> list[str]:
    return ["--storage-option", f"endpoint_url={s3_endpoint}", "--storage-option", "key=testing",
            "--storage-option", "secret=testing"]


def _job_json(fs, url: str) -> dict | None:
    fs.invalidate_cache()
    return json.loads(fs.cat_file(url)) if fs.exists(url) else None


def test_submit_wait_status_and_cancel(ray_head, s3_endpoint, s3fs_client, photos, capsys):
    fs = s3fs_client
    fs.mkdir("sub-raw")
    fs.mkdir("sub-anon")
    small, _ = photos("faces", 2, folder="small")
    many, _ = photos("wider", 12, folder="many")
    for p in small.iterdir():
        fs.put_file(str(p), f"sub-raw/small/{p.name}")
    for p in many.iterdir():
        fs.put_file(str(p), f"sub-raw/many/{p.name}")
    common = ["--face", *_s3_args(s3_endpoint)]

    # 1. a job followed to its end: logs stream back, exit status 0, outputs on S3
    rc = main(["submit", "--address", ray_head, "--wait", "--job-id", "sub1", "--env", "AWS_DEFAULT_REGION=us-east-1",
               "--", "run", "s3://sub-raw/small/", "s3://sub-anon/", *common])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "submission id: veil-sub1" in out
    assert "job sub1: done" in out  # the driver's summary, streamed from the cluster
    doc = _job_json(fs, "sub-anon/sub1/job.json")
    assert doc["status"] == "done" and doc["totals"]["done"] == 2
    assert sorted(fs.find("sub-anon/sub1/images")) == sorted(f"sub-anon/sub1/images/{p.name}" for p in small.iterdir())

    info = ray_job_info(ray_head, "sub1")
    assert info["status"] == "SUCCEEDED" and info["submission_id"] == "veil-sub1"
    assert info["start_time"] and info["end_time"] and info["start_time"] <= info["end_time"]
    assert info["metadata"] == {"veil_job_id": "sub1", "veil_output": "s3://sub-anon/", "veil_attempt": "1"}

    # the same job id again (a resume): its next attempt, a Ray job of its own; the first one's record stays
    rc = main(["submit", "--address", ray_head, "--wait", "--", "run", "s3://sub-raw/small/", "s3://sub-anon/",
               "--job-id", "sub1", *common])
    out = capsys.readouterr().out
    assert rc == 0 and "job sub1: done" in out and "submission id: veil-sub1-2" in out
    again = ray_job_info(ray_head, "sub1")
    assert again["submission_id"] == "veil-sub1-2" and again["attempt"] == 2 and again["status"] == "SUCCEEDED"
    assert again["start_time"] >= info["start_time"]

    # 2. a job cancelled while it runs: Ray stops it, job.json says cancelled and stays so
    rc = main(["submit", "--address", ray_head, "--", "run", "s3://sub-raw/many/", "s3://sub-anon/",
               "--job-id", "sub2", *common])
    assert rc == 0 and "submission id: veil-sub2" in capsys.readouterr().out
    deadline = time.monotonic() + 180
    while (_job_json(fs, "sub-anon/sub2/job.json") or {}).get("status") != "processing":
        assert ray_job_info(ray_head, "sub2")["status"] in ("PENDING", "RUNNING")
        assert time.monotonic() < deadline, "job sub2 never started processing"
        time.sleep(0.5)
    assert main(["cancel", "sub2", "--address", ray_head, *_s3_args(s3_endpoint)]) == 0
    assert ray_job_info(ray_head, "sub2")["status"] == "STOPPED"
    time.sleep(2)  # nothing of the stopped job may write job.json afterwards
    doc = _job_json(fs, "sub-anon/sub2/job.json")
    assert doc["status"] == "cancelled" and doc["job_id"] == "sub2" and doc["totals"]["done"] < 12
    assert main(["cancel", "sub1", "--address", ray_head, *_s3_args(s3_endpoint)]) == 1  # already done
    assert _job_json(fs, "sub-anon/sub1/job.json")["status"] == "done"

    # 3. refused before anything reaches the cluster; unknown ids
    assert main(["submit", "--address", ray_head, "--", "run", "s3://sub-raw/", "s3://sub-anon/",
                 "--job-id", "sub3", "--quality", "500"]) == 2
    with pytest.raises(RayJobNotFound):
        ray_job_info(ray_head, "sub3")
    assert main(["cancel", "nosuchjob", "--address", ray_head, "--output", "s3://sub-anon/"]) == 1


def test_runtime_env_ships_the_code_not_the_tests():
    env = runtime_env(pip=True, pip_extra="cpu", env_vars={"A": "1"})
    root = Path(env["working_dir"])
    assert (root / "jobs" / "submit.py").is_file() and (root / "pyproject.toml").is_file()
    assert {"/.git", "/tests", "/notebooks", "*.onnx"} <= set(env["excludes"])
    assert not any(r.startswith("ray") for r in env["pip"])  # the cluster's Ray, never a second one
    assert any(r.startswith("onnxruntime>=") for r in env["pip"]) and env["env_vars"] == {"A": "1"}


def test_mark_cancelled_writes_a_minimal_report(tmp_path):
    job_root = str(tmp_path / "out" / "never-started")
    doc = mark_cancelled(job_root, "never-started", "cancelled before it started")
    on_disk = json.loads((tmp_path / "out" / "never-started" / "job.json").read_text())
    assert on_disk == doc and doc["status"] == "cancelled" and doc["job_id"] == "never-started"


def _veil(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`veil ARGS` in a new process, as from a new shell."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, capture_output=True, text=True,
                          timeout=400)


def test_submit_status_cancel_to_a_fresh_head_with_token_auth(ray_token_head, photos, tmp_path):
    """`ray start --head` where ~/.ray/auth_token exists turns token auth on; `veil submit --wait`, right
    after the head answers (its job agent may not be up yet), works from a new shell with no RAY_*
    variable: the client sends the local token because the cluster asks for one."""
    url, home = ray_token_head
    mode = json.loads(urllib.request.urlopen(url + "/api/authentication_mode", timeout=5).read())
    assert mode["authentication_mode"] == "token"
    with pytest.raises(urllib.error.HTTPError) as refused:  # the cluster really refuses a client without token
        urllib.request.urlopen(url + "/api/version", timeout=5)
    assert refused.value.code == 401
    src, _ = photos("faces", 1, folder="tok-in")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)}
    env["VEIL_MODEL_CACHE"] = os.environ.get("VEIL_MODEL_CACHE") or str(Path.home() / ".cache/veil/models")
    out = tmp_path / "out"
    r = _veil(["submit", "--address", url, "--wait", "--job-id", "tok1", "--", "run", str(src), str(out),
               "--face", "--detect-models", "centerface"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "job tok1: done" in r.stdout and json.loads((out / "tok1/job.json").read_text())["status"] == "done"
    r = _veil(["status", "tok1", "--output", str(out), "--address", url], env)
    assert r.returncode == 0 and "ray job veil-tok1: SUCCEEDED" in r.stdout, r.stdout + r.stderr
    r = _veil(["cancel", "tok1", "--address", url], env)
    assert r.returncode == 1 and "already ended: SUCCEEDED" in r.stderr, r.stderr

    # no token here, or another cluster's: said in one line, which names where tokens are looked for
    r = _veil(["cancel", "tok1", "--address", url], env | {"HOME": str(tmp_path)})
    assert r.returncode == 1 and "no token was found here: set RAY_AUTH_TOKEN" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _veil(["cancel", "tok1", "--address", url], env | {"RAY_AUTH_TOKEN": "0" * 64})
    assert r.returncode == 1 and "not this cluster's token" in r.stderr, r.stderr


def test_a_head_without_a_job_agent_yet_is_retried(capsys):
    """Ray's answer while a new head starts its job agent (HTTP 500, RuntimeError in the SDK)."""
    from jobs.ray_client import retry_no_agent

    answers = iter([RuntimeError("Request failed with status code 500: No available agent to submit job, "
                                 "please try again later.."), RuntimeError("Request failed: No available agent"),
                    "submitted"])

    def call():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    started = time.monotonic()
    assert retry_no_agent(call, limit_s=10) == "submitted"
    assert 2.9 <= time.monotonic() - started < 6  # 1 s, then 2 s
    assert capsys.readouterr().err.count("no job agent yet") == 2
    with pytest.raises(RuntimeError, match="status code 400"):  # anything else is not retried
        retry_no_agent(lambda: (_ for _ in ()).throw(RuntimeError("status code 400")), limit_s=10)
