"""Detect (an actor pool): run the job's models over the detection copies, in batches.

`Detector` loads each model once (from weights bytes handed to it, so workers need no disk or
network), runs every model over the batch, keeps each class above its threshold, merges
duplicates with NMS and maps boxes back to stored full-resolution pixels. Rows that failed
earlier pass through untouched.
"""

from __future__ import annotations

import time

import numpy as np

from models.adapters import adapter_class
from models.catalog import ModelEntry
from models.detections import CLASSES, Detections, merge_per_class
from operators.orientation import boxes_to_stored


class Detector:
    def __init__(
        self,
        models: list[tuple[dict, bytes]],
        classes: list[str],
        thresholds: dict[str, float],
        device: str = "cpu",
        threads: int = 0,
    ):
        """`models`: (catalog entry as a dict, prepared weights) pairs; `classes`: what to keep."""
        self.adapters = []
        for entry_fields, weights in models:
            entry = ModelEntry(**entry_fields)
            self.adapters.append(adapter_class(entry.adapter)(entry, weights, device, threads))
        self.class_ids = np.array([CLASSES.index(c) for c in classes], dtype=np.int16)
        self.thresholds = thresholds
        self.min_scores = np.array([thresholds.get(c, 0.5) for c in CLASSES], dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        todo = [i for i, s in enumerate(batch["status"]) if s == "pending"]
        images = [_det_image(batch, i) for i in todo]
        found = self.detect(images)
        per_item_ms = (time.perf_counter() - t0) * 1e3 / max(len(todo), 1)

        n = len(batch["item_id"])
        detections = np.full(n, "", dtype=object)
        t_detect = np.zeros(n, dtype=np.float64)
        for i, dets in zip(todo, found):
            det_h, det_w = int(batch["det_h"][i]), int(batch["det_w"][i])
            width, height = int(batch["width"][i]), int(batch["height"][i])
            orientation = int(batch["orientation"][i])
            detections[i] = to_stored_pixels(dets, det_w, det_h, width, height, orientation).to_json()
            t_detect[i] = per_item_ms
        out = {k: v for k, v in batch.items() if k != "det"}  # the copy is not needed downstream
        out["detections"] = detections
        out["t_detect_ms"] = t_detect
        return out

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """Detections per upright RGB image, in that image's pixels, thresholded and merged."""
        if not images:
            return []
        per_model = [adapter.detect(images, self.thresholds) for adapter in self.adapters]
        results = []
        for i in range(len(images)):
            dets = Detections.concat([found[i] for found in per_model])
            keep = np.isin(dets.classes, self.class_ids) & (dets.scores >= self.min_scores[dets.classes])
            results.append(merge_per_class(dets.select(keep)))
        return results


def to_stored_pixels(dets: Detections, det_w: int, det_h: int, width: int, height: int,
                     orientation: int) -> Detections:
    """Boxes on the upright detection copy -> boxes on the stored full-resolution image."""
    if len(dets) == 0:
        return dets
    rotated = orientation in (5, 6, 7, 8)
    stored_w, stored_h = (det_h, det_w) if rotated else (det_w, det_h)  # the copy before turning upright
    boxes = boxes_to_stored(dets.boxes, orientation, stored_w, stored_h)
    moved = Detections(boxes, dets.scores, dets.classes, dets.details, dets.models, dets.tiles)
    return moved.scaled(width / stored_w, height / stored_h).clipped(width, height)


def _det_image(batch: dict[str, np.ndarray], i: int) -> np.ndarray:
    h, w = int(batch["det_h"][i]), int(batch["det_w"][i])
    return np.frombuffer(batch["det"][i], dtype=np.uint8).reshape(h, w, 3)
