"""`veil eval SET_DIR`: detection quality of the real pipeline on a labelled set.

The set is in the shared eval format (`annotations.json` + `images/`). The job runs exactly as
`veil run --method detect` would (prepare, Detector actors, manifest), then the detections are
read back from the manifest and matched to the ground truth, greedily by score:

- faces, persons, vehicles: a detection matches an unmatched box of its class at IoU >= 0.5;
- plates: IoU >= 0.3 or the plate's centre inside the detection (plate boxes are drawn tight).

Recall is reported per class and per object size (the box's longer side, px): < 20, 20-32,
32-64, 64-128, >= 128, with `covered` (>= 80 % of the box under the union of detections: the
privacy rule) beside it. Precision of a bucket counts a detection matched to a box of that bucket
as right, an unmatched one as wrong, and one matched to a box of another bucket neither way (so
faces < 20 px found do not count against the >= 20 px precision). Every figure is given for the
whole set and for its halves A and B (jobs/eval_scoring.py), or for one half with `half`.
Quality settings (models, thresholds, scales, tiling, vehicle crops) are flags; they become a
catalog override file, the same mechanism a user's own catalog uses, so the job under test is an
ordinary job. Threshold sweeps: jobs/eval_sweep.py; degraded copies: jobs/eval_augment.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from jobs.eval_augment import augment_set
from jobs.eval_scoring import BUCKET_NAMES, score_with_halves, split_halves

# re-exported: jobs/bench.py and tests/test_models.py import them from here
from jobs.eval_scoring import match_image as match_image
from jobs.eval_scoring import score_set as score_set
from jobs.eval_sweep import DEFAULT_GRID, SMALL_BELOW, run_sweep, threshold_label
from models.catalog import load_catalog
from models.detections import CLASSES


def override_catalog(
    classes: list[str],
    models: list[str] | None = None,
    scales: list[float] | None = None,
    combine: str | None = None,
    tiling: str | None = None,
    vehicle_crops: bool | None = None,
    extra: str | None = None,
    ensemble: str | None = None,
) -> dict:
    """Catalog entries that make a job use `models` for `classes` with the given passes."""
    catalog = load_catalog(extra)
    out = {}
    for name, entry in catalog.items():
        fields = entry.model_dump(exclude={"name"})
        if models is not None:
            served = sorted(entry.veil_classes & set(classes))
            if name in models and not served and "vehicle" in entry.veil_classes:
                served = ["vehicle"]  # named for plates: the vehicle helper of the two-stage search
            fields["default_for"] = served if name in models else []
        passes = fields["passes"]
        if scales is not None and entry.veil_classes & set(classes):
            passes["scales"] = scales
        if combine is not None:
            passes["combine"] = combine
        if tiling is not None:
            passes["tiling"] = tiling
        if ensemble is not None:
            passes["ensemble"] = ensemble
        if vehicle_crops is not None and "license_plate" in entry.veil_classes:
            passes["vehicle_crops"] = vehicle_crops
        out[name] = fields
    return out


def load_annotations(set_dir: str | Path) -> dict:
    return json.loads((Path(set_dir) / "annotations.json").read_text())


def detect_set(set_dir: Path, annotations: dict, classes: list[str], thresholds: dict[str, float] | None,
               catalog_fields: dict | None, log=print, **spec_fields) -> tuple[dict[str, list[dict]], dict]:
    """Run the pipeline in detect mode over the images `annotations` lists; returns their detection
    rows by file and the run's facts (profile, models, thresholds and plan per class, wall, img/s)."""
    from jobs.run import run_job
    from jobs.spec import build_spec

    with tempfile.TemporaryDirectory(prefix="veil-eval-") as tmp:
        inputs = set_dir / "images"
        if len(annotations["images"]) < sum(1 for p in inputs.iterdir() if p.is_file()):
            inputs = _link_images(set_dir, annotations, Path(tmp) / "in" / "images")  # a half: only its files
        fields = {"inputs": [str(inputs)], "output": str(Path(tmp) / "out"), "method": "detect",
                  **{c: c in classes for c in CLASSES}, **spec_fields}
        for c, t in (thresholds or {}).items():
            fields[f"{c}_threshold"] = t
        if catalog_fields is not None:
            cat = Path(tmp) / "catalog.yaml"
            cat.write_text(yaml.safe_dump(catalog_fields))
            fields["models"] = str(cat)
        spec = build_spec(fields)
        started = time.monotonic()
        doc = run_job(spec, log=log)
        wall = time.monotonic() - started
        found = _read_manifest(Path(tmp) / "out" / spec.job_id, set_dir)
        profile = spec.detection_profile()  # reads the catalog file, which lives in tmp
    n = len(annotations["images"])
    plans = {c: profile.classes[c] for c in classes if c in profile.classes}
    return found, {"models": sorted(doc.get("models", {})), "profile": profile.name,
                   "thresholds": {c: _thresholds(p.thresholds) for c, p in plans.items()},
                   "plans": {c: p.model_dump(exclude_none=True) for c, p in plans.items()},
                   "wall_s": round(wall, 2), "img_s": round(n / wall, 3) if wall else None}


def _thresholds(rules: list) -> float | list[dict]:
    """A plan's thresholds as the sweep takes them: one number, or the size rules."""
    dumped = [r.model_dump(exclude_none=True) for r in rules]
    return dumped[0]["score"] if len(dumped) == 1 else dumped


def _link_images(set_dir: Path, annotations: dict, dest: Path) -> Path:
    """The listed images in a folder of their own (hard links where the file system allows)."""
    for im in annotations["images"]:
        src, to = set_dir / im["file"], dest / Path(im["file"]).relative_to("images")  # rel_path as in the set
        to.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, to)
        except OSError:
            shutil.copyfile(src, to)
    return dest


def evaluate(set_dir: str | Path, classes: list[str] | None = None, thresholds: dict[str, float] | None = None,
             catalog_fields: dict | None = None, output: str | Path | None = None, log=print,
             half: str | None = None, halves: bool = True, **spec_fields) -> dict:
    """Run the pipeline over the set (or its `half` "A"/"B" only) and score it, with the figures of
    both halves unless one was asked for (or `halves` is off); writes the report as JSON to `output`."""
    set_dir = Path(set_dir)
    annotations = load_annotations(set_dir)
    if half is not None:
        annotations = split_halves(annotations)[half]
    classes = classes or labelled_classes(annotations)
    found, facts = detect_set(set_dir, annotations, classes, thresholds, catalog_fields, log, **spec_fields)
    result = score_with_halves(annotations, found, classes, halves=halves and half is None)
    result.update(set=annotations.get("set", set_dir.name), half=half or "all", **facts)
    _write(result, output)
    return result


def evaluate_sweep(set_dir: str | Path, cls: str, floor: float = 0.02, values: Sequence[float] | None = None,
                   target: float = 0.95, target_all: float = 0.75, below: float = SMALL_BELOW,
                   thresholds: dict[str, float] | None = None, catalog_fields: dict | None = None,
                   output: str | Path | None = None, log=print, rescore: str | Path | None = None,
                   **spec_fields) -> dict:
    """One run with `cls` kept down to `floor`, then the threshold sweep and the chosen thresholds
    (jobs/eval_sweep.py). Other classes are not detected: the sweep is about one class. The run's
    detections are kept in the report (`found`); `rescore`: such a report, swept again (other
    grid or targets) without running anything."""
    set_dir = Path(set_dir)
    annotations = load_annotations(set_dir)
    if rescore is not None:
        result = json.loads(Path(rescore).read_text())
        if result.get("sweep", {}).get("class") != cls or "found" not in result:
            from jobs.spec import SpecError

            raise SpecError(f"rescore: {rescore} is not the --json report of a {cls} sweep")
        floor = result["sweep"]["floor"]
        found = {f: [dict(zip(_FOUND_KEYS, (cls, *r), strict=True)) for r in rows]
                 for f, rows in result["found"].items()}
    else:
        found, facts = detect_set(set_dir, annotations, [cls], {**(thresholds or {}), cls: floor}, catalog_fields,
                                  log, **spec_fields)
        rows = {f: [[r[k] for k in _FOUND_KEYS[1:]] for r in rs if r["class"] == cls] for f, rs in found.items()}
        result = {"set": annotations.get("set", set_dir.name), "images": len(annotations["images"]), **facts,
                  "found": rows}
    result["sweep"] = run_sweep(annotations, found, cls, floor, values or DEFAULT_GRID, target, target_all, below)
    _write(result, output)
    return result


_FOUND_KEYS = ("class", "score", "x1", "y1", "x2", "y2")  # a sweep report's detections: score and box


def evaluate_augmented(set_dir: str | Path, augmentations: list[str], classes: list[str] | None = None,
                       output: str | Path | None = None, log=print, half: str | None = None, **settings) -> dict:
    """The clean set, then each augmented copy (jobs/eval_augment.py, written to a temp folder)
    with the same settings; `augment` holds each copy's report and its recall drop vs clean."""
    set_dir = Path(set_dir)
    clean = evaluate(set_dir, classes, log=log, half=half, **settings)
    annotations = load_annotations(set_dir)
    if half is not None:
        annotations = split_halves(annotations)[half]
    classes = list(clean["classes"])
    clean["augment"] = {}
    for name in augmentations:
        with tempfile.TemporaryDirectory(prefix=f"veil-eval-{name}-") as tmp:
            augment_set(annotations, set_dir, name, Path(tmp))
            scored = evaluate(tmp, classes, log=log, halves=half is None, **settings)
        scored["set"] = f"{clean['set']} {name}"
        clean["augment"][name] = {"result": scored, "drop": recall_drop(clean, scored)}
    _write(clean, output)
    return clean


def recall_drop(clean: dict, other: dict) -> dict[str, dict[str, float]]:
    """Clean recall minus `other`'s, per class and bucket (positive = worse), in recall units."""
    out: dict[str, dict[str, float]] = {}
    for cls, r in clean["classes"].items():
        theirs = other["classes"].get(cls, {}).get("buckets", {})
        out[cls] = {k: round(b["recall"] - theirs[k]["recall"], 4) for k, b in r["buckets"].items()
                    if b["recall"] is not None and theirs.get(k, {}).get("recall") is not None}
    return out


def labelled_classes(annotations: dict) -> list[str]:
    return sorted({b["label"] for im in annotations["images"] for b in im["boxes"]}, key=CLASSES.index)


def _write(result: dict, output: str | Path | None) -> None:
    if output:
        Path(output).write_text(json.dumps(result, indent=2))


def _read_manifest(job_root: Path, set_dir: Path) -> dict[str, list[dict]]:
    images = pq.read_table(job_root / "manifest" / "images", columns=["rel_path", "status"]).to_pylist()
    failed = [r["rel_path"] for r in images if r["status"] != "done"]
    if failed:
        raise RuntimeError(f"{len(failed)} images failed in the eval job, e.g. {failed[:3]}")
    return {"images/" + name: rows for name, rows in detections_by_rel_path(job_root).items()}


def detections_by_rel_path(job_root: Path) -> dict[str, list[dict]]:
    """A finished job's detection rows (manifest) by the image's relative path."""
    images = pq.read_table(job_root / "manifest" / "images", columns=["item_id", "rel_path"]).to_pylist()
    names = {r["item_id"]: r["rel_path"] for r in images}
    found: dict[str, list[dict]] = {}
    det_dir = job_root / "manifest" / "detections"
    if det_dir.exists() and any(det_dir.iterdir()):
        for r in pq.read_table(det_dir).to_pylist():
            found.setdefault(names[r["item_id"]], []).append(r)
    return found


def format_report(result: dict) -> str:
    """Per class and bucket: recall, covered (>= 80 % under detections) and precision, for the whole
    set and its halves A and B; then the augmented copies' recall and drop, when there are any."""
    half = "" if result.get("half", "all") == "all" else f" (half {result['half']})"
    lines = [f"set {result['set']}{half}: {header(result)}"]
    for cls, r in result["classes"].items():
        lines.append(f"  {cls} (threshold {threshold_label(result['thresholds'].get(cls))}): {r['detections']} "
                     f"detections, {r['false_positives']} unmatched")
        lines.append(f"    {'bucket':>7} {'part':>4}  {'recall':<15} {'covered':<15} precision")
        parts = {result.get("half", "all"): r, **r.get("halves", {})}  # one half run: its own name
        for key in r["buckets"]:
            for k, (name, p) in enumerate(parts.items()):
                b = p["buckets"].get(key)
                if b is not None:
                    recall, covered = _rate(b["recall"], b["found"], b["boxes"]), _rate(
                        b["covered_rate"], b["covered"], b["boxes"])
                    lines.append(f"    {key if k == 0 else '':>7} {name:>4}  {recall} {covered} {_num(b['precision'])}")
    if result.get("augment"):
        lines.append(_format_augment(result))
    return "\n".join(lines)


def header(result: dict) -> str:
    return (f"{result['images']} images, profile {result.get('profile')} ({', '.join(result['models'])}), "
            f"{result.get('img_s')} img/s (job wall {result.get('wall_s')} s)")


def _format_augment(result: dict) -> str:
    lines = ["  augmented copies (same settings; buckets by the clean photo's sizes): "
             "recall per bucket (change vs clean, points), covered all, img/s"]
    for cls, r in result["classes"].items():
        keys = [k for k in BUCKET_NAMES if k in r["buckets"]]
        lines.append(f"    {cls:<8}" + "".join(f"{k:>15}" for k in keys) + "  covered all  img/s")
        rows = [("clean", result, dict.fromkeys(keys, 0.0))]
        rows += [(name, a["result"], a["drop"].get(cls, {})) for name, a in result["augment"].items()]
        for name, res, drop in rows:
            b = res["classes"].get(cls, {}).get("buckets", {})
            cells = [f"{_num(b[k]['recall'])} ({0.0 - 100 * drop[k]:+5.1f})" if k in drop else "-" for k in keys]
            covered = _num(b.get("all", {}).get("covered_rate"))
            lines.append(f"    {name:<8}" + "".join(f"{c:>15}" for c in cells) + f"{covered:>13}  {res.get('img_s')}")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def _rate(v: float | None, n: int, d: int) -> str:
    return f"{_num(v)} ({n}/{d})".ljust(15)
