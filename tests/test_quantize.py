"""int8 copies of catalog models (models/quantize.py): made here from the published weights,
calibrated on photos that are not the eval sets, and finding the faces the float model finds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from models.adapters import adapter_class
from models.catalog import load_catalog
from models.detections import box_iou
from models.fetch import prepared_weights
from models.quantize import CALIBRATION_SIZE, calibration_images, head_nodes


def test_int8_centerface_is_int8_with_float_heads():
    model = onnx.load_from_string(prepared_weights(load_catalog()["centerface-int8"]))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] >= 50 and ops["DequantizeLinear"] >= 100, ops
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 50  # every backbone and neck Conv
    # the four output heads (heatmap, scale, offset, landmarks) read float weights directly
    producer = {out: node for node in model.graph.node for out in node.output}
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for out in model.graph.output:
        node = producer[out.name]
        node = producer[node.input[0]] if node.op_type == "Sigmoid" else node
        assert node.op_type == "Conv" and node.input[1] in floats, out.name


def test_head_nodes_are_each_output_back_to_its_conv():
    model = onnx.load_from_string(prepared_weights(load_catalog()["centerface"]))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    ops = Counter(n.op_type for n in model.graph.node if n.name in head_nodes(model.graph))
    assert ops == {"Conv": 4, "Sigmoid": 1}


def test_calibration_images_are_the_same_on_every_call():
    first, second = calibration_images(), calibration_images()
    assert len(first) == 12 and all(a.shape == (CALIBRATION_SIZE[1], CALIBRATION_SIZE[0], 3) for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], first[1])  # the second copy carries the pasted faces


def test_int8_centerface_finds_what_the_float_model_finds(labelled_rgb):
    """Every float detection with score >= 0.5 (OpenVINO, as jobs run) has an int8 twin with
    nearly the same box, on real photos of both face sets. Scores move a little (measured: 70
    faces, median 0.01, one 0.15), never enough to lose a face at 0.3."""
    catalog = load_catalog()
    photos = labelled_rgb("faces", 4) + labelled_rgb("wider", 4)
    float_model, int8_model = (adapter_class("centerface")(catalog[n], prepared_weights(catalog[n]), "openvino", 2)
                               for n in ("centerface", "centerface-int8"))
    ref = float_model.detect(photos, {"face": 0.3})
    got = int8_model.detect(photos, {"face": 0.3})
    moves = []
    for mine, theirs in zip(got, ref, strict=True):
        for k in np.flatnonzero(theirs.scores >= 0.5):
            iou = box_iou(theirs.boxes[k:k + 1], mine.boxes)[0]
            assert len(iou) and iou.max() >= 0.8, "int8 lost or moved a face"
            moves.append(abs(mine.scores[int(np.argmax(iou))] - theirs.scores[k]))
    assert len(moves) >= 20
    assert np.median(moves) <= 0.03 and max(moves) <= 0.2, moves
