"""OpenVINO backend (CPU plugin), for CPUs whose fast units ONNX Runtime's kernels do not use.

OpenVINO reads the artifact's ONNX segments directly. ``vision``, ``embed`` and the decoder spans
run on its CPU plugin at an inference precision of ``bf16`` (OpenVINO's own default on a CPU with
AVX512-BF16 or AMX: weights and activations in bfloat16 inside the kernels, inputs and outputs
stay in the artifact's dtype) or ``f32``. The ``select`` segments hold the ``feather::`` ops, for
which OpenVINO has no conversion: they run on ONNX Runtime CPU, in the same host memory, so the
Pipeline chains every segment by pointer as on the other backends.

Inputs are wrapped without a copy (``ov.Tensor(..., shared_memory=True)``) and outputs are the
infer request's own buffers, valid until the runner runs again (the backend contract).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..device import HostMemory, Tensor
from ..errors import FeatherError

PRECISIONS = ("bf16", "f32")


def default_precision() -> str:
    """``bf16`` where OpenVINO's CPU plugin reports bf16 units, else ``f32``."""
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in caps else "f32"


class OpenVinoBackend:
    def __init__(self, precision: str | None = None, threads: int | None = None):
        """``precision``: ``bf16``, ``f32`` or None (``default_precision()``)."""
        try:
            import openvino as ov
        except ImportError:
            raise FeatherError("the openvino backend needs OpenVINO (pip install "
                               "'feather-export[openvino]')") from None
        from .onnxruntime import OnnxRuntimeBackend

        precision = precision or default_precision()
        if precision not in PRECISIONS:
            raise FeatherError(f"OpenVINO precision {precision!r} is not one of "
                               f"{', '.join(PRECISIONS)}")
        self.core = ov.Core()
        self.precision = precision
        self.threads = threads
        self.name = f"openvino-{precision}-cpu"
        self.memory = HostMemory()
        self._select = OnnxRuntimeBackend(device="cpu", threads=threads)
        self._select.memory = self.memory        # one host memory for every segment

    def load(self, root, segment):
        if segment.kind == "select":
            return self._select.load(root, segment)
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        path = Path(root) / segment.file
        try:
            compiled = self.core.compile_model(str(path), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - a segment OpenVINO cannot take is an error here
            raise FeatherError(f"OpenVINO could not compile {path}: {exc}") from None
        return OpenVinoRunner(segment.name, compiled, self.memory,
                              [o["name"] for o in segment.outputs])

    def close(self) -> None:
        self._select.close()


def _host_array(t: Tensor) -> np.ndarray:
    """A numpy view (no copy) of a host ``Tensor``."""
    size = int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
    if size == 0:
        return np.empty(t.shape, t.dtype)
    buffer = (ctypes.c_byte * size).from_address(t.ptr)
    return np.frombuffer(buffer, dtype=t.dtype).reshape(t.shape)


class OpenVinoRunner:
    def __init__(self, name: str, compiled, memory, output_names: list[str]):
        """``output_names``: the segment's ONNX output names (OpenVINO's ports carry several
        names each; these are the ones the Pipeline asks for)."""
        self.name = name
        self.memory = memory
        self.request = compiled.create_infer_request()
        self.output_names = list(output_names)

    def run(self, feeds: dict) -> dict:
        """Host numpy in, host numpy out (copies)."""
        self.request.infer({n: np.ascontiguousarray(a) for n, a in feeds.items()})
        return {n: self.request.get_tensor(n).data.copy() for n in self.output_names}

    def run_device(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        import openvino as ov

        for name, t in inputs.items():
            self.request.set_tensor(name, ov.Tensor(_host_array(t), shared_memory=True))
        try:
            self.request.infer()
        except Exception as exc:  # noqa: BLE001 - shapes/dtypes the graph refuses
            raise FeatherError(f"{self.name}: OpenVINO failed: {exc}") from None
        outputs = {}
        for name in self.output_names:
            data = self.request.get_tensor(name).data
            outputs[name] = Tensor(data.ctypes.data, tuple(data.shape), data.dtype, owner=data)
        return outputs
