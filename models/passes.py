"""Passes over one image: the whole image, upscaled copies, overlapping tiles, vehicle crops.

Small objects decide recall: WIDER's median face is 15x18 px and a plate on a 1280 px street
photo shrinks to a few pixels when a 640 model sees the whole frame. A *view* is a window of the
image and a resize factor; every view of every image runs through a model in one batched call,
and its detections are mapped back to image pixels. Views of one pass (tiles) are merged by NMS
after dropping boxes cut by an inner tile edge (the neighbouring tile, which overlaps, sees that
object whole); passes are combined either by averaging scores (a pass that missed counts 0 —
measured here to beat a plain NMS union for faces at several scales) or by a max/NMS union.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from models.detections import Detections, box_iou, merge_per_class

EDGE_PX = 2.0  # a box this close to an inner tile edge is cut by it


@dataclass(frozen=True)
class View:
    image: int  # index of the image in the batch
    window: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels
    factor: float  # resize factor applied to the window before the model sees it
    pass_id: int  # views of one pass are merged together (tiles), passes are then combined
    tile: int = -1  # tile index within the pass, -1 = whole image
    inner: tuple[bool, bool, bool, bool] = (False, False, False, False)  # left, top, right, bottom edge is inner


def tile_windows(width: int, height: int, nx: int, ny: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """An nx x ny grid of windows covering the image, neighbours overlapping by `overlap` of a tile."""
    tw = width / (nx - (nx - 1) * overlap) if nx > 1 else width
    th = height / (ny - (ny - 1) * overlap) if ny > 1 else height
    out = []
    for j in range(ny):
        for i in range(nx):
            x0 = round(i * tw * (1 - overlap))
            y0 = round(j * th * (1 - overlap))
            out.append((x0, y0, min(width, round(x0 + tw)), min(height, round(y0 + th))))
    return out


def grid_for(width: int, height: int, tile: int, overlap: float) -> tuple[int, int]:
    """The smallest grid whose tiles are at most `tile` px on a side at the given overlap."""

    def count(side: int) -> int:
        if side <= tile:
            return 1
        return int(np.ceil((side / tile - overlap) / (1 - overlap)))

    return count(width), count(height)


def tiled_views(image: int, width: int, height: int, nx: int, ny: int, overlap: float,
                pass_id: int, factor: float = 1.0) -> list[View]:
    views = []
    for k, (x0, y0, x1, y1) in enumerate(tile_windows(width, height, nx, ny, overlap)):
        inner = (x0 > 0, y0 > 0, x1 < width, y1 < height)
        views.append(View(image, (x0, y0, x1, y1), factor, pass_id, k, inner))
    return views


def crop(img: np.ndarray, view: View) -> np.ndarray:
    x0, y0, x1, y1 = view.window
    part = img[y0:y1, x0:x1]
    if view.factor == 1.0:
        return np.ascontiguousarray(part)
    h, w = part.shape[:2]
    size = (max(1, round(w * view.factor)), max(1, round(h * view.factor)))
    interp = cv2.INTER_LINEAR if view.factor > 1 else cv2.INTER_AREA
    return cv2.resize(part, size, interpolation=interp)


def to_image(dets: Detections, view: View) -> Detections:
    """Detections on a view -> image pixels, dropping boxes cut by an inner tile edge."""
    if len(dets) == 0:
        return dets
    x0, y0, x1, y1 = view.window
    f = view.factor
    if any(view.inner):
        w, h = (x1 - x0) * f, (y1 - y0) * f
        b = dets.boxes
        cut = np.zeros(len(dets), bool)
        for edge, hit in zip(view.inner, (b[:, 0] <= EDGE_PX, b[:, 1] <= EDGE_PX,
                                          b[:, 2] >= w - EDGE_PX, b[:, 3] >= h - EDGE_PX), strict=True):
            if edge:
                cut |= hit
        dets = dets.select(~cut)
    moved = dets.scaled(1 / f, 1 / f, x0, y0)
    moved.tiles = np.full(len(moved), view.tile, np.int16)
    return moved


def run_views(adapter, images: list[np.ndarray], views: list[View],
              thresholds: dict[str, float]) -> list[tuple[View, Detections]]:
    """Every view through `adapter` in one batched call; detections in image pixels."""
    if not views:
        return []
    found = adapter.detect([crop(images[v.image], v) for v in views], thresholds)
    return [(v, to_image(d, v)) for v, d in zip(views, found, strict=True)]


def combine_passes(per_pass: list[Detections], mode: str = "mean", iou: float = 0.4) -> Detections:
    """One set of detections from several passes over the same image.

    `max`: NMS union. `mean`: detections of different passes that overlap (IoU >= `iou`, same
    class) are one object whose score is the mean over all passes of each pass's best score
    there, a pass that missed counting 0 — one pass's confident false positive is diluted, an
    object seen at every scale keeps its score. The box is the highest-scoring pass's box.
    """
    per_pass = [merge_per_class(p, iou) for p in per_pass]
    if mode == "max" or len(per_pass) == 1:
        return merge_per_class(Detections.concat(per_pass), iou)
    allp = Detections.concat(per_pass)
    if len(allp) == 0:
        return allp
    pass_of = np.concatenate([np.full(len(p), k) for k, p in enumerate(per_pass)])
    order = np.argsort(-allp.scores, kind="stable")
    ious = box_iou(allp.boxes, allp.boxes)
    used = np.zeros(len(allp), bool)
    keep, scores = [], []
    for i in order:
        if used[i]:
            continue
        best = np.zeros(len(per_pass), np.float32)
        members = np.flatnonzero(~used & (ious[i] >= iou) & (allp.classes == allp.classes[i]))
        for m in members:
            best[pass_of[m]] = max(best[pass_of[m]], allp.scores[m])
        used[members] = True
        used[i] = True
        keep.append(i)
        scores.append(best.mean())
    out = allp.select(np.asarray(keep, np.int64))
    out.scores = np.asarray(scores, np.float32)
    return out


def vehicle_crop_views(vehicles: Detections, width: int, height: int, model_side: int,
                       max_factor: float, pass_id: int, image: int, min_side: int = 24) -> list[View]:
    """Windows around each vehicle for a second plate search: the box grown by 10 %, then grown
    further (centred) until upscaling it to `model_side` needs at most `max_factor`, so a far
    car is searched at up to that zoom and never blown up into mush."""
    views = []
    least = model_side / max_factor
    for k, (x1, y1, x2, y2) in enumerate(vehicles.boxes):
        if min(x2 - x1, y2 - y1) < min_side:
            continue
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half = max((x2 - x1) * 1.1, (y2 - y1) * 1.1, least) / 2
        wx0, wy0 = int(max(0, cx - half)), int(max(0, cy - half))
        wx1, wy1 = int(min(width, cx + half)), int(min(height, cy + half))
        side = max(wx1 - wx0, wy1 - wy0)
        factor = min(max_factor, model_side / max(side, 1))
        views.append(View(image, (wx0, wy0, wx1, wy1), float(factor), pass_id, 1000 + k))
    return views
