"""`JobSpec`: everything a job needs, validated before anything is listed or started.

Built from CLI flags, a YAML/JSON file or an API request. Field names follow the seed APIs;
dashes and underscores are both accepted (`face-threshold` == `face_threshold`). A bad value is
refused with the field's name and what is allowed.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime, timezone
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.catalog import ModelEntry, load_catalog, load_profiles
from models.detections import CLASSES
from models.profiles import DEFAULT_PROFILE, Profile, from_models, resolve
from operators.anonymize import METHODS, AnonymizeOptions

DEFAULT_CLASSES = ("face", "license_plate")  # the street-view default when no class flag is given
SECRET_WORDS = ("secret", "key", "token", "password", "credential", "sas", "auth")


# How models run on CPUs (models/runtime.py): OpenVINO computes in bf16 where the CPU does natively.
CpuBackend = Literal["auto", "openvino", "openvino-f32", "onnxruntime"]
CPU_BACKENDS = get_args(CpuBackend)
CPU_BACKEND_HELP = ("how models run on CPUs (default auto: openvino where installed, else onnxruntime); "
                    "openvino uses bf16 where the CPU computes it natively, openvino-f32 never")

class SpecError(ValueError):
    """A job spec that cannot run; the message names the option and what is allowed."""


def new_job_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class IgnoreArea(BaseModel):
    """A rectangle (stored pixels) where no pixel is changed."""

    model_config = ConfigDict(extra="forbid")
    topLeftX: int = Field(ge=0)  # noqa: N815 -- the seed APIs' names
    topLeftY: int = Field(ge=0)  # noqa: N815
    width: int = Field(gt=0)
    height: int = Field(gt=0)


TileCount = Annotated[int, Field(ge=1, le=32)]
TileOverlap = Annotated[float, Field(ge=0.0, le=0.5)]
TILING_PRESETS = ("whole", "auto", "panorama")
FORMAT_HELP = 'whole, auto, panorama or {"number": [nx, ny], "overlap": [ox, oy]}'


class TileFormat(BaseModel):
    """Celantur's tiling: nx x ny tiles (1..32 each), neighbours overlapping by a fraction 0..0.5
    of a tile across and down."""

    model_config = ConfigDict(extra="forbid")
    number: tuple[TileCount, TileCount]
    overlap: tuple[TileOverlap, TileOverlap] = (0.2, 0.2)


class JobSpec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, alias_generator=lambda name: name.replace("_", "-")
    )

    inputs: list[str] = Field(min_length=1, description="files, folders, globs or fsspec URLs")
    output: str = Field(min_length=1, description="folder or fsspec URL; the job writes OUTPUT/JOB_ID/")
    job_id: str = Field(default_factory=new_job_id, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

    # which classes (None: the default set)
    face: bool | None = None
    license_plate: bool | None = None
    person: bool | None = None
    vehicle: bool | None = None

    method: Literal["blur", "pixelate", "blacken", "detect"] = "blur"
    bbox: bool = Field(False, description="anonymize the box instead of the inscribed ellipse")
    # Thresholds: None = the profile's (by size); a number = that score for every size.
    face_threshold: float | None = Field(None, ge=0.0, le=1.0)
    license_plate_threshold: float | None = Field(None, ge=0.0, le=1.0)
    person_threshold: float | None = Field(None, ge=0.0, le=1.0)
    vehicle_threshold: float | None = Field(None, ge=0.0, le=1.0)
    kernel_size_face: float = Field(0.95, gt=0.0, le=1000.0)
    kernel_size_license_plate: float = Field(0.5, gt=0.0, le=1000.0)
    kernel_size_person: float = Field(95.0, gt=0.0, le=1000.0)
    kernel_size_vehicle: float = Field(61.0, gt=0.0, le=1000.0)
    face_anonymization_gradient_start: float = Field(0.0, ge=0.0, le=1.0)  # hard: operators/anonymize.py
    face_anonymization_gradient_stop: float = Field(0.0, ge=0.0, le=1.0)
    license_plate_anonymization_gradient_start: float = Field(0.3, ge=0.0, le=1.0)
    license_plate_anonymization_gradient_stop: float = Field(0.0, ge=0.0, le=1.0)
    shape_scale_face: float = Field(1.3, ge=1.0, le=3.0, description="a face's blurred shape: its box scaled by this")
    ignores: list[IgnoreArea] = Field(default_factory=list, description="areas left untouched")
    debug: bool = Field(False, description="draw boxes on the output")
    score: bool = Field(False, description="with debug: draw the scores")
    save_mask: Literal["all", "binary", "instance"] | None = None
    mask_scale: int = Field(100, ge=0, le=100, description="mask size, percent of the image")
    save_metadata: bool = Field(False, description="write metadata/<path>.json (always with method detect)")
    strip_metadata: Literal["none", "gps", "all"] = "none"
    quality: int = Field(90, ge=0, le=100, description="JPEG/WebP quality")
    format: Literal["whole", "auto", "panorama"] | TileFormat = Field(
        "auto", description="tiling: " + FORMAT_HELP + " (auto: the catalog's, panoramas recognised)"
    )
    compress_level: int = Field(5, ge=0, le=9, description="PNG compression level")

    storage_options: dict = Field(default_factory=dict, description="fsspec options for remote URLs")
    models: str | None = Field(None, description="extra model catalog file (YAML/JSON): models and profiles")
    profile: str | None = Field(None, description=f"detection profile: fast, balanced, thorough or one of the "
                                                   f"--models file (default {DEFAULT_PROFILE})")
    detect_models: list[str] | None = Field(
        None, description="catalog models to run instead of a profile's, e.g. centerface")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_backend: CpuBackend = Field("auto", description=CPU_BACKEND_HELP)
    det_max_side: int = Field(2048, ge=256, le=16384, description="longer side of the detection copy, px")
    max_pixels: int = Field(250_000_000, ge=1, description="larger images are refused as TOO_LARGE")
    batch_size: int = Field(8, ge=1, le=1024, description="images per detection batch")
    detect_actors: int | None = Field(None, ge=1, le=4096, description="detection actors (default: from resources)")

    # --- archives (issue 4) ---
    archive_depth: int = Field(1, ge=0, le=8, description="archive nesting levels expanded; 0 = archives skipped")
    archive_password: str | None = Field(  # kept out of job.json and reprs
        None, exclude=True, repr=False, description="password for encrypted archive members"
    )
    archive_password_file: str | None = Field(None, description="file whose first line is the archive password")
    max_member_bytes: int = Field(2 * 2**30, ge=1, description="largest uncompressed archive member, bytes")
    max_archive_bytes: int = Field(2**40, ge=1, description="most uncompressed bytes taken from one archive")
    max_compression_ratio: float = Field(100.0, gt=1.0, description="largest uncompressed/compressed ratio")
    repack: Literal["none", "zip"] = Field("none", description="also write each input archive's anonymized members "
                                                               "as one zip under OUTPUT/JOB_ID/archives/")

    # --- video (issue 21, operators/video.py) ---
    tracking: bool = Field(True, description="link a video's detections over frames and fill short gaps")
    detect_every: int = Field(1, ge=1, le=100, description="run the detector on every Nth video frame")
    crf: int = Field(23, ge=0, le=51, description="video quality (constant rate factor; lower = better)")
    keep_bit_rate: bool = Field(False, description="encode videos at their source bit rate instead of a CRF")
    video_segment_seconds: float = Field(20.0, ge=0, description="long videos run as segments of about this "
                                                                 "many seconds, cut at keyframes (0 = whole)")

    # --- credits, approval and notification (issue 7) ---
    pricing: str | None = Field(None, description="pricing table file (YAML/JSON) laid over the default")
    max_credits: float | None = Field(None, ge=0, description="hard cap on the credits the job may charge")
    webhook: str | None = Field(None, description="URL that receives the job report (POST, JSON)")
    web_auth_header_name: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    web_auth_header_value: str | None = Field(None, exclude=True, repr=False)  # a secret: never stored

    @field_validator("webhook")
    @classmethod
    def _webhook_url(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is not None and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).netloc):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @field_validator("web_auth_header_value")
    @classmethod
    def _header_value(cls, v: str | None) -> str | None:
        # CR/LF would end the header (urllib refuses it only when the job posts, after all the work)
        if v is not None and any(c in v for c in "\r\n\0"):
            raise ValueError("must not contain CR, LF or NUL characters")
        return v

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, v: object) -> object:
        """One readable error naming the sub-field, instead of one per branch of the union; a JSON
        object may come as text (a flag, an API form field)."""
        if isinstance(v, str) and v.lstrip().startswith("{"):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg}); expected {FORMAT_HELP}") from None
        if isinstance(v, str):
            if v.strip().lower() not in TILING_PRESETS:
                raise ValueError(f"must be {FORMAT_HELP}")
            return v.strip().lower()
        if isinstance(v, dict):
            try:
                return TileFormat.model_validate(v)
            except ValidationError as exc:
                raise ValueError(_tile_errors(exc)) from None
        if isinstance(v, TileFormat):
            return v
        raise ValueError(f"must be {FORMAT_HELP}")

    @field_validator("detect_models", mode="before")
    @classmethod
    def _model_list(cls, v: object) -> object:
        """A comma-separated string (a flag, a form field) or a list of names."""
        if isinstance(v, str):
            v = [name.strip() for name in v.split(",") if name.strip()]
        if isinstance(v, list) and not v:
            raise ValueError("name at least one catalog model")
        return v

    @field_validator("job_id")
    @classmethod
    def _no_dots_only(cls, v: str) -> str:
        if re.fullmatch(r"\.+", v):
            raise ValueError("a job id cannot be dots only")
        return v

    @model_validator(mode="after")
    def _score_needs_debug(self) -> JobSpec:
        if self.score and not self.debug:
            raise ValueError("score draws scores on the debug boxes: give debug too")
        return self

    def public_dict(self) -> dict:
        """The spec as stored in job.json: secrets left out (passwords and the webhook header value
        are excluded fields; storage option values that look like credentials are masked)."""
        doc = self.model_dump(mode="json")
        doc["storage_options"] = {
            k: ("***" if any(w in k.lower() for w in SECRET_WORDS) else v) for k, v in self.storage_options.items()
        }
        return doc

    def anonymize_options(self) -> AnonymizeOptions:
        feathered = ("face", "license_plate")
        return AnonymizeOptions(
            method=self.method,
            bbox=self.bbox,
            kernels=self.kernels(),
            gradient_start={c: getattr(self, f"{c}_anonymization_gradient_start") for c in feathered},
            gradient_stop={c: getattr(self, f"{c}_anonymization_gradient_stop") for c in feathered},
            ignores=[(a.topLeftX, a.topLeftY, a.width, a.height) for a in self.ignores],
            shape_scale={"face": self.shape_scale_face},
        )

    def detect_tiling(self) -> str | dict:
        """`format` as the Detector takes it: a preset name or {"number": [..], "overlap": [..]}."""
        return self.format if isinstance(self.format, str) else self.format.model_dump(mode="json")

    def thresholds(self) -> dict[str, float | None]:
        """The thresholds given explicitly (None where the profile decides)."""
        return {c: getattr(self, f"{c}_threshold") for c in CLASSES}

    def kernels(self) -> dict[str, float]:
        return {c: getattr(self, f"kernel_size_{c}") for c in CLASSES}

    def requested_classes(self) -> list[str]:
        """The classes asked for by flag, or the default set when no flag is given."""
        flags = {c: getattr(self, c) for c in CLASSES}
        if any(v is not None for v in flags.values()):
            return [c for c in CLASSES if flags[c]]
        return list(DEFAULT_CLASSES)

    def detection_profile(self) -> Profile:
        """The profile the detectors follow: the one named (or the default), or one made of the
        `detect_models`; an explicit class threshold replaces that class's size rules."""
        try:
            catalog, profiles = load_catalog(self.models), load_profiles(self.models)
        except (OSError, ValueError, yaml.YAMLError) as exc:  # a missing or malformed --models file
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            raise SpecError(f"models: cannot use {self.models}: {reason}") from None
        if self.detect_models:
            if self.profile:
                raise SpecError("profile, detect-models: give one of them (a profile names its own models)")
            unknown = [n for n in self.detect_models if n not in catalog]
            if unknown:
                raise SpecError(f"detect-models: unknown model(s) {unknown}; the catalog has {sorted(catalog)}")
            vehicle_models = [m.model for m in profiles[DEFAULT_PROFILE].classes["vehicle"].members]
            given = {c: t for c, t in self.thresholds().items() if t is not None}
            profile = from_models(catalog, self.detect_models, list(CLASSES), vehicle_models,
                                  {**LEGACY_THRESHOLDS, **given})
        else:
            name = self.profile or DEFAULT_PROFILE
            if name not in profiles:
                raise SpecError(f"profile: unknown profile {name!r}; choose from {sorted(profiles)}")
            profile = resolve(profiles[name], catalog)
        plans = {c: (p.uniform(self.thresholds()[c]) if self.thresholds()[c] is not None else p)
                 for c, p in profile.classes.items()}
        return profile.model_copy(update={"classes": plans})

    def resolve_models(self) -> tuple[list[str], dict[str, ModelEntry]]:
        """(classes, models to load). Refuses a class asked for by flag that no model of the
        profile serves; drops such a class silently only from the implicit default set."""
        profile = self.detection_profile()
        served = sorted(profile.classes, key=CLASSES.index)
        classes = self.requested_classes()
        explicit = any(getattr(self, c) is not None for c in CLASSES)
        missing = [c for c in classes if c not in served]
        if missing and explicit:
            names = ", ".join("--" + c.replace("_", "-") for c in missing)
            how = "detect-models" if self.detect_models else f"profile {profile.name}"
            raise SpecError(f"{names}: no model of {how} detects {', '.join(missing)}; classes with a model: {served}")
        classes = [c for c in classes if c in served]
        if not classes:
            raise SpecError(f"no class to detect; choose from {served} (--face, --license-plate, ...)")
        catalog = load_catalog(self.models)
        return classes, {name: catalog[name] for name in profile.model_names(classes)}


# --detect-models without thresholds: single models score higher than averaged ensembles
LEGACY_THRESHOLDS = {"face": 0.2, "license_plate": 0.5, "person": 0.4, "vehicle": 0.4}


def build_spec(fields: dict) -> JobSpec:
    """JobSpec from a dict (flags, file or request), with errors as one readable SpecError."""
    try:
        return JobSpec.model_validate(fields)
    except ValidationError as exc:
        raise SpecError(_describe(exc)) from None


def _tile_errors(exc: ValidationError) -> str:
    """Errors of a tile grid as `format.number[0]: ...`, with what is allowed."""
    lines = []
    for err in exc.errors():
        name = "format." + str(err["loc"][0]) + "".join(f"[{p}]" for p in err["loc"][1:])
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{name}: {err['msg']}{got}")
    return "; ".join(lines) + " -- number: [nx, ny] tiles, 1..32 each; overlap: [ox, oy], a fraction 0..0.5 of a tile"


# Options a resumed job may change: where and how it runs, notification, the budget cap (a
# resume with a higher cap is how BUDGET_EXCEEDED items get processed), not what an item becomes.
RESUME_NEUTRAL = ("inputs", "output", "job_id", "storage_options", "device", "cpu_backend", "batch_size",
                  "detect_actors", "max_credits", "webhook", "web_auth_header_name", "archive_password_file",
                  "repack")


def spec_changes(earlier: dict, now: dict) -> list[str]:
    """Options (as flags) whose values differ between an earlier run's stored spec and this one's,
    among those that change what an item becomes (not RESUME_NEUTRAL)."""
    return [f"--{k.replace('_', '-')}" for k in now
            if k not in RESUME_NEUTRAL and k in earlier and earlier[k] != now[k]]


SECRET_FIELDS = ("archive_password", "web_auth_header_value")  # never echoed in an error


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = "-".join(str(p) for p in err["loc"]).replace("_", "-") or "spec"
        shown = "input" in err and not isinstance(err["input"], dict) and not (
            set(map(str, err["loc"])) & {*SECRET_FIELDS, *(f.replace("_", "-") for f in SECRET_FIELDS)})
        got = f" (got {err['input']!r})" if shown else ""
        lines.append(f"{name}: {err['msg']}{got}")
    return "; ".join(lines)


__all__ = ["JobSpec", "SpecError", "build_spec", "new_job_id", "METHODS"]
