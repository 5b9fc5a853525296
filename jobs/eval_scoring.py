"""Pure scoring for `veil eval`: matching, recall/precision/coverage per size bucket, the two halves
of a set, and size-aware score thresholds applied offline. No Ray, no files: dicts in, dicts out.

- Matching (faces, persons, vehicles): a detection matches an unmatched box of its class at IoU
  >= 0.5, greedily by score; plates: IoU >= 0.3 or the plate's centre inside the detection.
- Buckets: the ground-truth box's longer side, px: < 20, 20-32, 32-64, 64-128, >= 128, plus `all`
  and `>=20`. An augmented copy that was resized says so (`size_scale` in its annotations); its
  boxes are bucketed by their size in the clean photo, so a drop is measured on the same faces.
- Coverage: the fraction of a box's area inside the union of the detections of its class in that
  image (any detection, matched or not); the box is `covered` (protected) at >= 0.8. The union of
  the detection *boxes* is counted, which is what `--bbox` anonymizes; without it the anonymizer
  blurs the ellipse inscribed in each box (pi/4 of it), so this is an upper bound there.
- Halves: the images sorted by file name, even positions (0, 2, ...) are half A, odd are half B.
  Thresholds are picked on A and reported on B (jobs/eval_sweep.py), so drift between them shows.
- Thresholds: a number, or size-aware rules in the profiles' format, first match wins:
  `[{"below": 20, "score": 0.2}, {"score": 0.05}]` = a detection whose longer side is < 20 px
  needs 0.2, any other 0.05.
"""

from __future__ import annotations

import numpy as np

from models.detections import box_iou

BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<20", 0, 20), ("20-32", 20, 32), ("32-64", 32, 64), ("64-128", 64, 128), (">=128", 128, 1e9),
)
BUCKET_NAMES: tuple[str, ...] = tuple(b[0] for b in BUCKETS) + ("all", ">=20")
COVERED_AT = 0.8  # a box counts as protected when this much of it lies under detections
HALVES = ("A", "B")

Thresholds = float | list[dict]


def size_of(box) -> float:
    return float(max(box[2] - box[0], box[3] - box[1]))


def bucket_of(box, scale: float = 1.0) -> str:
    """The size bucket of a box; `scale`: how much the photo was resized (its boxes are bucketed
    by their size before)."""
    s = size_of(box) / scale
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


def covered_fraction(box, dets: np.ndarray) -> float:
    """Exact fraction of `box`'s area inside the union of the rectangles `dets` (N, 4).

    The detections are clipped to the box, their edges cut it into a grid of cells, and a cell
    counts when its centre lies inside any detection (cells never straddle an edge)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    area = (x2 - x1) * (y2 - y1)
    if area <= 0 or len(dets) == 0:
        return 0.0
    d = np.asarray(dets, np.float64).reshape(-1, 4).copy()
    d[:, [0, 2]] = d[:, [0, 2]].clip(x1, x2)
    d[:, [1, 3]] = d[:, [1, 3]].clip(y1, y2)
    d = d[(d[:, 2] > d[:, 0]) & (d[:, 3] > d[:, 1])]
    if len(d) <= 1:  # the common case, without the grid
        return float((d[:, 2] - d[:, 0]) @ (d[:, 3] - d[:, 1])) / area
    xs = np.unique(np.concatenate([[x1, x2], d[:, 0], d[:, 2]]))
    ys = np.unique(np.concatenate([[y1, y2], d[:, 1], d[:, 3]]))
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    inside_x = (d[:, None, 0] < cx) & (cx < d[:, None, 2])  # (N, nx)
    inside_y = (d[:, None, 1] < cy) & (cy < d[:, None, 3])  # (N, ny)
    cells = (inside_y[:, :, None] & inside_x[:, None, :]).any(axis=0)  # (ny, nx)
    return float(np.diff(ys) @ cells @ np.diff(xs)) / area


def min_score(size: float, thresholds: Thresholds) -> float:
    """The score a detection of longer side `size` px needs (first rule whose `below` exceeds it)."""
    if isinstance(thresholds, int | float):
        return float(thresholds)
    for rule in thresholds:
        if "below" not in rule or size < rule["below"]:
            return float(rule["score"])
    raise ValueError(f"size-aware thresholds need a last rule without 'below': {thresholds}")


def apply_thresholds(found: dict[str, list[dict]], cls: str, thresholds: Thresholds) -> dict[str, list[dict]]:
    """Detection rows of `cls` that pass `thresholds` (other classes' rows are kept as they are)."""
    return {f: [r for r in rows if r["class"] != cls or r["score"] >= min_score(_row_size(r), thresholds)]
            for f, rows in found.items()}


def _row_size(r: dict) -> float:
    return max(r["x2"] - r["x1"], r["y2"] - r["y1"])


def split_halves(annotations: dict) -> dict[str, dict]:
    """{"A": ..., "B": ...}: the images sorted by file name, even positions in A, odd in B."""
    images = sorted(annotations["images"], key=lambda im: im["file"])
    return {h: {**annotations, "images": images[k::2], "half": h} for k, h in enumerate(HALVES)}


def score_set(annotations: dict, found: dict[str, list[dict]], classes: list[str]) -> dict:
    """Recall/coverage/precision per class and size bucket. `found`: image file -> detection rows
    (class, score, x1, y1, x2, y2) in the stored image's pixels, already thresholded."""
    scale = float(annotations.get("size_scale", 1.0))
    result: dict = {"images": len(annotations["images"]), "classes": {}}
    for cls in classes:
        gt_n, hit, covered, tp = ({k: 0 for k in BUCKET_NAMES} for _ in range(4))
        fp = n_det = 0
        for im in annotations["images"]:
            gt = np.asarray([b["xyxy"] for b in im["boxes"] if b["label"] == cls], np.float32).reshape(-1, 4)
            rows = [r for r in found.get(im["file"], []) if r["class"] == cls]
            n_det += len(rows)
            dets = np.asarray([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in rows], np.float32).reshape(-1, 4)
            matched = match_image(gt, dets, np.asarray([r["score"] for r in rows]), cls == "license_plate")
            buckets = [bucket_of(b, scale) for b in gt]
            touching = ((dets[None, :, 0] < gt[:, None, 2]) & (dets[None, :, 2] > gt[:, None, 0])
                        & (dets[None, :, 1] < gt[:, None, 3]) & (dets[None, :, 3] > gt[:, None, 1]))
            for box, b, near in zip(gt, buckets, touching, strict=True):
                protected = int(covered_fraction(box, dets[near]) >= COVERED_AT)
                for key in _keys(b):
                    gt_n[key] += 1
                    covered[key] += protected
            for g in matched[matched >= 0]:
                for key in _keys(buckets[g]):
                    hit[key] += 1
                    tp[key] += 1
            fp += int((matched < 0).sum())
        per = {}
        for key in BUCKET_NAMES:
            if gt_n[key] == 0 and tp[key] == 0:
                continue
            per[key] = {
                "boxes": gt_n[key],
                "found": hit[key],
                "recall": _rate(hit[key], gt_n[key]),
                "covered": covered[key],
                "covered_rate": _rate(covered[key], gt_n[key]),
                # matched to a box of another bucket: neither right nor wrong here
                "precision": _rate(tp[key], tp[key] + fp),
            }
        result["classes"][cls] = {"detections": n_det, "false_positives": fp, "buckets": per}
    return result


def score_with_halves(annotations: dict, found: dict[str, list[dict]], classes: list[str],
                      halves: bool = True) -> dict:
    """score_set on the whole set, with each class's figures on half A and half B under `halves`."""
    result = score_set(annotations, found, classes)
    if halves:
        for h, part in split_halves(annotations).items():
            scored = score_set(part, found, classes)
            for cls, r in result["classes"].items():
                r.setdefault("halves", {})[h] = scored["classes"][cls]
    return result


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def _keys(bucket: str) -> list[str]:
    keys = [bucket, "all"]
    if bucket != "<20":
        keys.append(">=20")
    return keys
