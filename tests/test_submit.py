"""`veil submit` / `veil cancel` against a real Ray head (conftest's `ray_head`), reading and writing moto's S3."""

from __future__ import annotations

import json
import time
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
    assert info["metadata"] == {"veil_job_id": "sub1", "veil_output": "s3://sub-anon/"}

    # the same job id again (a resume): Ray's finished record is replaced, the job runs and ends done
    rc = main(["submit", "--address", ray_head, "--wait", "--", "run", "s3://sub-raw/small/", "s3://sub-anon/",
               "--job-id", "sub1", *common])
    assert rc == 0 and "job sub1: done" in capsys.readouterr().out
    assert ray_job_info(ray_head, "sub1")["start_time"] >= info["start_time"]

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
