"""Detection profiles: which models look at an image, how, and how their findings are fused.

A profile (`fast`, `balanced`, `thorough` in models/catalog.yaml, or a user's own in a catalog
file of the same shape) says, for each class, its *members* and a *fusion rule*:

- a member is one catalog model seen once: at `scale` times the detection copy (its longer side
  capped at `max_side`), with the model's tiling and vehicle crops unless the member overrides
  them, keeping only what scores at least `min_score`; `near_vehicle` keeps only boxes whose
  centre lies in a detected vehicle grown by that fraction (plate models that fire on signage);
- `fusion: mean` averages the members' scores for one object (boxes of the same class that
  overlap at IoU >= 0.4), a member that missed it counting 0: one member's confident mistake is
  diluted, an object every member sees keeps its score. `fusion: union` keeps every member's
  boxes (NMS, the best score wins): a second model only ever adds recall;
- `thresholds` are by size: the first rule whose `below` (px, the box's longer side in the stored
  image) exceeds the box decides, the last rule (no `below`) takes the rest. Small boxes are where
  false positives live (texture, foliage); large faces are rarely missed by all members at once,
  so a lower bar there buys recall at little precision.

Thresholds and members were chosen by a rule on one half of each dev set and confirmed on the
other (README, "Detection quality").
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.detections import CLASSES

FUSIONS = ("mean", "union")
PROFILES = ("fast", "balanced", "thorough")  # the built-in ones; a catalog file may add more
DEFAULT_PROFILE = "balanced"


class SizeThreshold(BaseModel):
    model_config = ConfigDict(extra="forbid")
    below: float | None = Field(None, gt=0, description="applies to boxes whose longer side is under this, px")
    score: float = Field(ge=0.0, le=1.0)


class Member(BaseModel):
    """One model seen once by one class's fusion."""

    model_config = ConfigDict(extra="forbid")
    model: str
    scale: float = Field(1.0, gt=0.0, le=8.0, description="resize factor of the detection copy")
    max_side: int | None = Field(None, ge=64, description="cap on the longer side the model sees, px")
    tiling: str | None = Field(None, pattern=r"^(auto|off|\d+x\d+)$", description="default: the catalog's")
    overlap: float | None = Field(None, ge=0.0, le=0.5)
    vehicle_crops: bool | None = Field(None, description="also search crops around vehicles (default: catalog's)")
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="this member's own cut, before fusion")
    near_vehicle: float | None = Field(None, ge=0.0, le=2.0,
                                       description="keep only boxes centred in a vehicle grown by this fraction")

    def pass_key(self) -> tuple:
        """Members that would run the same model the same way share one run (e.g. yolov8n for
        persons and vehicles)."""
        return (self.model, self.scale, self.max_side, self.tiling, self.overlap, self.vehicle_crops)


class ClassPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    members: list[Member] = Field(min_length=1)
    fusion: str = Field("union", pattern="^(mean|union)$")
    thresholds: list[SizeThreshold] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> ClassPlan:
        belows = [t.below for t in self.thresholds[:-1]]
        if any(b is None for b in belows) or self.thresholds[-1].below is not None:
            raise ValueError("thresholds: every rule but the last needs `below`; the last has none")
        if belows != sorted(belows):
            raise ValueError("thresholds: `below` must increase")
        return self

    def threshold_for(self, sizes):
        """The score each box needs, by its longer side in stored pixels (array in, array out)."""
        import numpy as np

        need = np.full(len(sizes), self.thresholds[-1].score, np.float32)
        for rule in reversed(self.thresholds[:-1]):
            need[np.asarray(sizes) < rule.below] = rule.score
        return need

    def lowest(self) -> float:
        return min(t.score for t in self.thresholds)

    def uniform(self, score: float) -> ClassPlan:
        """This plan with one threshold for every size (an explicit --face-threshold etc.)."""
        return self.model_copy(update={"thresholds": [SizeThreshold(score=score)]})


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    description: str = ""
    classes: dict[str, ClassPlan]

    @model_validator(mode="after")
    def _known(self) -> Profile:
        bad = sorted(set(self.classes) - set(CLASSES))
        if bad:
            raise ValueError(f"classes {bad} unknown; allowed: {list(CLASSES)}")
        needs_vehicles = any(m.vehicle_crops or m.near_vehicle is not None
                             for p in self.classes.values() for m in p.members)
        if needs_vehicles and "vehicle" not in self.classes:
            raise ValueError("members with vehicle_crops or near_vehicle need a `vehicle` plan in the profile")
        return self

    def model_names(self, classes: list[str]) -> list[str]:
        """Catalog models the profile runs for `classes` (vehicles too when a plate member needs them)."""
        wanted = list(classes)
        if any(m.vehicle_crops or m.near_vehicle is not None
               for c in wanted if c in self.classes for m in self.classes[c].members):
            wanted.append("vehicle")
        names: list[str] = []
        for c in wanted:
            for m in self.classes[c].members if c in self.classes else []:
                if m.model not in names:
                    names.append(m.model)
        return names


def resolve(profile: Profile, catalog: dict) -> Profile:
    """`profile` with each member's unset tiling, overlap and vehicle crops taken from its
    catalog entry's `passes` (`catalog`: name -> ModelEntry), checked again (a member that now
    crops around vehicles needs a vehicle plan)."""
    unknown = sorted({m.model for p in profile.classes.values() for m in p.members} - set(catalog))
    if unknown:
        raise ValueError(f"profile {profile.name}: unknown model(s) {unknown}; the catalog has {sorted(catalog)}")
    classes = {}
    for cls, plan in profile.classes.items():
        members = []
        for m in plan.members:
            passes = catalog[m.model].passes
            members.append(m.model_copy(update={
                "tiling": m.tiling or passes.tiling,
                "overlap": passes.overlap if m.overlap is None else m.overlap,
                # crops search for plates only: a vehicle model's own setting means nothing here
                "vehicle_crops": bool(passes.vehicle_crops if m.vehicle_crops is None else m.vehicle_crops)
                and cls == "license_plate",
            }))
        classes[cls] = plan.model_copy(update={"members": members})
    return Profile.model_validate({**profile.model_dump(), "classes": {c: p.model_dump() for c, p in classes.items()}})


def from_models(catalog: dict, names: list[str], classes: list[str], vehicle_names: list[str],
                thresholds: dict[str, float]) -> Profile:
    """A profile for `--detect-models`: for each class, every named model that detects it at each
    of its catalog scales, averaged where its catalog entry says `ensemble: mean`, else a union;
    `vehicle_names` serve the vehicles a two-stage plate search crops around when no named model
    detects vehicles."""
    def plan(cls: str, pool: list[str]) -> ClassPlan | None:
        serving = [catalog[n] for n in pool if cls in catalog[n].veil_classes]
        if not serving:
            return None
        members = [Member(model=e.name, scale=s) for e in serving for s in e.passes.scales]
        mean = len(members) > 1 and any(e.passes.ensemble == "mean" or e.passes.combine == "mean" for e in serving)
        return ClassPlan(members=members, fusion="mean" if mean else "union",
                         thresholds=[SizeThreshold(score=thresholds[cls])])

    plans = {c: p for c in classes if (p := plan(c, names))}
    plates = plans.get("license_plate")
    if plates and any(catalog[m.model].passes.vehicle_crops for m in plates.members) and "vehicle" not in plans:
        plans["vehicle"] = plan("vehicle", vehicle_names)
    return resolve(Profile(name="detect-models", description="models named by --detect-models", classes=plans),
                   catalog)


def for_entries(entries: list, classes: list[str], thresholds: dict[str, float]) -> Profile:
    """The `--detect-models` profile of exactly these catalog entries (their own passes): the
    way to build a Detector around models configured in code."""
    catalog = {e.name: e for e in entries}
    return from_models(catalog, list(catalog), classes, list(catalog), thresholds)
