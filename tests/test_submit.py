"""`veil submit` / `veil cancel` against a real Ray head started here, reading and writing moto's S3.

The head lives in its own temp dir (so `ray_current_cluster` is written there, never in /tmp/ray where
the session's own `ray.init()` would look) and its own process group, which the teardown kills.
`ray stop` is never used: it would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from jobs.cli import main
from jobs.submit import RayJobNotFound, mark_cancelled, ray_job_info, runtime_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_address_file() -> Path:
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def _kill_head(proc: subprocess.Popen, temp: str, gcs_port: int) -> None:
    """SIGTERM the head's process group, SIGKILL what is left, then the job drivers Ray put in
    sessions of their own (found by our temp dir or our GCS port, killed by pid)."""
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):  # a throwaway head: no need to be gentle
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            mine = temp in " ".join(p.info["cmdline"] or []) or f":{gcs_port}" in p.environ().get("RAY_ADDRESS", "")
            if mine and p.pid != os.getpid():
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


@pytest.fixture(scope="module")
def ray_head(s3_endpoint):
    """A one-node Ray cluster with its dashboard (the Jobs API) on 127.0.0.1; yields its address."""
    address_file = _default_address_file()
    saved = address_file.read_text() if address_file.exists() else None
    temp = tempfile.mkdtemp(prefix="veilray-", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash = _free_port(), _free_port()
    ports = {name: _free_port() for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")}
    bin_dir = str(Path(sys.executable).parent)  # this Python's `ray`, and its `python` for the job's driver
    cmd = [os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--num-cpus=2", "--num-gpus=0", "--object-store-memory=400000000", f"--temp-dir={temp}",
           "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]]
    # A test cluster on loopback: no token auth (the client here would need RAY_AUTH_MODE=token).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "disabled", "PATH": bin_dir + os.pathsep + env.get("PATH", "")}
    log = open(Path(temp) / "start.log", "w")  # open for the head's lifetime, closed in teardown
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("ray head did not start:\n" + (Path(temp) / "start.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        _kill_head(proc, temp, gcs)
        log.close()
        # Our head wrote its address under its own temp dir; make sure the default file is as it was.
        if saved is None:
            address_file.unlink(missing_ok=True)
        elif address_file.read_text() != saved:
            address_file.write_text(saved)
        subprocess.run(["rm", "-rf", temp], check=False)


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
