"""ONNX Runtime CUDA through I/O binding (``pytest -m gpu``): tensors stay in device memory between
segments. Skips, printing the reason, where onnxruntime-gpu, cuda-python or a GPU is absent; the
same code path runs on CPU in tests/test_runtime.py (HostMemory) and on fake device memory in
tests/test_trt_glue.py (CudaMemory).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_inputs
from feather_export.export.artifact import ExportOptions, export
from feather_runtime import Pipeline

pytestmark = pytest.mark.gpu
NEW_TOKENS = 16


def _skip(reason: str):
    print(f"SKIP: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cuda_ready():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        _skip("ONNX Runtime has no CUDA provider here (install onnxruntime-gpu on an NVIDIA GPU "
              f"machine; providers: {ort.get_available_providers()})")
    try:
        from feather_runtime.backends.cuda import device_identity
        device = device_identity(0)
    except Exception as exc:  # noqa: BLE001 - no cuda-python, no driver, no GPU
        _skip(f"no usable CUDA device through cuda-python ({exc})")
    print(f"onnxruntime {ort.__version__} CUDA on {device}")


@pytest.mark.parametrize("method,kw", [("none", {}), ("feather", {"budget": 16}),
                                       ("fastv", {"budget": 16}), ("fastervlm", {"budget": 16})])
def test_onnxruntime_cuda_matches_cpu(cuda_ready, tiny_models, tmp_path, method, kw):
    art = export("tiny", tmp_path / method, ExportOptions(method=method, **kw),
                 progress=lambda m: None)
    pixels, ids = tiny_inputs(tiny_models["tiny"], seed=2)
    ref = Pipeline.load(art, backend="onnxruntime-cpu").generate_ids(pixels, ids, NEW_TOKENS)
    pipe = Pipeline.load(art, backend="onnxruntime-cuda")
    assert pipe.backend.name == "onnxruntime-cuda"
    res = pipe.generate_ids(pixels, ids, NEW_TOKENS)
    assert res.kept == ref.kept
    assert res.token_ids == ref.token_ids
    err = np.abs(res.first_logits - ref.first_logits).max() / max(1.0, np.abs(ref.first_logits).max())
    print(method, "first-logit relative error", err, "timings", res.timings)
    assert err < 1e-3
    # only token ids, positions and past lengths go up, only logits and kept indices come down
    traffic = pipe.memory.traffic
    before = dict(traffic)
    pipe.generate_ids(pixels, ids, 1)
    after_one = {k: traffic[k] - before[k] for k in traffic}
    before = dict(traffic)
    again = pipe.generate_ids(pixels, ids, NEW_TOKENS)
    assert again.token_ids == res.token_ids
    steps = len(again.token_ids) - 1
    decode = {k: (traffic[k] - before[k] - after_one[k]) / steps for k in traffic}
    assert decode["d2h"] == 4 * pipe.manifest["model"]["vocab_size"]
    spans = sum(seg.kind == "decoder" for seg in pipe.manifest.segments)
    assert decode["h2d"] == 8 * (2 + spans)
    pipe.close()
