"""Pricing: what a job is billed (credits) and what compute costs (price per CPU/GPU-hour).

The default table ships with the package (`jobs/pricing.yaml`); `--pricing FILE` (YAML/JSON)
overrides any of its fields. A bad file is refused before anything runs, naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.detections import CLASSES

DEFAULT_TABLE = Path(__file__).with_name("pricing.yaml")


class PricingError(ValueError):
    """A pricing file that cannot be used; the message names the field."""


class SizeTier(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_megapixels: float = Field(gt=0)
    credits: float = Field(ge=0)


class Pricing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    currency: str = "USD"
    credits_per_image: float = Field(1.0, ge=0)
    credits_per_megapixel: float = Field(0.0, ge=0)
    size_tiers: list[SizeTier] = Field(default_factory=list)
    credits_per_class: dict[str, float] = Field(default_factory=dict)
    credits_per_video_minute: float = Field(10.0, ge=0)  # a video that ends `done`, by its declared duration
    minimum_per_job: float = Field(0.0, ge=0)
    failed_credits: float = Field(0.0, ge=0, le=0)  # kept explicit: failed and skipped items are free
    cpu_hour_price: float = Field(0.048, ge=0)
    gpu_hour_price: float = Field(1.20, ge=0)
    auto_approve_below: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Pricing:
        unknown = sorted(set(self.credits_per_class) - set(CLASSES))
        if unknown:
            raise ValueError(f"credits_per_class: unknown class {unknown}; allowed {list(CLASSES)}")
        if any(v < 0 for v in self.credits_per_class.values()):
            raise ValueError("credits_per_class: credits must be >= 0")
        tops = [t.max_megapixels for t in self.size_tiers]
        if tops != sorted(tops) or len(set(tops)) != len(tops):
            raise ValueError("size_tiers: max_megapixels must increase from tier to tier")
        if self.size_tiers and self.credits_per_megapixel:
            raise ValueError("size_tiers: give size_tiers or credits_per_megapixel, not both")
        return self

    def item_credits(self, width: int, height: int, classes: list[str]) -> float:
        """Credits for one image that ends `done` (stored pixels; rotation does not matter)."""
        mp = width * height / 1e6
        credits = self.credits_per_image + self.credits_per_megapixel * mp
        if self.size_tiers:
            tier = next((t for t in self.size_tiers if mp <= t.max_megapixels), self.size_tiers[-1])
            credits += tier.credits
        credits += sum(self.credits_per_class.get(c, 0.0) for c in classes)
        return round(credits, 6)

    def video_credits(self, duration_s: float, classes: list[str]) -> float:
        """Credits for one video that ends `done`: its minutes (header duration, no decoding), at
        least one image's worth, plus the per-class extras once."""
        credits = max(self.credits_per_video_minute * duration_s / 60, self.credits_per_image)
        return round(credits + sum(self.credits_per_class.get(c, 0.0) for c in classes), 6)

    def job_credits(self, item_credits_sum: float) -> float:
        """A job that charges anything charges at least the minimum."""
        return round(max(item_credits_sum, self.minimum_per_job) if item_credits_sum > 0 else 0.0, 6)

    def compute_cost(self, cpu_s: float, gpu_s: float, images: int) -> dict:
        total = cpu_s / 3600 * self.cpu_hour_price + gpu_s / 3600 * self.gpu_hour_price
        return {
            "cpu_s": round(cpu_s, 3),
            "gpu_s": round(gpu_s, 3),
            "cpu_hour_price": self.cpu_hour_price,
            "gpu_hour_price": self.gpu_hour_price,
            "total": round(total, 6),
            "per_1000_images": round(total / images * 1000, 6) if images else 0.0,
            "currency": self.currency,
        }


def load_pricing(path: str | None = None) -> Pricing:
    """The default table, with the fields of `path` (YAML or JSON) laid over it."""
    fields = yaml.safe_load(DEFAULT_TABLE.read_text()) or {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PricingError(f"pricing: cannot read {path}: {exc.strerror or exc}") from None
        try:
            given = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise PricingError(f"pricing: {path} is not valid YAML/JSON: {exc}") from None
        if not isinstance(given, dict):
            raise PricingError(f"pricing: {path} must hold a mapping of fields, got {type(given).__name__}")
        fields.update(given)
    try:
        return Pricing.model_validate(fields)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "pricing"
            got = f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else ""
            msgs.append(f"pricing field {name}: {err['msg']}{got}")
        raise PricingError("; ".join(msgs)) from None
