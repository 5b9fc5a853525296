"""Shared fixtures: the shared eval photos, one local Ray for the session, a real Ray head (Jobs API)
per module that asks for one, a real S3 endpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from operators.storage import filesystem

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VEIL_SHARED", REPO.parent / "shared"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "eval").is_dir():
        pytest.fail(f"the shared data folder is missing: {SHARED} (set VEIL_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def eval_annotations(shared_dir):
    """Annotations of an eval set by name: eval_annotations('wider')['images']."""

    def load(name: str) -> dict:
        return json.loads((shared_dir / "eval" / name / "annotations.json").read_text())

    return load


@pytest.fixture(scope="session")
def labelled_rgb(shared_dir, eval_annotations):
    """The first `n` photos of an eval set that have boxes, as RGB arrays: labelled_rgb('faces', 3)."""

    def load(set_name: str, n: int) -> list:
        import cv2

        images = [im for im in eval_annotations(set_name)["images"] if im["boxes"]][:n]
        return [cv2.imread(str(shared_dir / "eval" / set_name / im["file"]))[..., ::-1].copy() for im in images]

    return load


@pytest.fixture
def photos(tmp_path, shared_dir, eval_annotations):
    """Copy `n` photos of an eval set into a fresh folder; returns (folder, their annotations)."""

    def copy(set_name: str, n: int, with_label: str | None = None, folder: str = "in"):
        dest = tmp_path / folder
        dest.mkdir(parents=True, exist_ok=True)
        images = eval_annotations(set_name)["images"]
        if with_label:
            images = [im for im in images if any(b["label"] == with_label for b in im["boxes"])]
        chosen = images[:n]
        for im in chosen:
            shutil.copy2(shared_dir / "eval" / set_name / im["file"], dest / Path(im["file"]).name)
        return dest, chosen

    return copy


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (2 CPUs, like CI's machine)."""
    import ray

    from jobs.pipeline import local_ray_options

    ray.init(**local_ray_options(cpus=2))
    yield ray
    ray.shutdown()


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
def ray_head():
    """A one-node Ray cluster (2 CPUs) with its dashboard (the Jobs API) on 127.0.0.1; yields its address.

    It lives in its own temp dir (so `ray_current_cluster` is written there, never in /tmp/ray where
    the session's own `ray.init()` would look) and its own process group, which the teardown kills.
    `ray stop` is never used: it would stop every Ray on the machine. It inherits this process's
    environment: a test that needs the S3 credentials in its jobs requests `s3_endpoint` too (a
    session fixture, so it is set up first)."""
    # A test cluster on loopback: no token auth (the client here would need RAY_AUTH_MODE=token).
    with running_ray_head({"RAY_AUTH_MODE": "disabled"}) as url:
        yield url


@pytest.fixture(scope="module")
def ray_token_head(tmp_path_factory):
    """A head as `ray start --head` makes one after any local `veil run`: a token in ~/.ray/auth_token
    and RAY_AUTH_MODE unset, so token authentication is on. HOME is a temp folder (the real
    ~/.ray/auth_token is left alone); yields (dashboard URL, that HOME)."""
    import secrets

    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    from models.fetch import cache_dir

    env = {"HOME": str(home), "VEIL_MODEL_CACHE": str(cache_dir()),
           **{k: None for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}}
    # no ready check on /api/version: it answers 401 without a token; a submission follows at once
    with running_ray_head(env, ready_path="/api/authentication_mode") as url:
        yield url, home


@contextmanager
def running_ray_head(env_changes: dict[str, str | None], ready_path: str = "/api/version") -> Iterator[str]:
    """`ray start --head --block` on free loopback ports, with this process's environment changed by
    `env_changes` (None removes a variable); yields the dashboard's URL once `ready_path` answers."""
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
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"PATH": bin_dir + os.pathsep + env.get("PATH", ""), **env_changes}
    env = {k: v for k, v in env.items() if v is not None}
    log = open(Path(temp) / "start.log", "w")  # open for the head's lifetime, closed in teardown
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + ready_path, timeout=2).read()
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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint: moto's server on 127.0.0.1, reached through s3fs/botocore."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3fs_client(s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing", skip_instance_cache=True)
    return fs


def count_s3_get_bytes(opts: dict) -> dict:
    """Count the body bytes of every GetObject the shared s3fs client makes (botocore events)."""
    fs, _ = filesystem("s3://x", opts)
    fs.connect()
    seen = {"bytes": 0, "calls": 0}

    def after_get(http_response=None, parsed=None, **_):
        seen["calls"] += 1
        seen["bytes"] += int((parsed or {}).get("ContentLength") or 0)

    fs.s3.meta.events.register("after-call.s3.GetObject", after_get)
    return seen
