"""`veil eval SET_DIR`: detection quality of the real pipeline on a labelled set.

The set is in the shared eval format (`annotations.json` + `images/`). The job runs exactly as
`veil run --method detect` would (prepare, Detector actors, manifest), then the detections are
read back from the manifest and matched to the ground truth, greedily by score:

- faces, persons, vehicles: a detection matches an unmatched box of its class at IoU >= 0.5;
- plates: IoU >= 0.3 or the plate's centre inside the detection (plate boxes are drawn tight).

Recall is reported per class and per object size (the box's longer side, px): < 20, 20-32,
32-64, 64-128, >= 128. Precision of a bucket counts a detection matched to a box of that bucket
as right, an unmatched one as wrong, and one matched to a box of another bucket neither way (so
faces < 20 px found do not count against the >= 20 px precision). Quality settings (models,
thresholds, scales, tiling, vehicle crops) are flags; they become a catalog override file, the
same mechanism a user's own catalog uses, so the job under test is an ordinary job.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from models.catalog import load_catalog
from models.detections import CLASSES, box_iou

BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<20", 0, 20), ("20-32", 20, 32), ("32-64", 32, 64), ("64-128", 64, 128), (">=128", 128, 1e9),
)


def size_of(box) -> float:
    return float(max(box[2] - box[0], box[3] - box[1]))


def bucket_of(box) -> str:
    s = size_of(box)
    return next(name for name, lo, hi in BUCKETS if lo <= s < hi)


def match_image(gt: np.ndarray, dets: np.ndarray, scores: np.ndarray, plate: bool) -> np.ndarray:
    """For each detection (in any order) the index of the ground-truth box it matches, or -1.
    Greedy by score: the best-scoring detection takes its best unmatched box."""
    out = np.full(len(dets), -1, dtype=np.int64)
    if len(gt) == 0 or len(dets) == 0:
        return out
    iou = box_iou(dets, gt)
    ok = iou >= (0.3 if plate else 0.5)
    if plate:
        cx, cy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
        ok |= (dets[:, None, 0] <= cx) & (cx <= dets[:, None, 2]) & (dets[:, None, 1] <= cy) & (cy <= dets[:, None, 3])
    taken = np.zeros(len(gt), bool)
    for d in np.argsort(-scores, kind="stable"):
        cand = np.flatnonzero(ok[d] & ~taken)
        if len(cand):
            g = cand[np.argmax(iou[d, cand])]
            out[d] = g
            taken[g] = True
    return out


def score_set(annotations: dict, found: dict[str, list[dict]], classes: list[str]) -> dict:
    """Recall/precision per class and size bucket. `found`: image file -> detection rows
    (class, score, x1, y1, x2, y2) in the stored image's pixels."""
    names = [b[0] for b in BUCKETS] + ["all", ">=20"]
    result: dict = {"images": len(annotations["images"]), "classes": {}}
    for cls in classes:
        gt_n = dict.fromkeys(names, 0)
        hit = dict.fromkeys(names, 0)
        tp = dict.fromkeys(names, 0)
        fp = 0
        n_det = 0
        for im in annotations["images"]:
            gt = [b["xyxy"] for b in im["boxes"] if b["label"] == cls]
            rows = [r for r in found.get(im["file"], []) if r["class"] == cls]
            n_det += len(rows)
            gt_arr = np.asarray(gt, np.float32).reshape(-1, 4)
            det_arr = np.asarray([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in rows], np.float32).reshape(-1, 4)
            matched = match_image(gt_arr, det_arr, np.asarray([r["score"] for r in rows]), cls == "license_plate")
            gt_buckets = [bucket_of(b) for b in gt_arr]
            for b in gt_buckets:
                for key in _keys(b):
                    gt_n[key] += 1
            for g in matched[matched >= 0]:
                for key in _keys(gt_buckets[g]):
                    hit[key] += 1
                    tp[key] += 1
            fp += int((matched < 0).sum())
        per = {}
        for key in names:
            if gt_n[key] == 0 and tp[key] == 0:
                continue
            per[key] = {
                "boxes": gt_n[key],
                "found": hit[key],
                "recall": round(hit[key] / gt_n[key], 4) if gt_n[key] else None,
                "precision": round(tp[key] / (tp[key] + fp), 4) if tp[key] + fp else None,
            }
        result["classes"][cls] = {"detections": n_det, "false_positives": fp, "buckets": per}
    return result


def _keys(bucket: str) -> list[str]:
    keys = [bucket, "all"]
    if bucket != "<20":
        keys.append(">=20")
    return keys


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


def evaluate(set_dir: str | Path, classes: list[str] | None = None, thresholds: dict[str, float] | None = None,
             catalog_fields: dict | None = None, output: str | Path | None = None, log=print,
             **spec_fields) -> dict:
    """Run the pipeline over the set and score it; writes the report as JSON to `output`."""
    from jobs.run import run_job
    from jobs.spec import build_spec

    set_dir = Path(set_dir)
    annotations = json.loads((set_dir / "annotations.json").read_text())
    labelled = sorted({b["label"] for im in annotations["images"] for b in im["boxes"]}, key=CLASSES.index)
    classes = classes or labelled
    with tempfile.TemporaryDirectory(prefix="veil-eval-") as tmp:
        fields = {"inputs": [str(set_dir / "images")], "output": str(Path(tmp) / "out"), "method": "detect",
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
    result = score_set(annotations, found, classes)
    result.update(set=annotations.get("set", set_dir.name), models=sorted(doc.get("models", {})),
                  thresholds={c: getattr(spec, f"{c}_threshold") for c in classes},
                  passes={n: e["passes"] for n, e in (catalog_fields or {}).items() if e.get("default_for")},
                  wall_s=round(wall, 2), img_s=round(len(annotations["images"]) / wall, 3) if wall else None)
    if output:
        Path(output).write_text(json.dumps(result, indent=2))
    return result


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
    lines = [f"set {result['set']}: {result['images']} images, models {', '.join(result['models'])}, "
             f"{result.get('img_s')} img/s (job wall {result.get('wall_s')} s)"]
    for cls, r in result["classes"].items():
        lines.append(f"  {cls}: {r['detections']} detections, {r['false_positives']} unmatched")
        for key, b in r["buckets"].items():
            rec = "-" if b["recall"] is None else f"{b['recall']:.3f}"
            prec = "-" if b["precision"] is None else f"{b['precision']:.3f}"
            lines.append(f"    {key:>7}: recall {rec} ({b['found']}/{b['boxes']})  precision {prec}")
    return "\n".join(lines)
