"""TensorRT end to end (``pytest -m tensorrt``): engines built from tiny artifacts, TensorRT vs ONNX
Runtime per segment (polygraphy's Comparator, and max-abs per output on the runtime's own calls),
and a Pipeline on the TensorRT backend against the ONNX Runtime pipeline, token for token.

Every test skips, printing the reason, where TensorRT, cuda-python or a GPU is absent. The plugin
test also needs the built plugin library ($FEATHER_PLUGIN_LIBRARY or build/plugin/).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_inputs
from feather_export.export.artifact import ExportOptions, export
from feather_runtime import FeatherError, Pipeline
from feather_runtime.manifest import load_manifest

pytestmark = pytest.mark.tensorrt

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12
FP32_TOL = 1e-3            # max |trt - ort| / max(1, max |ort|) per float output
FP16_TOL = 3e-2


def _skip(reason: str):
    print(f"SKIP: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def trt():
    try:
        import tensorrt
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        _skip(f"TensorRT is not importable here ({type(exc).__name__}: {exc}); install TensorRT >= 10.3 "
              "with its Python bindings on an NVIDIA GPU machine (pip install 'feather-export[trt]')")
    try:
        from feather_runtime.backends.tensorrt import device_identity
        device = device_identity()
    except Exception as exc:  # noqa: BLE001 - no cuda-python, no driver, no GPU
        _skip(f"no usable CUDA device for TensorRT ({exc})")
    print(f"TensorRT {tensorrt.__version__} on {device}")
    return tensorrt


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tensorrt")


@pytest.fixture(scope="module")
def inputs():
    from feather_export.models.tiny import build_tiny_model

    return tiny_inputs(build_tiny_model("tiny"), seed=5)


def _export(workdir: Path, name: str, **kw) -> Path:
    out = workdir / name
    if not (out / "feather.json").is_file():
        export("tiny", out, ExportOptions(**kw), progress=lambda m: None)
    return out


def _build(path: Path, precision=None, **kw) -> list[str]:
    from feather_export.tensorrt.build import build_engines

    msgs: list[str] = []
    build_engines(path, precision, progress=lambda m: (msgs.append(m), print(m)), **kw)
    return msgs


def _trt_pipeline(path: Path, **backend_kwargs) -> Pipeline:
    if not backend_kwargs:
        try:
            return Pipeline.load(path, backend="tensorrt")
        except FeatherError as exc:             # get_backend not wired to TensorRT yet
            if "not available in this build" not in str(exc):
                raise
    from feather_runtime.backends.tensorrt import TensorRTBackend

    manifest = load_manifest(path)
    backend = TensorRTBackend(**backend_kwargs)
    return Pipeline(manifest, backend, {s.name: backend.load(manifest.root, s) for s in manifest.segments})


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def test_build_engines_profiles_and_reuse(trt, workdir):
    a = _export(workdir, "b144", method="feather")
    b = _export(workdir, "b64", method="feather", budget=64)
    _build(a)
    index = json.loads((a / "engines" / "engines.json").read_text())
    assert index["default_precision"] == "fp32" and len(index["engines"]) == 7
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for entry in index["engines"]:
        engine = runtime.deserialize_cuda_engine((a / entry["file"]).read_bytes())
        assert engine is not None, entry["file"]
        assert engine.num_optimization_profiles == max(1, len(entry["profiles"]))
        for k, profile in enumerate(entry["profiles"]):          # TensorRT kept our ranges,
            for name, r in profile["shapes"].items():             # zero-length past included
                got = [tuple(s) for s in engine.get_tensor_profile_shape(name, k)]
                assert got == [tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])], (entry["file"], name)
    msgs = _build(a)
    assert sum("up to date" in m for m in msgs) == 7
    msgs = _build(b, reuse_from=[a])
    index_b = json.loads((b / "engines" / "engines.json").read_text())
    reused = sorted(e["segment"] for e in index_b["engines"] if e["reused_from"])
    assert reused == ["decoder_0_1", "embed", "vision"]


def test_segments_match_onnxruntime(trt, workdir, inputs):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromPath, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    art = _export(workdir, "b144", method="feather")
    if not (art / "engines" / "engines.json").is_file():
        _build(art)
    ort_pipe = Pipeline.load(art, backend="onnxruntime-cpu")
    calls = []
    memory = ort_pipe.memory
    for name, runner in ort_pipe.runners.items():
        def recording(inputs, _run=runner.run_device, _name=name):
            calls.append((_name, {k: memory.download(v) for k, v in inputs.items()}))
            return _run(inputs)
        runner.run_device = recording
    pixels, ids = inputs
    ort_pipe.generate_ids(pixels, ids, max_new_tokens=4)
    trt_pipe = _trt_pipeline(art)
    worst = {}
    for name, feeds in calls:
        ref = ort_pipe.runners[name].session.run(None, feeds)
        ref = dict(zip(ort_pipe.runners[name].output_names, ref))
        got = trt_pipe.runners[name].run(feeds)
        for out, value in ref.items():
            assert got[out].shape == value.shape, (name, out)
            if value.dtype.kind in "iub":
                np.testing.assert_array_equal(got[out], value, err_msg=f"{name}.{out}")
            else:
                worst[f"{name}.{out}"] = max(worst.get(f"{name}.{out}", 0.0), _rel_err(got[out], value))
    print("max relative error per output:", json.dumps(worst, indent=1))
    assert max(worst.values()) <= FP32_TOL, worst
    # the same check through polygraphy's runners (profile 0 = prefill)
    index = json.loads((art / "engines" / "engines.json").read_text())
    files = {e["segment"]: art / e["file"] for e in index["engines"] if e["precision"] == "fp32"}
    for name in ("vision", "select_1"):
        feeds = next(f for n, f in calls if n == name)
        results = Comparator.run(
            [OnnxrtRunner(SessionFromOnnx(str(art / "onnx" / f"{name}.onnx"))),
             TrtRunner(EngineFromPath(str(files[name])))], data_loader=[feeds])
        assert bool(Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(atol=FP32_TOL, rtol=FP32_TOL))), name


@pytest.mark.parametrize("method,kw", [("feather", {}), ("fastv", {}), ("fastervlm", {}),
                                       ("none", {}), ("feather", {"schedule": "1:37,3:5"})])
def test_pipeline_matches_onnxruntime(trt, workdir, inputs, method, kw):
    name = f"{method}{'-' + kw['schedule'].replace(':', '_').replace(',', '-') if kw else ''}"
    art = _export(workdir, name, method=method, **kw)
    _build(art, reuse_from=[workdir / "b144"] if (workdir / "b144" / "engines").is_dir() else [])
    pixels, ids = inputs
    ref = Pipeline.load(art, backend="onnxruntime-cpu").generate_ids(pixels, ids, NEW_TOKENS)
    res = _trt_pipeline(art).generate_ids(pixels, ids, NEW_TOKENS)
    print(method, kw, "tokens", res.token_ids, "timings", res.timings)
    assert res.kept == ref.kept
    assert res.token_ids == ref.token_ids
    assert _rel_err(res.first_logits, ref.first_logits) <= FP32_TOL


def test_decode_cuda_graphs(trt, workdir, inputs):
    """Decode steps replay CUDA graphs (one capture per decode engine, then launches), and give
    the same tokens as without graphs."""
    art = _export(workdir, "b144", method="feather")
    if not (art / "engines" / "engines.json").is_file():
        _build(art)
    pixels, ids = inputs
    pipe = _trt_pipeline(art)
    res = pipe.generate_ids(pixels, ids, NEW_TOKENS)
    plain = _trt_pipeline(art, cuda_graphs=False).generate_ids(pixels, ids, NEW_TOKENS)
    assert res.token_ids == plain.token_ids
    decode = [r for r in pipe.runners.values() if "decode" in r.roles]
    print({r.name: (r.graph_launches, r.graph_error) for r in decode})
    assert all(r.graph_error is None for r in decode)
    assert all(r.graph_launches == len(res.token_ids) - 2 for r in decode)


@pytest.mark.parametrize("dtype,precision", [("fp16", None), ("fp32", "fp16")])
def test_reduced_precision(trt, workdir, inputs, dtype, precision):
    art = _export(workdir, f"{dtype}-art", method="feather", dtype=dtype)
    if precision is not None and int(trt.__version__.split(".")[0]) >= 11:
        from feather_runtime import FeatherError

        with pytest.raises(FeatherError, match="strongly typed networks only"):
            _build(art, precision)            # TensorRT 11: no FP16 builder flag (refused first)
        return
    _build(art, precision)
    pixels, ids = inputs
    ref = Pipeline.load(art, backend="onnxruntime-cpu").generate_ids(pixels, ids, 4)
    res = _trt_pipeline(art, precision=precision).generate_ids(pixels, ids, 4)
    stage1 = len(set(res.kept[0]) & set(ref.kept[0])) / len(ref.kept[0])
    print(dtype, precision, "stage-1 overlap", stage1, "first-logit error",
          _rel_err(res.first_logits, ref.first_logits))
    assert stage1 >= 0.9
    assert _rel_err(res.first_logits, ref.first_logits) <= FP16_TOL


def test_plugin_engines(trt, workdir, inputs):
    lib = os.environ.get("FEATHER_PLUGIN_LIBRARY") or REPO / "build" / "plugin" / "libfeather_plugin.so"
    if not Path(lib).is_file():
        _skip(f"plugin library {lib} not built (cmake -S engines/plugin -B build/plugin && cmake "
              "--build build/plugin, or set FEATHER_PLUGIN_LIBRARY)")
    body = _export(workdir, "b144", method="feather")
    art = _export(workdir, "plugin-only", method="feather", trt_plugin_only=True)
    _build(art, plugin_library=lib)
    index = json.loads((art / "engines" / "engines.json").read_text())
    assert all(e["uses_plugin"] for e in index["engines"] if e["kind"] == "select")
    pixels, ids = inputs
    ref = Pipeline.load(body, backend="onnxruntime-cpu").generate_ids(pixels, ids, NEW_TOKENS)
    res = _trt_pipeline(art, plugin_library=lib).generate_ids(pixels, ids, NEW_TOKENS)
    assert res.kept == ref.kept and res.token_ids == ref.token_ids
    if tuple(int(x) for x in trt.__version__.split(".")[:2]) >= (10, 7):
        fb = workdir / "b144-plugin"                 # function body present: the plugin still wins
        if not fb.exists():
            shutil.copytree(body, fb, ignore=shutil.ignore_patterns("engines"))
        _build(fb, plugin_library=lib)
        index = json.loads((fb / "engines" / "engines.json").read_text())
        assert all(e["uses_plugin"] for e in index["engines"] if e["kind"] == "select")
