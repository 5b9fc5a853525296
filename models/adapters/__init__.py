"""Adapters: each turns one family of ONNX models' raw outputs into `Detections`.

An adapter is a class with `prepare(raw_bytes) -> bytes` (one-off graph fix-ups, cached by
models.fetch), a constructor taking (entry, model_bytes, backend, threads), and
`detect(images, thresholds) -> list[Detections]` over RGB uint8 images.
"""

from __future__ import annotations

from models.adapters.base import Adapter
from models.adapters.centerface import CenterFace
from models.adapters.retinaface import RetinaFace
from models.adapters.yolov8 import YoloV8, YoloV8Seg
from models.adapters.yunet import YuNet

ADAPTERS: dict[str, type[Adapter]] = {
    "centerface": CenterFace,
    "yolov8": YoloV8,
    "yolov8-seg": YoloV8Seg,
    "retinaface": RetinaFace,
    "yunet": YuNet,
}


def adapter_class(name: str) -> type[Adapter]:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown adapter {name!r}; known: {sorted(ADAPTERS)}") from None
