"""YuNet (OpenCV Zoo's face detector, 2023mar): anchor-free heads at strides 8, 16, 32.

Per stride the model gives, for every cell of the input's grid (row-major, N = H/s * W/s):
`cls_s` and `obj_s` (N x 1, already sigmoid), `bbox_s` (N x 4: centre offset in cells, log size
in strides) and `kps_s` (N x 10: five face points, offsets in cells). A face's score is
sqrt(cls * obj). Input: the image as BGR float 0..255, no mean or scale, padded at the bottom and
right to a multiple of 32 (128 under OpenVINO: see Adapter.shape_step) so each stride's grid is exact.

The published graph fixes its input at 1x3x640x640; its reshapes flatten with -1 but pin the
batch to 1. `prepare` makes batch, height and width dynamic (same outputs at 640x640, checked in
tests/test_yunet.py) so photos run at their own size and same-sized images as one batch.

Catalog options: `nms_iou` (default 0.3, OpenCV FaceDetectorYN's).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from models.adapters.base import Adapter, fill_chw, set_dims
from models.detections import Detections, nms

STRIDES = (8, 16, 32)
HEADS = ("cls", "obj", "bbox", "kps")
CHUNK = 16  # images per call: bounds the input tensor of a batch of large same-sized photos


class YuNet(Adapter):
    prepare_version = 1

    @staticmethod
    def prepare(raw: bytes) -> bytes:
        model = onnx.load_from_string(raw)
        graph = model.graph
        consts = {init.name: init for init in graph.initializer}
        # Reshape shapes (several reshapes share one), each [1, -1, C] on a (1, h, w, C) tensor.
        for name in {n.input[1] for n in graph.node if n.op_type == "Reshape"}:
            shape = numpy_helper.to_array(consts[name])
            if shape.tolist()[:2] != [1, -1] or len(shape) != 3:
                raise ValueError(f"unexpected YuNet reshape to {shape.tolist()}: not the 2023mar graph")
            # 0 copies the batch dim from the reshaped tensor: [1, -1, C] -> [0, -1, C].
            consts[name].CopyFrom(numpy_helper.from_array(np.array([0, -1, shape[2]], shape.dtype), name))
        set_dims(graph.input[0], ["B", 3, "H", "W"])
        for out in graph.output:
            channels = out.type.tensor_type.shape.dim[2].dim_value
            set_dims(out, ["B", f"N{out.name.split('_')[1]}", channels])
        del graph.value_info[:]  # stale 640x640 shapes of intermediate tensors
        onnx.checker.check_model(model)
        return model.SerializeToString()

    def __init__(self, entry, model_bytes: bytes, backend: str = "cpu", threads: int = 0):
        super().__init__(entry, model_bytes, backend, threads)
        self.nms_iou = float(entry.options.get("nms_iou", 0.3))
        self.output_names = [f"{head}_{s}" for s in STRIDES for head in HEADS]

    def detect(self, images: list[np.ndarray], thresholds: dict[str, float]) -> list[Detections]:
        return [self.labelled(boxes, scores, ["face"] * len(scores))
                for boxes, scores, _ in self.faces(images, self.min_threshold(thresholds))]

    def faces(self, images: list[np.ndarray], threshold: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per RGB image: boxes (n x 4, xyxy), scores (n), the five face points (n x 5 x 2), after NMS."""
        results: list = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.padded(*img.shape[:2]), []).append(i)
        step = 1 if self.fixed_batch else CHUNK
        for (ph, pw), idx in groups.items():
            for start in range(0, len(idx), step):
                chunk = idx[start:start + step]
                blob = np.zeros((len(chunk), 3, ph, pw), np.float32)
                for j, i in enumerate(chunk):
                    fill_chw(blob[j], images[i], bgr=True)  # zero padding, as OpenCV pads
                outs = dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: blob}),
                                strict=True))
                for j, i in enumerate(chunk):
                    h, w = images[i].shape[:2]
                    results[i] = self._decode({k: v[j] for k, v in outs.items()}, threshold, pw, w, h)
        return results

    def _decode(self, outs: dict[str, np.ndarray], threshold: float, pw: int, width: int, height: int):
        boxes, scores, points = [], [], []
        for s in STRIDES:
            score = np.sqrt(outs[f"cls_{s}"][:, 0].clip(0, 1) * outs[f"obj_{s}"][:, 0].clip(0, 1))
            sel = np.flatnonzero(score >= threshold)
            if not len(sel):
                continue
            # The cell of output row k: row-major over a grid pw / s cells wide.
            cell = np.stack([sel % (pw // s), sel // (pw // s)], axis=1).astype(np.float32)
            bbox = outs[f"bbox_{s}"][sel]
            centre = (cell + bbox[:, :2]) * s
            size = np.exp(bbox[:, 2:]) * s
            boxes.append(np.concatenate([centre - size / 2, centre + size / 2], axis=1))
            points.append((cell[:, None, :] + outs[f"kps_{s}"][sel].reshape(-1, 5, 2)) * s)
            scores.append(score[sel])
        if not boxes:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
        box, score, point = np.concatenate(boxes), np.concatenate(scores), np.concatenate(points)
        keep = nms(box, score, self.nms_iou)
        box = box[keep]
        box[:, [0, 2]] = box[:, [0, 2]].clip(0, width)
        box[:, [1, 3]] = box[:, [1, 3]].clip(0, height)
        return box.astype(np.float32), score[keep].astype(np.float32), point[keep].astype(np.float32)
