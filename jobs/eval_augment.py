"""`veil eval SET --augment blur,dark,jpeg30,down50`: degraded copies of a set's real photos.

Street photos are blurred by motion, dark at night, compressed hard and small; each augmentation
writes a copy of the set (images + annotations.json) into a temp folder, which is then evaluated
with the same settings as the clean set. Deterministic: no randomness except the night noise,
seeded from the file name. Pixels are read as stored (no EXIF turn: boxes are in the stored
orientation) and written without EXIF; lossless PNG except `jpeg30`, so the only loss is the
augmentation's own.

- blur:    Gaussian blur, sigma 2 px (out of focus)
- motion:  horizontal motion blur over 9 px (a moving camera or walker)
- dark:    night-like: gamma 2.2 and a third of the light, plus sensor noise (sigma 3 levels)
- jpeg30:  JPEG quality 30
- down50:  half the width and height, boxes scaled (buckets stay those of the clean photo)
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def _blur(rgb: np.ndarray, name: str) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=2.0)


def _motion(rgb: np.ndarray, name: str) -> np.ndarray:
    kernel = np.full((1, 9), 1 / 9, np.float32)
    return cv2.filter2D(rgb, -1, kernel, borderType=cv2.BORDER_REFLECT)


def _dark(rgb: np.ndarray, name: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # same noise for the same photo, every run
    light = (rgb.astype(np.float32) / 255) ** 2.2 * (255 / 3)
    return (light + rng.normal(0, 3, rgb.shape)).round().clip(0, 255).astype(np.uint8)


def _half(rgb: np.ndarray, name: str) -> np.ndarray:
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (max(1, round(w / 2)), max(1, round(h / 2))), interpolation=cv2.INTER_AREA)


# name -> (pixels function, box scale, JPEG quality or None for PNG)
AUGMENTATIONS: dict[str, tuple[Callable[[np.ndarray, str], np.ndarray], float, int | None]] = {
    "blur": (_blur, 1.0, None),
    "motion": (_motion, 1.0, None),
    "dark": (_dark, 1.0, None),
    "jpeg30": (lambda rgb, name: rgb, 1.0, 30),
    "down50": (_half, 0.5, None),
}


def parse_augmentations(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown or not names:
        raise ValueError(f"unknown augmentation {unknown or text!r}: choose from {', '.join(AUGMENTATIONS)}")
    return names


def augment_set(annotations: dict, set_dir: Path, name: str, dest: Path) -> dict:
    """Write `annotations`' images of `set_dir` augmented by `name` into `dest` (images/ and
    annotations.json, boxes and sizes scaled); returns the new annotations."""
    fn, scale, quality = AUGMENTATIONS[name]
    images = []
    for im in annotations["images"]:
        with Image.open(set_dir / im["file"]) as src:
            rgb = np.asarray(src.convert("RGB"))
        out = Image.fromarray(np.ascontiguousarray(fn(rgb, im["file"])))
        rel = str(Path(im["file"]).with_suffix(".jpg" if quality else ".png"))
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if quality:
            out.save(dest / rel, "JPEG", quality=quality)
        else:
            out.save(dest / rel, "PNG", compress_level=1)  # fast: the copy lives for one run
        boxes = [{**b, "xyxy": [v * scale for v in b["xyxy"]]} for b in im["boxes"]]
        images.append({**im, "file": rel, "width": out.width, "height": out.height, "boxes": boxes})
    size_scale = float(annotations.get("size_scale", 1.0)) * scale
    augmented = {**annotations, "images": images, "augmentation": name, "size_scale": size_scale}
    (dest / "annotations.json").write_text(json.dumps(augmented))
    return augmented
