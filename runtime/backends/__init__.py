"""Backends run one segment each, with one lifecycle: ``load`` -> ``runner.run_device(inputs)``.

A backend owns a ``memory`` (feather_runtime.device: host memory for ONNX Runtime CPU, CUDA memory
for ONNX Runtime CUDA and TensorRT) and turns a manifest ``Segment`` into a ``SegmentRunner`` that
runs on ``Tensor``s in that memory, so the Pipeline chains segments without host round trips.
ONNX Runtime works everywhere; TensorRT plugs into the same interface.
"""
from __future__ import annotations

from typing import Protocol

from ..errors import FeatherError


class SegmentRunner(Protocol):
    name: str

    def run_device(self, inputs: dict) -> dict:
        """Run on named ``Tensor``s in the backend's memory; returns every output as a ``Tensor``
        in that memory, valid until this runner runs again. May return before the work is done
        (CUDA): ``memory.download``/``synchronize`` wait for it."""

    def run(self, feeds: dict) -> dict:
        """Host numpy arrays in, host numpy arrays out (validation, sweeps)."""


class Backend(Protocol):
    name: str
    memory: object        # feather_runtime.device.HostMemory | CudaMemory

    def load(self, root, segment) -> SegmentRunner:
        """Load one segment of the artifact at ``root``."""


def get_backend(name: str | None = None) -> Backend:
    """``onnxruntime`` (CPU, or CUDA when onnxruntime-gpu is installed; None picks what is
    installed; fp32 on the CPU, so tokens equal the reference), ``auto`` (the fastest measured
    path here: ONNX Runtime on CUDA where there is one, else OpenVINO bf16 where it is installed
    and the CPU has bf16 units, else ONNX Runtime CPU), ``openvino`` (CPU plugin; ``-bf16``/``-f32`` fix the inference precision, plain
    ``openvino`` takes bf16 where the CPU has bf16 units) or ``tensorrt`` (the artifact's engines, see feather_export.tensorrt.build)."""
    from .onnxruntime import OnnxRuntimeBackend

    if name == "auto":
        return _fastest()
    if name in (None, "onnxruntime", "ort"):
        return OnnxRuntimeBackend()
    if name in ("onnxruntime-cpu", "cpu"):
        return OnnxRuntimeBackend(device="cpu")
    if name in ("onnxruntime-cuda", "cuda"):
        return OnnxRuntimeBackend(device="cuda")
    if name in ("openvino", "openvino-cpu", "openvino-bf16", "openvino-f32"):
        from .openvino import OpenVinoBackend

        precision = {"openvino-bf16": "bf16", "openvino-f32": "f32"}.get(name)
        return OpenVinoBackend(precision)   # default: bf16 where the CPU has bf16 units
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend()     # engines from <artifact>/engines/engines.json; plugin via
                                     # $FEATHER_PLUGIN_LIBRARY or the path recorded at build time
    raise FeatherError(f"unknown backend {name!r}; choose onnxruntime, onnxruntime-cpu, "
                       "onnxruntime-cuda, openvino, openvino-bf16, openvino-f32, auto, tensorrt")


def _fastest() -> Backend:
    """``auto``: on a CPU with bf16 units, OpenVINO's bf16 prefill measured 2.3x ONNX Runtime's
    fp32 (benchmarks/cpu_openvino.py); elsewhere ONNX Runtime."""
    import onnxruntime as ort

    from .onnxruntime import OnnxRuntimeBackend

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return OnnxRuntimeBackend(device="cuda")
    try:
        from .openvino import OpenVinoBackend, default_precision
    except ImportError:
        return OnnxRuntimeBackend(device="cpu")
    try:
        precision = default_precision()
    except ImportError:          # openvino itself is not installed
        return OnnxRuntimeBackend(device="cpu")
    return OpenVinoBackend("bf16") if precision == "bf16" else OnnxRuntimeBackend(device="cpu")
