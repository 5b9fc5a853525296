"""Anonymize: apply the method (blur, pixelate, blacken) inside each detection's shape.

Shape: the ellipse inscribed in the box (default) or the box itself (`bbox=True`). Kernel sizes
follow the seed APIs: a value < 1 is a fraction of the object's shorter side, >= 1 is pixels.
Only pixels inside a shape change; everything else stays bit-identical.
"""

from __future__ import annotations

import cv2
import numpy as np

from models.detections import CLASSES, Detections

METHODS = ("blur", "pixelate", "blacken", "detect")
DEFAULT_KERNELS = {"face": 0.35, "license_plate": 0.5, "person": 95.0, "vehicle": 61.0}


def kernel_pixels(kernel: float, box_w: float, box_h: float) -> int:
    """The kernel size in pixels for one object (odd, >= 3)."""
    k = kernel * min(box_w, box_h) if kernel < 1 else kernel
    k = max(3, int(round(k)))
    return k if k % 2 else k + 1


def shape_mask(h: int, w: int, box_in_roi: tuple[float, float, float, float], bbox: bool) -> np.ndarray:
    """uint8 mask (255 inside) of the box or its inscribed ellipse, in ROI coordinates."""
    mask = np.zeros((h, w), dtype=np.uint8)
    x1, y1, x2, y2 = box_in_roi
    if bbox:
        mask[int(np.floor(y1)):int(np.ceil(y2)), int(np.floor(x1)):int(np.ceil(x2))] = 255
    else:
        center = (int(round((x1 + x2) / 2)), int(round((y1 + y2) / 2)))
        axes = (max(1, int(round((x2 - x1) / 2))), max(1, int(round((y2 - y1) / 2))))
        cv2.ellipse(mask, center, axes, 0, 0, 360, 255, thickness=-1)
    return mask


def anonymize(
    image: np.ndarray,
    dets: Detections,
    method: str = "blur",
    bbox: bool = False,
    kernels: dict[str, float] | None = None,
) -> np.ndarray:
    """A copy of `image` with every detection anonymized. Works on 1-, 3- or 4-channel images."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out = image.copy()
    if method == "detect":
        return out
    kernels = {**DEFAULT_KERNELS, **(kernels or {})}
    height, width = image.shape[:2]
    for box, cls in zip(dets.boxes, dets.classes, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        k = kernel_pixels(kernels[CLASSES[cls]], x2 - x1, y2 - y1)
        pad = k if method == "blur" else 0  # blur reads pixels around the shape
        rx1, ry1 = max(0, int(x1) - pad), max(0, int(y1) - pad)
        rx2, ry2 = min(width, int(np.ceil(x2)) + pad), min(height, int(np.ceil(y2)) + pad)
        if rx2 <= rx1 or ry2 <= ry1:
            continue
        roi = out[ry1:ry2, rx1:rx2]
        mask = shape_mask(ry2 - ry1, rx2 - rx1, (x1 - rx1, y1 - ry1, x2 - rx1, y2 - ry1), bbox)
        filled = _apply(roi, method, k)
        inside = mask > 0
        roi[inside] = filled[inside]
    return out


def _apply(roi: np.ndarray, method: str, k: int) -> np.ndarray:
    if method == "blacken":
        return np.zeros_like(roi)
    if method == "pixelate":
        h, w = roi.shape[:2]
        small = cv2.resize(roi, (max(1, w // k), max(1, h // k)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return cv2.GaussianBlur(roi, (k, k), 0)
