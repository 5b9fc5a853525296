"""int8 copies of catalog models (`quantize: int8`), made here from the published weights.

Why: on CPU an int8 CenterFace runs 1.36x faster than bf16 under OpenVINO (61 against 83 ms per
WIDER photo on one thread) and finds the same faces (README, "Detection quality"). The published
weights stay the sha256-checked source; the int8 file is derived from them once, by ONNX
Runtime's static quantization (QDQ, int8 weights per channel, uint8 activations), and cached
with this recipe's version in its name.

Calibration: the activation ranges come from the tensors the model's own adapter feeds it for
a few calibration photos: scikit-image's sample photos with faces from its LFW subset pasted
at 10-90 px (faces of every size the model must keep). They come from a pinned wheel, checked
by sha256, downloaded like weights and never installed, so every machine calibrates on the same
pixels; the eval sets are never used. The output heads (each graph output back to its first
Conv) stay float, so that scores near a threshold keep their precision.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path

import cv2
import numpy as np
import onnx

QUANTIZE_VERSION = 1  # bump when the recipe or the calibration images change
CALIBRATION_WHEEL = "scikit-image==0.26.0"
CALIBRATION_WHEEL_SHA256 = "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af"
# The same file on every machine, whatever Python runs veil: the photos in it are plain data.
CALIBRATION_PLATFORM = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                        "--python-version", "3.11", "--implementation", "cp"]
CALIBRATION_PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                      "color.png"]
CALIBRATION_SIZE = (1024, 768)  # width, height: a typical detection copy
FACES_PER_PHOTO = 25


def calibration_images() -> list[np.ndarray]:
    """RGB uint8 photos, each twice: as published, then with LFW faces pasted (fixed seed)."""
    from models.download import WeightsError, pypi_members

    names = [f"skimage/data/{n}" for n in CALIBRATION_PHOTOS + ["lfw_subset.npy"]]
    files, wheel_sha = pypi_members(CALIBRATION_WHEEL, names, CALIBRATION_PLATFORM)
    if wheel_sha != CALIBRATION_WHEEL_SHA256:
        raise WeightsError(f"calibration wheel {CALIBRATION_WHEEL}: sha256 {wheel_sha} is not the pinned one")
    faces = np.load(io.BytesIO(files.pop(names[-1])))  # 200 grey 25 x 25 faces in 0..1
    rng = np.random.default_rng(0)
    images = []
    for name in names[:-1]:
        bgr = cv2.imdecode(np.frombuffer(files[name], np.uint8), cv2.IMREAD_COLOR)
        photo = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), CALIBRATION_SIZE, interpolation=cv2.INTER_AREA)
        pasted = photo.copy()
        for _ in range(FACES_PER_PHOTO):
            side = int(rng.integers(10, 90))
            face = cv2.resize((faces[rng.integers(len(faces))] * 255).astype(np.uint8), (side, side))
            y = int(rng.integers(0, CALIBRATION_SIZE[1] - side))
            x = int(rng.integers(0, CALIBRATION_SIZE[0] - side))
            pasted[y:y + side, x:x + side] = face[..., None]
        images += [photo, pasted]
    return images


class _FeedRecorder:
    """Stands in for an adapter's session: runs it and keeps every input it was given."""

    def __init__(self, session):
        self.session, self.feeds = session, []

    def run(self, output_names, feeds):
        self.feeds.append({k: np.array(v) for k, v in feeds.items()})
        return self.session.run(output_names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def model_feeds(entry, model_bytes: bytes, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The inputs the entry's adapter gives its model for `images` (its own resizing, padding,
    normalisation and passes), recorded on ONNX Runtime's CPU provider."""
    from models.adapters import adapter_class

    adapter = adapter_class(entry.adapter)(entry, model_bytes, "cpu", 0)
    adapter.session = recorder = _FeedRecorder(adapter.session)
    thresholds = {c: 0.5 for c in entry.veil_classes}
    for img in images:
        adapter.detect([img], thresholds)
    return recorder.feeds


def head_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes between each graph output and the first Conv before it (included)."""
    producer = {out: node for node in graph.node for out in node.output}
    heads, todo = [], [o.name for o in graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in heads:
            continue
        heads.append(node.name)
        if node.op_type != "Conv":
            todo += list(node.input)
    return heads


def quantize_int8(entry, model_bytes: bytes) -> bytes:
    """An int8 (QDQ) copy of `model_bytes` (the adapter-prepared float model), calibrated as the
    module doc says."""
    import onnxruntime
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnxruntime.set_default_logger_severity(3)  # calibration sessions warn per unused initializer
    feeds = model_feeds(entry, model_bytes, calibration_images())

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    model = onnx.load_from_string(model_bytes)
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
        model = version_converter.convert_version(model, 13)  # per-channel QDQ needs opset 13
    with tempfile.TemporaryDirectory(prefix="veil-int8-") as tmp:
        float_path, pre_path, out_path = (str(Path(tmp, n)) for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(model, float_path)
        # folds BatchNorm into Conv and infers shapes, so that every Conv gets quantized
        quant_pre_process(float_path, pre_path, skip_symbolic_shape=True)
        pre = onnx.load(pre_path)
        for i, node in enumerate(pre.graph.node):  # exclusion works by node name
            node.name = node.name or f"{node.op_type}_{i}"
        onnx.save(pre, pre_path)
        quantize_static(pre_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=head_nodes(pre.graph))
        return Path(out_path).read_bytes()


def recipe_tag() -> str:
    """Part of the cached int8 file's name: the recipe version and the calibration source."""
    digest = hashlib.sha256(f"{CALIBRATION_WHEEL_SHA256}{CALIBRATION_PHOTOS}{FACES_PER_PHOTO}".encode()).hexdigest()
    return f"int8-v{QUANTIZE_VERSION}-{digest[:8]}"
