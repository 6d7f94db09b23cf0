"""ONNX Runtime backend: CPU by default, CUDA when onnxruntime-gpu is installed.

The selection op is a model-local ONNX function, so no custom-op library is registered.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import FeatherError


class OnnxRuntimeBackend:
    def __init__(self, device: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise FeatherError("ONNX Runtime has no CUDA provider here; install onnxruntime-gpu "
                               "(pip install 'feather-export[gpu]') or use the CPU backend")
        use_cuda = device == "cuda" or (device is None and "CUDAExecutionProvider" in available)
        self.providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        self.name = "onnxruntime-cuda" if use_cuda else "onnxruntime-cpu"
        self.threads = threads

    def load(self, root, segment) -> "OnnxRuntimeRunner":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        # idle intra-op threads that keep spinning after a call compete with the next segment's
        # call; off, the CPU 1B benchmark decoded 44-85% faster (benchmarks/results/cpu_1b_nospin)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = Path(root) / segment.file
        try:
            session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - a broken segment file is an artifact error
            raise FeatherError(f"ONNX Runtime could not load {path}: {exc}") from None
        return OnnxRuntimeRunner(segment.name, session)


class OnnxRuntimeRunner:
    def __init__(self, name: str, session):
        self.name = name
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict) -> dict:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
