"""OpenVINO backend (CPU plugin), for CPUs whose fast units ONNX Runtime's kernels do not use.

OpenVINO reads the artifact's ONNX segments directly. ``vision``, ``embed`` and the decoder spans
run on its CPU plugin at an inference precision of ``bf16`` (OpenVINO's own default on a CPU with
AVX512-BF16 or AMX: weights and activations in bfloat16 inside the kernels, inputs and outputs
stay in the artifact's dtype) or ``f32``. The ``select`` segments hold the ``feather::`` ops, for
which OpenVINO has no conversion: they run on ONNX Runtime CPU, in the same host memory, so the
Pipeline chains every segment by pointer as on the other backends.

At bf16 the value caches are kept in bfloat16 (``value_cache_dtype``): the decoder spans take
``past_key_values.*.value`` and give ``present.*.value`` in bf16, the precision the plugin reads
values in anyway, so a decode step no longer converts every layer's whole fp32 value buffer to
bf16 first (measured on shape-llava-1b: benchmarks/openvino_decode.py). Keys stay in the
artifact's dtype: the plugin folds the 1/sqrt(hd) scale into the cached keys in f32 before it
rounds them for its bf16 q.k, and storing them in bf16 instead cost the trained tiny-shapes eval
2.3 points (97.0 -> 94.7 %, benchmarks/openvino_accuracy.py); a ``select`` segment that scores with
``present.{i}.key`` (FastV, BTP) gets it as before.

Inputs are wrapped without a copy (``ov.Tensor(..., shared_memory=True)``; bf16 as ``ml_dtypes``'
bfloat16) and outputs are the infer request's own buffers, valid until the runner runs again (the
backend contract). An input in another dtype than the compiled port's (e.g. fp32 arrays on a bf16
cache port) is converted.
"""
from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np

from ..device import HostMemory, Tensor
from ..errors import FeatherError

PRECISIONS = ("bf16", "f32")


@cache
def _bf16():
    import ml_dtypes          # a dependency of onnx

    return np.dtype(ml_dtypes.bfloat16)


def default_precision() -> str:
    """``bf16`` where OpenVINO's CPU plugin reports bf16 units, else ``f32``."""
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in caps else "f32"


def compile_config(precision: str, threads: int | None = None) -> dict:
    """The CPU plugin's settings for one segment: inference precision, latency mode, threads."""
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class OpenVinoBackend:
    def __init__(self, precision: str | None = None, threads: int | None = None,
                 config: dict | None = None):
        """``precision``: ``bf16``, ``f32`` or None (``default_precision()``); ``config``: more
        CPU plugin properties (e.g. ``{"PERF_COUNT": True}`` for per-node profiles)."""
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
        self.config = dict(config or {})
        # the value caches in bf16 (None: the artifact's dtype; see the module's docstring)
        self.value_cache_dtype = _bf16() if precision == "bf16" else None
        self.name = f"openvino-{precision}-cpu"
        self.memory = HostMemory()
        self._select = OnnxRuntimeBackend(device="cpu", threads=threads)
        self._select.memory = self.memory        # one host memory for every segment

    def load(self, root, segment):
        if segment.kind == "select":
            return self._select.load(root, segment)
        config = {**compile_config(self.precision, self.threads), **self.config}
        path = Path(root) / segment.file
        try:
            model = self.core.read_model(str(path))
            if self.value_cache_dtype is not None and segment.kind == "decoder":
                model = _value_cache_in_bf16(model)
            compiled = self.core.compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - a segment OpenVINO cannot take is an error here
            raise FeatherError(f"OpenVINO could not compile {path}: {exc}") from None
        return OpenVinoRunner(segment.name, compiled, self.memory,
                              [o["name"] for o in segment.outputs])

    def close(self) -> None:
        self._select.close()


def _is_value_cache(name: str) -> bool:
    return name.startswith(("past_key_values.", "present.")) and name.endswith(".value")


def _value_cache_in_bf16(model):
    """The span's value-cache inputs and outputs as bf16 tensors (a conversion the CPU plugin folds
    into its bf16 kernels)."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    for port in model.inputs:
        if _is_value_cache(port.get_any_name()):
            ppp.input(port.get_any_name()).tensor().set_element_type(ov.Type.bf16)
    for port in model.outputs:
        if _is_value_cache(port.get_any_name()):
            ppp.output(port.get_any_name()).tensor().set_element_type(ov.Type.bf16)
    return ppp.build()


def _numpy_dtype(port) -> np.dtype:
    """The numpy dtype of a compiled port (bf16 as ``ml_dtypes``' bfloat16)."""
    import openvino as ov

    kind = port.get_element_type()
    return _bf16() if kind == ov.Type.bf16 else np.dtype(kind.to_dtype())


def _port_dtypes(ports) -> dict[str, np.dtype]:
    """Every name of every port (a port answers to each of its names) -> its numpy dtype."""
    return {name: _numpy_dtype(p) for p in ports for name in p.get_names()}


def _ov_tensor(array: np.ndarray, dtype: np.dtype):
    """Wrap ``array`` for a port of numpy ``dtype`` without a copy, converting it when its dtype is
    another (bf16 travels as uint16 storage)."""
    import openvino as ov

    if not array.flags.c_contiguous:         # (np.ascontiguousarray would make a 0-d array 1-d)
        array = array.copy()
    if array.dtype != dtype:
        array = array.astype(dtype)
    if dtype == _bf16():
        return ov.Tensor(array.view(np.uint16), array.shape, ov.Type.bf16)
    return ov.Tensor(array, shared_memory=True)


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
        self.input_dtypes = _port_dtypes(compiled.inputs)
        outputs = _port_dtypes(compiled.outputs)
        self.bf16_outputs = {n for n in self.output_names if outputs[n] == _bf16()}

    def _outputs(self) -> dict[str, np.ndarray]:
        out = {}
        for name in self.output_names:
            data = self.request.get_tensor(name).data
            # numpy shows a bf16 tensor's bits as float16
            out[name] = data.view(_bf16()) if name in self.bf16_outputs else data
        return out

    def run(self, feeds: dict) -> dict:
        """Host numpy in, host numpy out (copies; bf16 outputs as float32)."""
        self.request.infer({n: _ov_tensor(np.asarray(a), self.input_dtypes[n])
                            for n, a in feeds.items()})
        return {n: (a.astype(np.float32) if a.dtype == _bf16() else a.copy())
                for n, a in self._outputs().items()}

    def run_device(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        for name, t in inputs.items():
            self.request.set_tensor(name, _ov_tensor(_host_array(t), self.input_dtypes[name]))
        try:
            self.request.infer()
        except Exception as exc:  # noqa: BLE001 - shapes/dtypes the graph refuses
            raise FeatherError(f"{self.name}: OpenVINO failed: {exc}") from None
        return {name: Tensor(data.ctypes.data, tuple(data.shape), data.dtype, owner=data)
                for name, data in self._outputs().items()}
