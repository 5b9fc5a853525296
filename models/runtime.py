"""Inference sessions over in-memory ONNX weights, by backend:

    cuda      ONNX Runtime's CUDA provider (a GPU)
    cpu       ONNX Runtime's CPU provider
    openvino  OpenVINO's CPU runtime (`pip install openvino`), behind the slice of ONNX Runtime's
              session interface the adapters use (get_inputs, get_outputs, get_modelmeta, run)
    openvino-f32  the same, never in bf16

On this project's 2-core AMD EPYC (Zen 4) OpenVINO ran the catalog's models 2.0-3.5x faster than
ONNX Runtime's CPU provider (measured per model in the README, "Models"), most of it from
bf16 arithmetic on CPUs that have it (AVX512-BF16, AMX), which OpenVINO uses by default there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import threading
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort

BACKENDS = ("cpu", "cuda", "openvino", "openvino-f32")
CPU_BACKENDS = ("auto", "openvino", "openvino-f32", "onnxruntime")  # a job's choice (JobSpec.cpu_backend)


def providers_for(device: str) -> list[str]:
    """Execution providers for `device` ("cuda" or "cpu"); refuses CUDA where it is not installed."""
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                f"device=cuda but onnxruntime offers {available}; install veil[gpu] (onnxruntime-gpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def backend_for(device: str, cpu_backend: str = "auto") -> str:
    """The session backend for `device` (cpu | cuda) and a job's CPU backend choice (CPU_BACKENDS):
    auto is OpenVINO where it is installed, ONNX Runtime's CPU provider otherwise."""
    if device == "cuda":
        return "cuda"
    if cpu_backend not in CPU_BACKENDS:
        raise ValueError(f"cpu-backend must be one of {CPU_BACKENDS}, got {cpu_backend!r}")
    if cpu_backend == "auto":
        return "openvino" if openvino_available() else "cpu"
    if cpu_backend == "onnxruntime":
        return "cpu"
    if not openvino_available():
        raise RuntimeError(f"cpu-backend {cpu_backend} needs the openvino package: pip install 'veil[cpu]'")
    return cpu_backend


def make_session(model_bytes: bytes, backend: str = "cpu", threads: int = 0):
    """A session over in-memory weights on `backend` (BACKENDS: cpu is ONNX Runtime's CPU
    provider; openvino computes in bf16 where the CPU does so natively, openvino-f32 never).
    `threads`: intra-op threads (0: the runtime decides)."""
    if backend.startswith("openvino"):
        return OpenVinoSession(model_bytes, threads, "f32" if backend == "openvino-f32" else "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r}; known: {BACKENDS}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # silence per-node warnings about unused initializers
    # The CPU arena keeps every tensor size it ever saw; with full-resolution inputs of varying
    # size that doubled a detection actor (five models: 1.27 GiB with, 0.60 GiB without, same
    # speed on 10 plate photos). Memory patterns only help fixed shapes.
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    # Idle intra-op threads spin by default; on a node whose cores the decode/encode tasks share,
    # that spinning takes CPU from them.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=providers_for(backend))


def _libc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _libc_trim()


def release_freed_memory() -> None:
    """Give the heap memory freed by the last batch back to the OS.

    With ORT's arena off, every activation tensor is a malloc/free; glibc keeps the freed pages of
    its per-thread arenas for reuse, so a detection actor's RSS crept to ~700 MiB with the five
    default models where 270 MiB is in use (plates photos at 512 px, measured with and without a
    trim after each image). malloc_trim costs microseconds; a no-op where libc has none."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class OpenVinoSession:
    """An ONNX model compiled by OpenVINO for the CPU, used through the calls adapters make of an
    onnxruntime.InferenceSession. Inputs of any shape the model admits (dynamic dims are compiled
    as such); one infer request per calling thread, since a service shares models between threads."""

    def __init__(self, model_bytes: bytes, threads: int = 0, precision: str = "auto"):
        import onnx
        import openvino as ov

        core = ov.Core()
        model = core.read_model(model_bytes)
        config = {
            "PERFORMANCE_HINT": "LATENCY",  # one image at a time, all threads on it
            # Pinned threads fight the decode/encode tasks that share the node's cores.
            "ENABLE_CPU_PINNING": False,
            # Kernels prepared per input shape, kept for reuse: bounded, or photos of many sizes
            # grow the process (three face models on 120 WIDER photos: 1.43 GiB at the default
            # 5000, 1.03 GiB at 50, same speed once inputs are padded to steps of 128 px).
            "CPU_RUNTIME_CACHE_CAPACITY": 50,
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self._compiled = core.compile_model(model, "CPU", config)
        self._local = threading.local()
        self._inputs = [_arg(port) for port in model.inputs]
        self._outputs = [_arg(port) for port in model.outputs]
        # Model metadata (e.g. YOLOv8's class names) is in the ONNX file, not in OpenVINO's model.
        proto = onnx.load_from_string(model_bytes)
        self._metadata = {p.key: p.value for p in proto.metadata_props}
        self.precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def get_inputs(self) -> list[SimpleNamespace]:
        return self._inputs

    def get_outputs(self) -> list[SimpleNamespace]:
        return self._outputs

    def get_modelmeta(self) -> SimpleNamespace:
        return SimpleNamespace(custom_metadata_map=self._metadata)

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer(feeds)  # outputs are copied out of the request (share_outputs=False)
        names = output_names or [o.name for o in self._outputs]
        return [result[self._compiled.output(name)] for name in names]


_OV_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "u8": "tensor(uint8)", "i64": "tensor(int64)"}


def _arg(port) -> SimpleNamespace:
    """An input or output described as onnxruntime's NodeArg is: name, shape (ints, or a name where
    a dim is dynamic), type ("tensor(float)")."""
    shape = [d.get_length() if d.is_static else f"d{k}" for k, d in enumerate(port.get_partial_shape())]
    kind = port.get_element_type().get_type_name()
    return SimpleNamespace(name=port.get_any_name(), shape=shape, type=_OV_TYPES.get(kind, f"tensor({kind})"))
