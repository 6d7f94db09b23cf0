"""ONNX Runtime backend: CPU by default, CUDA when onnxruntime-gpu is installed.

The Pipeline runs segments through ``run_device``: inputs are bound by pointer with I/O binding
(``bind_input(name, device_type, device_id, dtype, shape, ptr)``) and outputs are allocated by
ONNX Runtime on the same device (``bind_output(name, device_type, device_id)``), so on CUDA the
hidden states, selections and KV caches stay in device memory between segments; the host sees
only the token ids going in and the logits and kept indices coming out. On CPU the same code runs
with ``device_type="cpu"`` (that is what the CPU tests exercise).

The selection op is a model-local ONNX function, so no custom-op library is registered.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..device import HostMemory, Tensor
from ..errors import FeatherError

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(double)": np.float64, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class OnnxRuntimeBackend:
    def __init__(self, device: str | None = None, threads: int | None = None,
                 session_config: tuple[tuple[str, str], ...] = (), profile_dir=None,
                 device_id: int = 0):
        """``device``: cpu, cuda, or None (CUDA when installed). ``session_config``: extra
        SessionOptions config entries. ``profile_dir``: write ONNX Runtime profiles there
        (``sessions`` keeps every session, for ``end_profiling``)."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise FeatherError("ONNX Runtime has no CUDA provider here; install onnxruntime-gpu "
                               "(pip install 'feather-export[gpu]') or use the CPU backend")
        use_cuda = device == "cuda" or (device is None and "CUDAExecutionProvider" in available)
        if use_cuda:
            from ..device import CudaMemory

            self.memory = CudaMemory(device_id)
            cuda = ("CUDAExecutionProvider", {"device_id": device_id})
            self.providers = [cuda, "CPUExecutionProvider"]
        else:
            self.memory = HostMemory()
            self.providers = ["CPUExecutionProvider"]
        self.name = "onnxruntime-cuda" if use_cuda else "onnxruntime-cpu"
        self.threads = threads
        self.session_config = tuple(session_config)
        self.profile_dir = Path(profile_dir) if profile_dir is not None else None
        self.sessions: dict = {}

    def close(self) -> None:
        """Drop the sessions and free device memory (CUDA); runners must not be used afterwards."""
        self.sessions.clear()
        self.memory.close()

    def load(self, root, segment) -> "OnnxRuntimeRunner":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        # idle intra-op threads that keep spinning after a call compete with the next segment's
        # call; off, the CPU 1B benchmark decoded 44-85% faster (benchmarks/results/cpu_1b_nospin)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # weight-only int8/int4 graphs (DequantizeLinear -> MatMul) are fused into MatMulNBits at
        # load; level 4 (int8 activations in its kernels) decoded int8 weights ~3x faster than
        # ORT's default on the CPU here (docs/quantization.md); float graphs ignore it
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
        for key, value in self.session_config:
            options.add_session_config_entry(key, value)
        if self.profile_dir is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(self.profile_dir / segment.name)
        path = Path(root) / segment.file
        try:
            session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - a broken segment or config is an artifact error
            raise FeatherError(f"ONNX Runtime could not load {path}: {exc}") from None
        self.sessions[segment.name] = session
        return OnnxRuntimeRunner(segment.name, session, self.memory)


class OnnxRuntimeRunner:
    def __init__(self, name: str, session, memory):
        self.name = name
        self.session = session
        self.memory = memory
        self.output_names = [o.name for o in session.get_outputs()]
        self._binding = session.io_binding()
        self._reuse_inputs = memory.device_type == "cpu"
        self._bound: dict = {}
        self._shapes: dict | None = None

    def run(self, feeds: dict) -> dict:
        """Host numpy in, host numpy out (validation, sweeps; the Pipeline uses ``run_device``)."""
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def run_device(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run on tensors in this backend's memory; the outputs are ONNX Runtime allocations on
        the same device, valid until this runner runs again."""
        memory, binding = self.memory, self._binding
        # uploads on the memory's stream must land first: ONNX Runtime reads an input at bind
        # time when a node on another device consumes it (e.g. a CPU shape op on CUDA)
        memory.synchronize()
        if self._reuse_inputs:
            # CPU: binding wraps the pointer (no copy), so an input bound to the same address,
            # shape and dtype reads its new values; only changed inputs are bound again
            changed = {n: t for n, t in inputs.items()
                       if self._bound.get(n) != (t.ptr, t.shape, t.dtype)}
        else:
            # CUDA: an input consumed on another device is copied when bound; bind every call
            binding.clear_binding_inputs()
            changed = inputs
        for name, t in changed.items():
            binding.bind_input(name, memory.device_type, memory.device_id, t.dtype, list(t.shape),
                               t.ptr)
        shapes = {n: t.shape for n, t in inputs.items()}
        if shapes != self._shapes:
            # new input shapes, new output shapes: ONNX Runtime allocates them. With the same
            # shapes the outputs stay bound (ONNX Runtime may reuse their buffers: the previous
            # call's outputs are only valid until this runner runs again)
            binding.clear_binding_outputs()
            for name in self.output_names:
                binding.bind_output(name, memory.device_type, memory.device_id)
            self._shapes = shapes
        self._bound = {n: (t.ptr, t.shape, t.dtype) for n, t in inputs.items()}
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # noqa: BLE001 - shapes/dtypes the graph refuses
            self._bound, self._shapes = {}, None
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            raise FeatherError(f"{self.name}: ONNX Runtime failed: {exc}") from None
        outputs = {}
        for name, value in zip(self.output_names, binding.get_outputs()):
            dtype = ORT_TYPES.get(value.data_type())
            if dtype is None:
                raise FeatherError(f"{self.name}: output {name} has type {value.data_type()}, "
                                   "which the runtime does not handle")
            outputs[name] = Tensor(value.data_ptr(), tuple(value.shape()), np.dtype(dtype),
                                   owner=value)
        return outputs
