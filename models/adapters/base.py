"""The adapter contract shared by every model family."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from models.catalog import ModelEntry
from models.detections import CLASSES, Detections
from models.runtime import make_session


class Adapter(ABC):
    # Bump when `prepare` changes, so cached prepared weights are rebuilt.
    prepare_version = 1

    @staticmethod
    def prepare(raw: bytes) -> bytes:
        return raw

    def __init__(self, entry: ModelEntry, model_bytes: bytes, device: str = "cpu", threads: int = 0):
        self.entry = entry
        self.session = make_session(model_bytes, device, threads)
        self.input_name = self.session.get_inputs()[0].name

    @abstractmethod
    def detect(self, images: list[np.ndarray], thresholds: dict[str, float]) -> list[Detections]:
        """One Detections per image, boxes in that image's pixels."""

    def min_threshold(self, thresholds: dict[str, float]) -> float:
        """The lowest threshold among this model's classes: the cut-off for decoding."""
        return min(thresholds.get(c, 0.5) for c in self.entry.veil_classes)

    def labelled(self, boxes: np.ndarray, scores: np.ndarray, labels: list[str]) -> Detections:
        """Detections for raw model labels, mapped through the catalog's class map."""
        classes = [CLASSES.index(self.entry.classes[lab]) for lab in labels]
        return Detections(boxes, scores, classes, details=labels, models=[self.entry.name] * len(labels))
