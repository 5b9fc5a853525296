"""Shared fixtures: the shared eval photos, one local Ray for the session, a real S3 endpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

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

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


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
