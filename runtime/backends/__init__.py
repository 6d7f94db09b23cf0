"""Backends run one segment each, with one lifecycle: ``load`` -> ``runner.run(feeds)``.

A backend turns a manifest ``Segment`` into a ``SegmentRunner``. ONNX Runtime works everywhere;
TensorRT plugs into the same interface.
"""
from __future__ import annotations

from typing import Protocol

from ..errors import FeatherError


class SegmentRunner(Protocol):
    name: str

    def run(self, feeds: dict) -> dict:
        """Run the segment on named inputs; returns every output by name (host numpy arrays)."""


class Backend(Protocol):
    name: str

    def load(self, root, segment) -> SegmentRunner:
        """Load one segment of the artifact at ``root``."""


def get_backend(name: str | None = None) -> Backend:
    """``onnxruntime`` (CPU, or CUDA when onnxruntime-gpu is installed; None picks what is
    installed) or ``tensorrt`` (the artifact's engines, see feather_export.trt_build)."""
    from .onnxruntime import OnnxRuntimeBackend

    if name in (None, "auto", "onnxruntime", "ort"):
        return OnnxRuntimeBackend()
    if name in ("onnxruntime-cpu", "cpu"):
        return OnnxRuntimeBackend(device="cpu")
    if name in ("onnxruntime-cuda", "cuda"):
        return OnnxRuntimeBackend(device="cuda")
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend()     # engines from <artifact>/engines/engines.json; plugin via
                                     # $FEATHER_PLUGIN_LIBRARY or the path recorded at build time
    raise FeatherError(f"unknown backend {name!r}; choose onnxruntime, onnxruntime-cpu, "
                       "onnxruntime-cuda, tensorrt")
