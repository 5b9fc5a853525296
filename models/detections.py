"""`Detections`: the one structure that carries what a model found through every stage.

Boxes are pixel corners (x1, y1, x2, y2) as float32 in the coordinates of the image they were
found in; stages rescale them (`scaled`) rather than keeping parallel copies. From the detect stage
to the write stage a `Detections` travels as arrays, one item-row column per field (`to_row` /
`from_row`, ROW_COLUMNS): Ray Data keeps ragged per-item arrays as tensor and list columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# The seed APIs' four classes; the order is fixed (it is the class id).
CLASSES: tuple[str, ...] = ("face", "license_plate", "person", "vehicle")


@dataclass
class Detections:
    boxes: np.ndarray  # (N, 4) float32, x1 y1 x2 y2 pixels
    scores: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int16, index into CLASSES
    details: list[str] = field(default_factory=list)  # source class, e.g. "car"; "" if none
    models: list[str] = field(default_factory=list)  # catalog name of the model that found it
    tiles: np.ndarray | None = None  # (N,) int16, tile index the box came from (-1 = whole image)
    # Optional outline per box: flat [x0, y0, x1, y1, ...] pixels ([] = none), e.g. a plate mask's
    # contour or its 4 corners. Optional so older JSON (without the key) still reads.
    polygons: list[list[float]] | None = None

    def __post_init__(self) -> None:
        n = len(self.boxes)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(n, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(n)
        self.class_ids = np.asarray(self.class_ids, dtype=np.int16).reshape(n)
        self.details = list(self.details) if self.details else [""] * n
        self.models = list(self.models) if self.models else [""] * n
        self.tiles = (
            np.full(n, -1, dtype=np.int16) if self.tiles is None else np.asarray(self.tiles, np.int16)
        )
        self.polygons = [list(p) for p in self.polygons] if self.polygons else [[] for _ in range(n)]

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0))

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def class_names(self) -> list[str]:
        return [CLASSES[c] for c in self.class_ids]

    def select(self, keep: np.ndarray) -> Detections:
        """Rows where `keep` (bool mask or index array) holds."""
        idx = np.arange(len(self))[keep]
        return Detections(
            self.boxes[idx],
            self.scores[idx],
            self.class_ids[idx],
            [self.details[i] for i in idx],
            [self.models[i] for i in idx],
            self.tiles[idx],
            [self.polygons[i] for i in idx],
        )

    def scaled(self, sx: float, sy: float, dx: float = 0.0, dy: float = 0.0) -> Detections:
        """Boxes mapped by x' = x * sx + dx, y' = y * sy + dy (resize, then shift)."""
        boxes = self.boxes * np.array([sx, sy, sx, sy], np.float32) + np.array([dx, dy, dx, dy], np.float32)
        polygons = [
            [v * sx + dx if k % 2 == 0 else v * sy + dy for k, v in enumerate(p)] for p in self.polygons
        ]
        return Detections(boxes, self.scores, self.class_ids, self.details, self.models, self.tiles, polygons)

    def clipped(self, width: int, height: int) -> Detections:
        boxes = self.boxes.copy()
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        polygons = [
            [min(max(v, 0.0), width if k % 2 == 0 else height) for k, v in enumerate(p)] for p in self.polygons
        ]
        return Detections(
            boxes, self.scores, self.class_ids, self.details, self.models, self.tiles, polygons
        ).select(keep)

    @staticmethod
    def concat(parts: list[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Detections.empty()
        return Detections(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.class_ids for p in parts]),
            [d for p in parts for d in p.details],
            [m for p in parts for m in p.models],
            np.concatenate([p.tiles for p in parts]),
            [q for p in parts for q in p.polygons],
        )

    def to_row(self) -> dict[str, object]:
        """The item row's detection columns (ROW_COLUMNS), rounded as the outputs show them (boxes
        to 0.01 px, scores to 1e-4, outlines to 0.1 px)."""
        return {
            "dets_boxes": np.round(self.boxes, 2),
            "dets_scores": np.round(self.scores, 4),
            "dets_class_ids": self.class_ids.copy(),
            "dets_tiles": self.tiles.copy(),
            "dets_details": [str(d) for d in self.details],
            "dets_models": [str(m) for m in self.models],
            "dets_polygons": [[round(float(v), 1) for v in p] for p in self.polygons],
        }

    @classmethod
    def from_row(cls, row: Mapping) -> Detections:
        """The Detections of an item row (empty when the row has none: not detected, or a video).
        The values may come back from Ray Data as numpy arrays of any length, lists or tensors."""
        if row.get("dets_boxes") is None:
            return cls.empty()
        polygons = [[float(v) for v in p] for p in row.get("dets_polygons", ())]
        return cls(np.asarray(row["dets_boxes"], np.float32).reshape(-1, 4), row["dets_scores"],
                   row["dets_class_ids"], [str(d) for d in row["dets_details"]],
                   [str(m) for m in row["dets_models"]], row["dets_tiles"], polygons or None)


# The item row's detection columns (set by the detect stage, read by the write stage).
ROW_COLUMNS = tuple(Detections.empty().to_row())


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of x1y1x2y2 boxes."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod((br - tl).clip(0), axis=2)
    area_a = np.prod((a[:, 2:] - a[:, :2]).clip(0), axis=1)
    area_b = np.prod((b[:, 2:] - b[:, :2]).clip(0), axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first.

    Each kept box is compared with the boxes still standing only (never an N x N matrix): a
    CenterFace heatmap at a low threshold gives thousands of candidates, whose full IoU matrix
    took 26 ms per WIDER photo, more than the model's own inference under OpenVINO."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores), kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou < iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def merge_per_class(dets: Detections, iou_threshold: float = 0.4) -> Detections:
    """NMS within each class: merges duplicates from tiles, scales and models."""
    kept = []
    for c in np.unique(dets.class_ids):
        idx = np.flatnonzero(dets.class_ids == c)
        kept.extend(idx[nms(dets.boxes[idx], dets.scores[idx], iou_threshold)])
    return dets.select(np.sort(np.asarray(kept, dtype=np.int64)))
