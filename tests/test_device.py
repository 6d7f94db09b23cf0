"""feather_runtime.device on the host: the copies the Pipeline makes between segments, with the
offsets and pitches the CUDA path uses (``CudaMemory`` makes the same calls through cuda-python;
tests/test_trt_glue.py runs it on fake device memory, tests/test_gpu_runtime.py on a GPU)."""
from __future__ import annotations

import numpy as np
import pytest

from feather_runtime import FeatherError
from feather_runtime.device import ALIGNMENT, HostMemory
from feather_runtime.kv_cache import SpanCache


def test_upload_download_roundtrip_and_alignment():
    mem = HostMemory()
    for value in (np.arange(12, dtype=np.float32).reshape(3, 4), np.asarray(7, np.int64),
                  np.zeros((1, 2, 0, 3), np.float16), np.arange(6)[::2]):
        t = mem.upload(value)
        assert t.ptr % ALIGNMENT == 0 and t.shape == value.shape     # 0-d stays 0-d
        np.testing.assert_array_equal(mem.download(t), value)
    into = mem.empty((1, 10), np.int64)
    view = mem.upload(np.arange(4, dtype=np.int64)[None], into=into)
    assert view.ptr == into.ptr and view.shape == (1, 4) and view.host.shape == (1, 4)
    with pytest.raises(FeatherError, match="cannot upload"):
        mem.upload(np.arange(11, dtype=np.int64)[None], into=into)
    with pytest.raises(FeatherError, match="cannot upload"):
        mem.upload(np.arange(4, dtype=np.int32)[None], into=into)
    assert mem.traffic["h2d"] == 48 + 8 + 0 + 24 + 32 and mem.traffic["d2h"] == 48 + 8 + 24


def test_copy_rows_is_cudamemcpy2d():
    """Row r of width bytes: src + r*src_pitch -> dst + r*dst_pitch; nothing else is touched."""
    rng = np.random.default_rng(0)
    mem = HostMemory()
    dst_host = rng.standard_normal((3, 10, 4)).astype(np.float32)
    src_host = rng.standard_normal((3, 2, 4)).astype(np.float32)
    dst, src = mem.upload(dst_host), mem.upload(src_host)
    row = 4 * 4
    mem.copy_rows(dst.ptr + 5 * row, 10 * row, src.ptr, 2 * row, 2 * row, 3)
    expected = dst_host.copy()
    expected[:, 5:7] = src_host
    np.testing.assert_array_equal(mem.download(dst), expected)
    assert mem.traffic["d2d"] == 3 * 2 * row
    with pytest.raises(FeatherError, match="exceeds a pitch"):
        mem.copy_rows(dst.ptr, row, src.ptr, 2 * row, 2 * row, 3)


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_span_cache_writes_only_new_rows(kv_heads):
    """Prefill (5 rows) then 3 decode steps: the buffers equal numpy's concatenation of the
    present tensors, the rest stays zero, and each step moves exactly its new rows."""
    rng = np.random.default_rng(1)
    mem = HostMemory()
    cache = SpanCache(mem, range(2, 4), capacity=9, kv_heads=kv_heads, head_dim=4, dtype=np.float32)
    feeds = cache.feeds(prefill=True)
    assert int(feeds["past_length"].host) == 0
    assert feeds["past_key_values.2.key"].shape == (1, kv_heads, 0, 4)
    history = {f"{i}.{kind}": [] for kind in ("key", "value") for i in (2, 3)}
    for new in (5, 1, 1, 1):
        before = mem.traffic["d2d"]
        outputs = {}
        for name in history:
            value = rng.standard_normal((1, kv_heads, new, 4)).astype(np.float32)
            history[name].append(value)
            outputs[f"present.{name}"] = mem.upload(value)
        cache.append(outputs)
        assert mem.traffic["d2d"] - before == 4 * kv_heads * new * 4 * 4
    feeds = cache.feeds(prefill=False)
    assert int(feeds["past_length"].host) == 8 == cache.length
    for name, parts in history.items():
        got = mem.download(feeds[f"past_key_values.{name}"])
        np.testing.assert_array_equal(got[:, :, :8], np.concatenate(parts, axis=2))
        assert not got[:, :, 8:].any()
    with pytest.raises(FeatherError, match="holds 9 tokens; this request needs 10"):
        cache.append({f"present.{n}": mem.upload(np.zeros((1, kv_heads, 2, 4), np.float32))
                      for n in history})


def test_cuda_memory_without_cuda_python_is_a_clear_error(monkeypatch):
    import sys

    from feather_runtime.device import CudaMemory

    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)          # import -> ImportError
    with pytest.raises(FeatherError, match="need cuda-python .* or run on the CPU"):
        CudaMemory()


def test_cuda_memory_without_a_gpu_is_a_clear_error():
    """The real cuda-python on a machine without an NVIDIA driver: one FeatherError naming the
    failing call, not a crash (on a GPU machine this allocates and frees for real instead)."""
    from feather_runtime.device import CudaMemory

    try:
        from cuda.bindings import runtime  # noqa: F401
    except ImportError as exc:
        print(f"SKIP: cuda-python is not importable: {exc}")
        pytest.skip(f"cuda-python is not importable: {exc}")
    try:
        memory = CudaMemory()
    except FeatherError as exc:
        assert str(exc).startswith("CUDA error in cudaSetDevice"), exc
        return
    t = memory.upload(np.arange(6, dtype=np.float32))          # a GPU is here: use it
    np.testing.assert_array_equal(memory.download(t), np.arange(6, dtype=np.float32))
    memory.close()
