"""The adapter contract shared by every model family."""

from __future__ import annotations

from abc import ABC, abstractmethod

import cv2
import numpy as np

from models.catalog import ModelEntry
from models.detections import CLASSES, Detections
from models.runtime import make_session


def fill_chw(out: np.ndarray, img: np.ndarray, mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
             scale: float = 1.0, bgr: bool = False) -> None:
    """Write an RGB uint8 image (H, W, 3) into the top-left of `out` (3, >= H, >= W, float) as
    (pixel - mean) * scale per channel, planes in BGR order when `bgr`. Contiguous planes from
    cv2.split, converted in place: a 1024 x 704 RetinaFace input took 8.4 ms as a transposed numpy
    expression and 0.9 ms this way."""
    h, w = img.shape[:2]
    planes = cv2.split(img)
    for c, plane in enumerate(planes[::-1] if bgr else planes):
        dst = out[c, :h, :w]
        np.subtract(plane, np.float32(mean[c]), out=dst, dtype=dst.dtype)
        if scale != 1.0:
            np.multiply(dst, dst.dtype.type(scale), out=dst)


def set_dims(value_info, dims: list) -> None:
    """Replace the declared shape of a graph input/output: ints are fixed dims, strings symbolic."""
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


class Adapter(ABC):
    # Bump when `prepare` changes, so cached prepared weights are rebuilt.
    prepare_version = 1

    @staticmethod
    def prepare(raw: bytes) -> bytes:
        return raw

    def __init__(self, entry: ModelEntry, model_bytes: bytes, backend: str = "cpu", threads: int = 0):
        self.entry = entry
        self.session = make_session(model_bytes, backend, threads)
        self.input_name = self.session.get_inputs()[0].name
        # Models with dynamic input dims see the image padded up to a multiple of this. OpenVINO
        # prepares (and keeps) kernels per input shape: on WIDER's 197 photos, steps of 128 px
        # make 12 shapes instead of 38, for 7 % more pixels (README, "Performance").
        self.shape_step = 128 if backend.startswith("openvino") else 32

    def padded(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) rounded up to the model's shape step."""
        step = self.shape_step
        return (height + step - 1) // step * step, (width + step - 1) // step * step

    @abstractmethod
    def detect(self, images: list[np.ndarray], thresholds: dict[str, float]) -> list[Detections]:
        """One Detections per image, boxes in that image's pixels."""

    def min_threshold(self, thresholds: dict[str, float]) -> float:
        """The lowest threshold among this model's classes: the cut-off for decoding."""
        return min(thresholds.get(c, 0.5) for c in self.entry.veil_classes)

    def labelled(
        self,
        boxes: np.ndarray,
        scores: np.ndarray,
        labels: list[str],
        polygons: list[list[float]] | None = None,
    ) -> Detections:
        """Detections for raw model labels, mapped through the catalog's class map; labels the
        map does not name (e.g. COCO's 'dog') are dropped."""
        keep = [i for i, lab in enumerate(labels) if lab in self.entry.classes]
        classes = [CLASSES.index(self.entry.classes[labels[i]]) for i in keep]
        return Detections(
            np.asarray(boxes, np.float32).reshape(-1, 4)[keep],
            np.asarray(scores, np.float32).reshape(-1)[keep],
            classes,
            details=[labels[i] for i in keep],
            models=[self.entry.name] * len(keep),
            polygons=[polygons[i] for i in keep] if polygons else None,
        )

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(height, width) when the model's input dims are fixed, None when dynamic."""
        shape = self.session.get_inputs()[0].shape
        h, w = shape[2], shape[3]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    @property
    def fixed_batch(self) -> bool:
        """True when the model runs one image per call (batch dim fixed to 1)."""
        return self.session.get_inputs()[0].shape[0] == 1

    @property
    def input_dtype(self) -> type:
        """float16 for models exported in half precision (platedet), float32 otherwise."""
        return np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
