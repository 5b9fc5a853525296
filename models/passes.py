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

import math
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


Overlap = float | tuple[float, float]  # one fraction for both axes, or (across, down)


def tile_windows(width: int, height: int, nx: int, ny: int, overlap: Overlap) -> list[tuple[int, int, int, int]]:
    """An nx x ny grid of windows covering the image, neighbours overlapping by `overlap` of a tile."""
    ox, oy = overlap if isinstance(overlap, tuple) else (overlap, overlap)
    tw = width / (nx - (nx - 1) * ox) if nx > 1 else width
    th = height / (ny - (ny - 1) * oy) if ny > 1 else height
    out = []
    for j in range(ny):
        for i in range(nx):
            x0 = round(i * tw * (1 - ox))
            y0 = round(j * th * (1 - oy))
            out.append((x0, y0, min(width, round(x0 + tw)), min(height, round(y0 + th))))
    return out


def grid_for(width: int, height: int, tile: int, overlap: float) -> tuple[int, int]:
    """The smallest grid whose tiles are at most `tile` px on a side at the given overlap."""

    def count(side: int) -> int:
        if side <= tile:
            return 1
        return int(np.ceil((side / tile - overlap) / (1 - overlap)))

    return count(width), count(height)


def panorama_grid(width: int, height: int, overlap: float) -> tuple[int, int] | None:
    """One row of square tiles as tall as the image (a 2:1 panorama in a square-input model would
    leave most of the input to letterbox padding), or None when the image is not wider than tall."""
    nx = grid_for(width, height, height, overlap)[0]
    return (nx, 1) if nx > 1 else None


def tiled_views(image: int, width: int, height: int, nx: int, ny: int, overlap: Overlap,
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
        members = np.flatnonzero(~used & (ious[i] >= iou) & (allp.class_ids == allp.class_ids[i]))
        for m in members:
            best[pass_of[m]] = max(best[pass_of[m]], allp.scores[m])
        used[members] = True
        used[i] = True
        keep.append(i)
        scores.append(best.mean())
    out = allp.select(np.asarray(keep, np.int64))
    out.scores = np.asarray(scores, np.float32)
    return out


def near(dets: Detections, vehicles: Detections, grow: float) -> Detections:
    """`dets` whose box centre lies inside a vehicle box grown by `grow` of its size on each side
    (a plate on a car, not a sign behind it)."""
    if len(dets) == 0 or len(vehicles) == 0:
        return dets.select(np.zeros(len(dets), bool))
    v = vehicles.boxes
    pad_x, pad_y = (v[:, 2] - v[:, 0]) * grow, (v[:, 3] - v[:, 1]) * grow
    cx = (dets.boxes[:, 0] + dets.boxes[:, 2]) / 2
    cy = (dets.boxes[:, 1] + dets.boxes[:, 3]) / 2
    inside = ((cx[:, None] >= v[None, :, 0] - pad_x) & (cx[:, None] <= v[None, :, 2] + pad_x)
              & (cy[:, None] >= v[None, :, 1] - pad_y) & (cy[:, None] <= v[None, :, 3] + pad_y))
    return dets.select(inside.any(axis=1))


CROP_MERGE_GROWTH = 1.25  # two crops become one when that costs at most 20 % of the zoom


def vehicle_crop_views(vehicles: Detections, width: int, height: int, model_side: int,
                       max_factor: float, pass_id: int, image: int, min_side: int = 24) -> list[View]:
    """Windows around each vehicle for a second plate search: the box grown by 10 %, then grown
    further (centred) until upscaling it to `model_side` needs at most `max_factor`, so a far
    car is searched at up to that zoom and never blown up into mush."""
    least = model_side / max_factor
    windows = []
    for x1, y1, x2, y2 in vehicles.boxes:
        if min(x2 - x1, y2 - y1) < min_side:
            continue
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half = max((x2 - x1) * 1.1, (y2 - y1) * 1.1, least) / 2
        windows.append((max(0.0, cx - half), max(0.0, cy - half), min(width, cx + half), min(height, cy + half)))
    views = []
    for k, (wx0, wy0, wx1, wy1) in enumerate(merge_windows(windows)):
        side = max(wx1 - wx0, wy1 - wy0)
        factor = min(max_factor, model_side / max(side, 1))
        views.append(View(image, (int(wx0), int(wy0), int(wx1), int(wy1)), float(factor), pass_id, 1000 + k))
    return views


def merge_windows(windows: list[tuple], growth: float = CROP_MERGE_GROWTH) -> list[tuple]:
    """Join crop windows whose union is at most `growth` times the larger one's side: a row of
    parked cars is searched in a few crops instead of one per car, at nearly the same zoom."""
    merged = list(windows)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                a, b = merged[i], merged[j]
                u = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                if max(u[2] - u[0], u[3] - u[1]) <= growth * max(a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]):
                    merged[i] = u
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    return merged


# --- The panorama seam ----------------------------------------------------------------------------
# The left and right edges of an equirectangular panorama are the same meridian: an object standing
# on it is cut into two halves that no model recognises. The detection copy is extended on the right
# by a strip copied from its left edge, so the object is whole once; boxes then go back modulo the
# width, and one that crosses the seam becomes two, one at each edge.

SEAM_STRIP = 1 / 8  # of the width: 45 degrees of view, wider than a face or a plate next to the camera
SEAM_TILE = -2  # `tiles` value of both halves of a box split at the seam (they share class and score)
SLIVER_PX = 1.0


def seam_strip(width: int) -> int:
    """Width in px of the strip appended to a panorama `width` px wide."""
    return max(1, math.ceil(width * SEAM_STRIP))


def wrap_seam(img: np.ndarray, strip: int) -> np.ndarray:
    """The image with a copy of its first `strip` columns appended on the right."""
    return np.concatenate([img, img[:, :strip]], axis=1)


def unwrap_seam(dets: Detections, width: int, strip: int, iou: float = 0.4) -> Detections:
    """Detections on a wrapped copy -> the panorama's own pixels.

    Boxes cut by an outer edge of the copy whose object the copy also holds whole are dropped (as
    with tiles): at x = 0 (the seam; the strip holds it) and at the strip's end (the left edge holds
    it). Boxes inside the strip move back by `width`, and what the left edge and the strip both
    found becomes one detection (NMS). A box across the seam becomes its two halves; they are kept
    out of that NMS: halves of neighbours all start at x = 0 and overlap more than the whole boxes
    did (which NMS on the wrapped copy has already judged)."""
    if len(dets) == 0:
        return dets
    b = dets.boxes
    cut_at_seam = (b[:, 0] <= EDGE_PX) & (b[:, 2] < strip - EDGE_PX)
    cut_at_end = (b[:, 2] >= width + strip - EDGE_PX) & (b[:, 0] >= width)
    dets = dets.select(~(cut_at_seam | cut_at_end))
    b = dets.boxes
    stay = b[:, 2] <= width + SLIVER_PX  # a box past the seam by a sliver is not split in two
    moved = ~stay & (b[:, 0] >= width - SLIVER_PX)
    kept, back = dets.select(stay), dets.select(moved).scaled(1, 1, -width, 0)
    kept.boxes[:, 2] = np.minimum(kept.boxes[:, 2], width)
    back.boxes[:, 0] = np.maximum(back.boxes[:, 0], 0)
    once = merge_per_class(Detections.concat([kept, back]), iou)
    return Detections.concat([once, *split_at_seam(dets.select(~stay & ~moved), width)])


def split_at_seam(across: Detections, width: int) -> tuple[Detections, Detections]:
    """(right halves, left halves) of boxes that cross x = `width`, in the panorama's pixels.

    Each half carries an outline: the object's own, else the ellipse inscribed in the whole box,
    cut at the seam. Without it the anonymizer would draw the ellipse of each half box, which is
    thinnest exactly at the seam, where the object's centre is."""
    right, left = across.select(np.arange(len(across))), across.scaled(1, 1, -width, 0)
    right.boxes[:, 2] = width
    left.boxes[:, 0] = 0
    for k, box in enumerate(across.boxes):
        outline = np.asarray(across.polygons[k] or ellipse_outline(box), np.float32).reshape(-1, 2)
        right.polygons[k] = np.column_stack([outline[:, 0].clip(max=width), outline[:, 1]]).ravel().tolist()
        left.polygons[k] = np.column_stack([(outline[:, 0] - width).clip(min=0), outline[:, 1]]).ravel().tolist()
    right.tiles = np.full(len(across), SEAM_TILE, np.int16)
    left.tiles = np.full(len(across), SEAM_TILE, np.int16)
    return right, left


def ellipse_outline(box: np.ndarray, points: int = 32) -> list[float]:
    """The ellipse inscribed in an x1 y1 x2 y2 box as a flat [x0, y0, x1, y1, ...] polygon."""
    x1, y1, x2, y2 = (float(v) for v in box)
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    xs = (x1 + x2) / 2 + (x2 - x1) / 2 * np.cos(t)
    ys = (y1 + y2) / 2 + (y2 - y1) / 2 * np.sin(t)
    return np.column_stack([xs, ys]).ravel().tolist()
