"""The TensorRT glue on CPU, against *fake* ``tensorrt`` and ``cuda.bindings.runtime`` modules.

What this proves: the builder's orchestration (plans, names, engines.json, reuse within and across
artifacts, plugin rules, trtexec lines) and the backend's mechanics (index checks, one context per
profile chosen by shape, buffers sized once and bound once, host<->device copies, refusals), and
that a Pipeline on the backend reproduces ONNX Runtime token for token.
What it does not prove: anything about TensorRT itself. The fake engine executes the segment's ONNX
file with ONNX Runtime, and the fakes implement only the documented TensorRT 10.3 / cuda-python
calls the code makes (signatures from TensorRT's python/src/infer/pyCore.cpp at v10.3.0). The real
thing is tests/test_tensorrt.py (marked ``tensorrt``).
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_inputs
from feather_export.tensorrt import build as trt_build
from feather_export.export.artifact import ExportOptions, export
from feather_runtime import FeatherError, Pipeline
from feather_runtime.manifest import load_manifest

OK = "cudaSuccess"

try:                         # the real bindings (import fine without a GPU), to check the fakes
    from cuda.bindings import runtime as REAL_CUDART
    REAL_WHY = ""
except Exception as exc:  # noqa: BLE001
    REAL_CUDART, REAL_WHY = None, f"{type(exc).__name__}: {exc}"


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)   # importlib.util.find_spec works
    return module


# ---- fake cuda-python -------------------------------------------------------------------------

class FakeCuda:
    """Device memory is host memory behind the allocation table, so every pointer TensorRT or a
    copy is given can be checked against it. Stream capture records ``execute_async_v3`` calls;
    launching the graph replays them with the addresses and shapes captured, as CUDA does."""

    def __init__(self):
        self.memory: dict[int, ctypes.Array] = {}
        self.copies = {"H2D": 0, "D2H": 0, "D2D": 0}
        self.bytes = {"H2D": 0, "D2H": 0, "D2D": 0}
        self.capturing: list | None = None          # calls recorded while a capture is open
        self.graphs = {"captured": 0, "launched": 0, "live": 0}
        self.fail_capture = False
        rt = _module("cuda.bindings.runtime")
        rt.cudaError_t = types.SimpleNamespace(cudaSuccess=OK)
        rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="H2D",
                                                  cudaMemcpyDeviceToHost="D2H",
                                                  cudaMemcpyDeviceToDevice="D2D")
        rt.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal="local")
        rt.cudaMalloc = self.malloc
        rt.cudaFree = self.free
        rt.cudaMemcpyAsync = self.memcpy
        rt.cudaMemcpy2DAsync = self.memcpy2d
        rt.cudaMemsetAsync = self.memset
        rt.cudaStreamCreate = lambda: (OK, FakeStream())
        rt.cudaStreamSynchronize = lambda s: (self._stream(s), (OK,))[1]
        rt.cudaStreamDestroy = lambda s: (self._stream(s), (OK,))[1]
        rt.cudaStreamBeginCapture = self.begin_capture
        rt.cudaStreamEndCapture = self.end_capture
        rt.cudaGraphInstantiate = self.instantiate
        rt.cudaGraphLaunch = self.launch
        rt.cudaGraphExecDestroy = self.destroy_exec
        rt.cudaGraphDestroy = lambda g: (OK,)
        rt.cudaSetDevice = lambda d: (OK,)
        rt.cudaGetDevice = lambda: (OK, 0)
        rt.cudaGetDeviceProperties = lambda d: (OK, types.SimpleNamespace(
            name=b"Fake GPU\0\0\0", major=8, minor=7))
        self.runtime = rt

    @staticmethod
    def _stream(s):
        assert isinstance(s, FakeStream), "streams are passed as the cudaStream_t object"

    def malloc(self, n):
        assert isinstance(n, int) and n > 0
        buf = ctypes.create_string_buffer(n)
        self.memory[ctypes.addressof(buf)] = buf
        return OK, ctypes.addressof(buf)

    def free(self, ptr):
        del self.memory[ptr]
        return (OK,)

    def device_size(self, ptr, n):
        for base, buf in self.memory.items():
            if base <= ptr and ptr + n <= base + len(buf):
                return len(buf)
        raise AssertionError(f"{ptr:#x}+{n} is not inside a device allocation")

    def _on_device(self, dst, src, n, kind):
        assert self.capturing is None, "copies are not part of the captured graphs"
        if kind in ("H2D", "D2D"):
            self.device_size(dst, n)
        if kind in ("D2H", "D2D"):
            self.device_size(src, n)

    def memcpy(self, dst, src, count, kind, stream):
        assert isinstance(dst, int) and isinstance(src, int) and count > 0
        self._stream(stream)
        self._on_device(dst, src, count, kind)
        ctypes.memmove(dst, src, count)
        self.copies[kind] += 1
        self.bytes[kind] += count
        return (OK,)

    def memcpy2d(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert all(isinstance(v, int) for v in (dst, dpitch, src, spitch, width, height))
        assert width <= dpitch and width <= spitch and height > 0
        self._stream(stream)
        self._on_device(dst, src, dpitch * (height - 1) + width, "H2D")
        self._on_device(dst, src, spitch * (height - 1) + width, "D2H")
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        self.copies[kind] += 1
        self.bytes[kind] += width * height
        return (OK,)

    def memset(self, ptr, value, count, stream):
        self._stream(stream)
        self.device_size(ptr, count)
        ctypes.memset(ptr, value, count)
        return (OK,)

    def begin_capture(self, stream, mode):
        self._stream(stream)
        assert mode == "local" and self.capturing is None
        self.capturing = []
        return (OK,)

    def end_capture(self, stream):
        self._stream(stream)
        calls, self.capturing = self.capturing, None
        return OK, FakeGraph(calls)

    def instantiate(self, graph, flags):
        assert isinstance(graph, FakeGraph) and flags == 0
        if self.fail_capture:
            return ("cudaErrorStreamCaptureUnsupported", None)
        self.graphs["captured"] += 1
        self.graphs["live"] += 1
        return OK, graph

    def launch(self, graph, stream):
        self._stream(stream)
        for replay in graph.calls:
            replay()
        self.graphs["launched"] += 1
        return (OK,)

    def destroy_exec(self, graph):
        self.graphs["live"] -= 1
        return (OK,)

    def install(self, monkeypatch):
        cuda = _module("cuda")
        bindings = _module("cuda.bindings")
        utils = _module("cuda.bindings.utils")           # cuda-bindings >= 13 stream handles
        utils.get_cuda_native_handle = lambda obj: (self._stream(obj), int(obj))[1]
        bindings.runtime, bindings.utils = self.runtime, utils
        cuda.bindings = bindings
        monkeypatch.setitem(sys.modules, "cuda", cuda)
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", self.runtime)
        monkeypatch.setitem(sys.modules, "cuda.bindings.utils", utils)


class FakeGraph:
    def __init__(self, calls):
        self.calls = calls


class FakeStream:
    def __int__(self):
        return 0x5EED


# ---- fake tensorrt ------------------------------------------------------------------------------

class FakeTensorRT:
    def __init__(self, cuda: FakeCuda, version="10.3.0"):
        self.cuda = cuda
        self.loaded_plugins = []
        self.contexts = []
        trt = _module("tensorrt")
        trt.__version__ = version
        trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
        trt.TensorLocation = types.SimpleNamespace(DEVICE="device", HOST="host")
        trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(
            STATIC="static", ON_PROFILE_CHANGE="on_profile_change", USER_MANAGED="user_managed")
        trt.LayerType = types.SimpleNamespace(PLUGIN_V3="plugin_v3")
        trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
        trt.IStreamReader = type("IStreamReader", (), {"__init__": lambda self: None})
        trt.bfloat16 = "bfloat16"

        def nptype(dtype):
            if dtype == "bfloat16":
                raise TypeError("no numpy bfloat16")
            return np.dtype(dtype).type
        trt.nptype = nptype
        fake = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, source):
                data = source.read(1 << 30) if hasattr(source, "read") else source
                return FakeEngine(fake, json.loads(data))
        trt.Runtime = Runtime

        class Registry:
            def load_library(self, path):
                fake.loaded_plugins.append(path)
                return object()

            def get_creator(self, name, version, namespace):
                ok = fake.loaded_plugins and (name, version, namespace) == ("SelectTokens", "1", "feather")
                return object() if ok else None
        registry = Registry()
        trt.get_plugin_registry = lambda: registry
        self.module = trt

    def install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "tensorrt", self.module)


class FakeEngine:
    """Executes the segment's ONNX file with ONNX Runtime behind TensorRT's engine/context API."""

    def __init__(self, fake: FakeTensorRT, spec: dict):
        import onnx
        import onnxruntime as ort
        from onnx.helper import tensor_dtype_to_np_dtype

        self.fake = fake
        model = onnx.load(spec["onnx"])
        self.io = {}
        for mode, values in (("input", model.graph.input), ("output", model.graph.output)):
            for v in values:
                t = v.type.tensor_type
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
                self.io[v.name] = (mode, np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name, dims)
        self.names = list(self.io)
        self.profiles = spec["profiles"]
        if not model.functions and any(n.domain == "feather" for n in model.graph.node):
            from feather_export.onnx.select_op import select_function   # "plugin": same computation

            model.functions.append(select_function())
        self.session = ort.InferenceSession(model.SerializeToString(),
                                            providers=["CPUExecutionProvider"])
        self.device_memory_size_v2 = 4096
        self._shape_cache = {}

    num_io_tensors = property(lambda self: len(self.names))
    num_optimization_profiles = property(lambda self: max(1, len(self.profiles)))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_shape(self, name):
        return self.io[name][2]

    def get_tensor_location(self, name):
        return "device"

    def get_tensor_profile_shape(self, name, k):
        shapes = self.profiles[k]["shapes"][name]
        return [tuple(shapes[w]) for w in ("min", "opt", "max")]

    def create_execution_context(self, strategy):
        context = FakeContext(self, strategy)
        self.fake.contexts.append(context)
        return context

    def output_shapes(self, input_shapes: dict) -> dict:
        key = tuple(sorted(input_shapes.items()))
        if key not in self._shape_cache:
            feeds = {n: np.zeros(s, self.io[n][1]) for n, s in input_shapes.items()}
            outs = self.session.run(None, feeds)
            names = [o.name for o in self.session.get_outputs()]
            self._shape_cache[key] = {n: o.shape for n, o in zip(names, outs)}
        return self._shape_cache[key]


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy):
        self.engine, self.strategy = engine, strategy
        self.profile = 0
        self.memory = None
        self.shapes = {n: d for n, (m, _, d) in engine.io.items() if m == "input" and -1 not in d}
        self.addresses = {}
        self.address_calls = 0
        self.runs = 0

    def set_optimization_profile_async(self, k, stream_handle):
        assert isinstance(stream_handle, int) and 0 <= k < self.engine.num_optimization_profiles
        self.profile = k
        return True

    def set_device_memory(self, ptr, size):
        assert self.strategy == "user_managed" and isinstance(ptr, int)
        assert self.engine.fake.cuda.device_size(ptr, size) >= size
        self.memory = (ptr, size)

    def set_input_shape(self, name, shape):
        mode, _, dims = self.engine.io[name]
        shape = tuple(shape)
        if mode != "input" or len(shape) != len(dims):
            return False
        if any(d != -1 and d != s for d, s in zip(dims, shape)):
            return False
        if -1 in dims:
            r = self.engine.profiles[self.profile]["shapes"][name]
            if not all(a <= s <= b for a, s, b in zip(r["min"], shape, r["max"])):
                return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name):
        if self.engine.io[name][0] == "input":
            return self.shapes[name]
        return self.engine.output_shapes(self.shapes)[name]

    def set_tensor_address(self, name, ptr):
        assert isinstance(ptr, int) and ptr
        self.addresses[name] = ptr
        self.address_calls += 1
        return True

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        assert self.memory and self.memory[1] >= self.engine.device_memory_size_v2
        cuda = self.engine.fake.cuda
        if cuda.capturing is not None:                 # recorded with today's bindings
            shapes, addresses = dict(self.shapes), dict(self.addresses)
            cuda.capturing.append(lambda: self._execute(shapes, addresses))
            return True
        self._execute(self.shapes, self.addresses)
        return True

    def _execute(self, shapes, addresses):
        cuda = self.engine.fake.cuda
        self.addresses_seen = addresses
        feeds = {}
        for name, shape in shapes.items():
            dtype = np.dtype(self.engine.io[name][1])
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if nbytes:
                cuda.device_size(addresses[name], nbytes)
            raw = ctypes.string_at(addresses[name], nbytes) if nbytes else b""
            feeds[name] = np.frombuffer(raw, dtype).reshape(shape).copy()
        names = [o.name for o in self.engine.session.get_outputs()]
        for name, value in zip(names, self.engine.session.run(None, feeds)):
            value = np.ascontiguousarray(value)
            if value.nbytes:
                assert cuda.device_size(addresses[name], value.nbytes)
                ctypes.memmove(addresses[name], value.ctypes.data, value.nbytes)
        self.runs += 1


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def fakes(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    trt = FakeTensorRT(cuda)
    trt.install(monkeypatch)
    compiled = []

    def fake_compile(trt_module, root, plan, plugin_loaded, timing_cache, workspace_mib, tf32):
        assert trt_module is trt.module
        compiled.append(plan.segment)
        spec = {"onnx": str((root / plan.onnx).resolve()),
                "profiles": [p.to_dict() for p in plan.profiles]}
        (root / plan.engine).write_text(json.dumps(spec))
        return plugin_loaded and plan.uses_select_op
    monkeypatch.setattr(trt_build, "_compile_to_file", fake_compile)
    import feather_runtime.backends.tensorrt as backend_module
    monkeypatch.setattr(backend_module, "_loaded_plugins", {})
    monkeypatch.setattr(backend_module, "_logger", None)
    return types.SimpleNamespace(cuda=cuda, trt=trt, compiled=compiled)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt_glue")
    quiet = lambda msg: None  # noqa: E731
    return {name: export("tiny", root / name, ExportOptions(**kw), progress=quiet)
            for name, kw in {"b144": dict(method="feather"), "b64": dict(method="feather", budget=64),
                             "vlm": dict(method="fastervlm", budget=64),
                             "plugin_only": dict(method="feather", trt_plugin_only=True)}.items()}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _trt_pipeline(path, **kwargs):
    from feather_runtime.backends.tensorrt import TensorRTBackend

    manifest = load_manifest(path)
    backend = TensorRTBackend(**kwargs)
    runners = {seg.name: backend.load(manifest.root, seg) for seg in manifest.segments}
    return Pipeline(manifest, backend, runners)


# ---- builder -----------------------------------------------------------------------------------

def test_build_reuse_and_index(fakes, artifacts, tmp_path):
    a, b = _copy(artifacts["b144"], tmp_path / "a"), _copy(artifacts["b64"], tmp_path / "b")
    msgs = []
    paths = trt_build.build_engines(a, progress=msgs.append)
    assert [p.name for p in paths] == ["vision.fp32.plan", "embed.fp32.plan", "decoder_0_1.fp32.plan",
                                       "select_1.b144.fp32.plan", "decoder_1_2.b144.fp32.plan",
                                       "select_2.b144.fp32.plan", "decoder_2_4.b144.fp32.plan"]
    assert fakes.compiled == [p.name.split(".")[0] for p in paths]
    assert sum(m.startswith("  equivalent: trtexec --onnx=") for m in msgs) == 7
    assert any("function body" in m for m in msgs)          # no plugin given: parser inlines the op
    index = json.loads((a / "engines" / "engines.json").read_text())
    assert index["default_precision"] == "fp32" and len(index["engines"]) == 7
    entry = next(e for e in index["engines"] if e["segment"] == "decoder_0_1")
    assert entry["device"] == {"name": "Fake GPU", "compute_capability": "8.7"}
    assert entry["tensorrt"] == "10.3.0" and entry["reused_from"] is None
    assert [p["role"] for p in entry["profiles"]] == ["prefill", "decode"]
    assert entry["trtexec"].startswith(f"trtexec --onnx={a}/onnx/decoder_0_1.onnx")
    assert json.loads((a / "feather.json").read_text())      # manifest untouched and still valid
    load_manifest(a)

    fakes.compiled.clear()
    msgs.clear()
    trt_build.build_engines(a, progress=msgs.append)         # nothing changed: nothing built
    assert fakes.compiled == [] and sum("up to date" in m for m in msgs) == 7

    trt_build.build_engines(b, progress=msgs.append, reuse_from=[a])
    assert fakes.compiled == ["select_1", "decoder_1_2", "select_2", "decoder_2_4"]
    index_b = json.loads((b / "engines" / "engines.json").read_text())
    reused = {e["segment"]: e["reused_from"] for e in index_b["engines"]}
    assert reused["vision"] == str(a / "engines" / "vision.fp32.plan")
    assert reused["decoder_0_1"] and reused["select_1"] is None and reused["decoder_1_2"] is None

    fakes.compiled.clear()
    (a / "engines" / "embed.fp32.plan").write_text("{}")     # damaged: rebuilt, others kept
    trt_build.build_engines(a, progress=msgs.append)
    assert fakes.compiled == ["embed"]

    fakes.compiled.clear()
    trt_build.build_engines(a, "fp16", progress=msgs.append)   # weakly typed fp16 on fp32 graphs
    assert len(fakes.compiled) == 7
    index = json.loads((a / "engines" / "engines.json").read_text())
    assert index["default_precision"] == "fp16" and len(index["engines"]) == 14
    assert all(not e["strongly_typed"] for e in index["engines"] if e["precision"] == "fp16")


def test_plugin_rules(fakes, artifacts, tmp_path):
    art = _copy(artifacts["plugin_only"], tmp_path / "p")
    with pytest.raises(FeatherError, match="--trt-plugin-only"):
        trt_build.build_engines(art, progress=lambda m: None)
    with pytest.raises(FeatherError, match="does not exist"):
        trt_build.build_engines(art, plugin_library=tmp_path / "missing.so", progress=lambda m: None)
    lib = tmp_path / "libfeather_plugin.so"
    lib.write_bytes(b"\x7fELF fake")
    trt_build.build_engines(art, plugin_library=lib, progress=lambda m: None)
    assert fakes.trt.loaded_plugins == [str(lib.resolve())]
    index = json.loads((art / "engines" / "engines.json").read_text())
    select = next(e for e in index["engines"] if e["segment"] == "select_1")
    assert select["uses_plugin"] and select["plugin"]["path"] == str(lib.resolve())
    assert "--dynamicPlugins=" + str(lib.resolve()) in select["trtexec"]
    decoder = next(e for e in index["engines"] if e["segment"] == "decoder_0_1")
    assert decoder["plugin"] is None and "--dynamicPlugins" not in decoder["trtexec"]
    # a function-body artifact on TensorRT < 10.7: the plugin would not be used; say so
    msgs = []
    other = _copy(artifacts["b144"], tmp_path / "f")
    trt_build.build_engines(other, plugin_library=lib, progress=msgs.append)
    assert any("< 10.7" in m and "--trt-plugin-only" in m for m in msgs)


def test_old_tensorrt_is_refused(fakes, artifacts, monkeypatch):
    monkeypatch.setattr(fakes.trt.module, "__version__", "8.6.1")
    with pytest.raises(FeatherError, match="too old"):
        trt_build.build_engines(artifacts["b144"], progress=lambda m: None)


def test_without_tensorrt_is_a_clear_error(artifacts, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)       # import tensorrt -> ImportError
    with pytest.raises(FeatherError, match="needs TensorRT >= 10.3"):
        trt_build.build_engines(artifacts["b144"], progress=lambda m: None)
    from feather_runtime.backends.tensorrt import TensorRTBackend
    with pytest.raises(FeatherError, match="needs TensorRT >= 10.3"):
        TensorRTBackend()


# ---- backend -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["b144", "vlm"])
def test_pipeline_on_fake_tensorrt_matches_onnxruntime(fakes, artifacts, tmp_path, name):
    from feather_export.models.tiny import build_tiny_model

    art = _copy(artifacts[name], tmp_path / name)
    trt_build.build_engines(art, progress=lambda m: None)
    pixels, ids = tiny_inputs(build_tiny_model("tiny"), seed=3)
    ref = Pipeline.load(art, backend="onnxruntime-cpu").generate_ids(pixels, ids, max_new_tokens=12)
    pipe = _trt_pipeline(art)
    res = pipe.generate_ids(pixels, ids, max_new_tokens=12)
    assert res.token_ids == ref.token_ids and res.kept == ref.kept and len(res.token_ids) == 12
    np.testing.assert_allclose(res.first_logits, ref.first_logits, rtol=0, atol=1e-6)
    decoder_contexts = [r.contexts for n, r in pipe.runners.items() if n.startswith("decoder")]
    assert all(len(cs) == 2 for cs in decoder_contexts)
    assert all(cs[0].runs == 1 and cs[1].runs == 11 for cs in decoder_contexts)
    assert all(len(r.contexts) == 1 for n, r in pipe.runners.items() if n.startswith(("vision", "select")))
    # decode: the first step runs and is captured, the next 10 replay the graph (embed + spans)
    decode_runners = [r for r in pipe.runners.values() if "decode" in r.roles]
    assert fakes.cuda.graphs["captured"] == len(decode_runners)
    assert fakes.cuda.graphs["launched"] == 10 * len(decode_runners)
    # every context shares the backend's one scratch buffer
    assert len({c.memory for c in fakes.trt.contexts}) == 1

    # a second call: identical, binds nothing new (every address is the same), all decode steps
    # replay graphs, and the host sees only token/position/past_length in and logits out
    address_calls = sum(c.address_calls for c in fakes.trt.contexts)
    launched, bytes_before = fakes.cuda.graphs["launched"], dict(fakes.cuda.bytes)
    again = pipe.generate_ids(pixels, ids, max_new_tokens=12)
    assert again.token_ids == ref.token_ids and again.kept == ref.kept
    assert sum(c.address_calls for c in fakes.trt.contexts) == address_calls
    assert fakes.cuda.graphs["launched"] - launched == 11 * len(decode_runners)
    short = dict(fakes.cuda.bytes)
    pipe.generate_ids(pixels, ids, max_new_tokens=2)
    prefill_and_one = {k: fakes.cuda.bytes[k] - short[k] for k in short}
    twelve = {k: short[k] - bytes_before[k] for k in short}
    per_step = {k: (twelve[k] - prefill_and_one[k]) / 10 for k in short}
    m = pipe.manifest["model"]
    spans = len(decode_runners) - 1
    assert per_step["H2D"] == 8 * (2 + spans)                 # token, position, past_length/span
    assert per_step["D2H"] == 4 * m["vocab_size"]             # the logits
    assert per_step["D2D"] == 2 * m["num_layers"] * m["num_key_value_heads"] * m["head_dim"] * 4
    live = len(fakes.cuda.memory)
    pipe.close()                  # workspace and caches; the backend was passed in: left open
    assert 0 < len(fakes.cuda.memory) < live
    pipe.backend.close()
    assert fakes.cuda.memory == {} and fakes.cuda.graphs["live"] == 0
    with Pipeline.load(art, backend="tensorrt") as owned:           # owns its backend
        assert owned.generate_ids(pixels, ids, max_new_tokens=4).token_ids == ref.token_ids[:4]
        assert fakes.cuda.graphs["live"] > 0
    assert fakes.cuda.memory == {} and fakes.cuda.graphs["live"] == 0


def test_graphs_follow_the_bindings(fakes, artifacts, tmp_path):
    """A graph replays only the bindings it captured: a new address runs (and captures) again,
    so a stale graph can never read the wrong buffer."""
    from feather_runtime.backends.tensorrt import TensorRTBackend

    art = _copy(artifacts["b144"], tmp_path / "g")
    trt_build.build_engines(art, progress=lambda m: None)
    manifest = load_manifest(art)
    backend = TensorRTBackend()
    runner = backend.load(art, manifest.segment("embed"))
    session = Pipeline.load(art, backend="onnxruntime-cpu").runners["embed"]
    memory = backend.memory
    a, b = memory.empty((1, 1), np.int64), memory.empty((1, 1), np.int64)
    for step, (buffer, token) in enumerate([(a, 3), (a, 5), (a, 7), (b, 9), (b, 11), (a, 13)]):
        memory.upload(np.asarray([[token]], np.int64), into=buffer)
        got = memory.download(runner.run_device({"input_ids": buffer})["inputs_embeds"])
        want = session.run({"input_ids": np.asarray([[token]], np.int64)})["inputs_embeds"]
        np.testing.assert_array_equal(got, want)
    # runs: a (capture), a, a (replays), b (capture), b (replay), a (capture)
    assert fakes.cuda.graphs["captured"] == 3 and runner.graph_launches == 3
    assert fakes.cuda.graphs["live"] == 1
    backend.close()
    assert fakes.cuda.graphs["live"] == 0 and fakes.cuda.memory == {}
    backend.close()                                                  # idempotent
    memory.close()


def test_graph_capture_failure_falls_back(fakes, artifacts, tmp_path):
    from feather_export.models.tiny import build_tiny_model

    art = _copy(artifacts["b144"], tmp_path / "f")
    trt_build.build_engines(art, progress=lambda m: None)
    pixels, ids = tiny_inputs(build_tiny_model("tiny"), seed=4)
    ref = Pipeline.load(art, backend="onnxruntime-cpu").generate_ids(pixels, ids, max_new_tokens=6)
    fakes.cuda.fail_capture = True
    pipe = _trt_pipeline(art)
    assert pipe.generate_ids(pixels, ids, max_new_tokens=6).token_ids == ref.token_ids
    assert fakes.cuda.graphs["launched"] == 0
    assert all("cudaGraphInstantiate" in r.graph_error for r in pipe.runners.values()
               if "decode" in r.roles)
    off = _trt_pipeline(art, cuda_graphs=False)
    fakes.cuda.fail_capture = False
    assert off.generate_ids(pixels, ids, max_new_tokens=6).token_ids == ref.token_ids
    assert fakes.cuda.graphs["captured"] == 0


def test_backend_refusals(fakes, artifacts, tmp_path, monkeypatch):
    from feather_runtime.backends.tensorrt import TensorRTBackend

    art = _copy(artifacts["b144"], tmp_path / "r")
    manifest = load_manifest(art)
    embed = manifest.segment("embed")
    with pytest.raises(FeatherError, match="has no TensorRT engines"):
        TensorRTBackend().load(art, embed)
    trt_build.build_engines(art, progress=lambda m: None)
    with pytest.raises(FeatherError, match="no bf16 TensorRT engine"):
        TensorRTBackend(precision="bf16").load(art, embed)
    runner = TensorRTBackend().load(art, embed)
    with pytest.raises(FeatherError, match="fit none of the engine's optimization profiles"):
        runner.run({"input_ids": np.zeros((1, 2000), np.int64)})
    with pytest.raises(FeatherError, match="dtype int32"):
        runner.run({"input_ids": np.zeros((1, 1), np.int32)})
    with pytest.raises(FeatherError, match="unknown inputs"):
        runner.run({"input_ids": np.zeros((1, 1), np.int64), "x": np.zeros(1)})
    assert runner.run({"input_ids": np.zeros((1, 1), np.int64)})["inputs_embeds"].shape == (1, 1, 64)

    index_path = art / "engines" / "engines.json"
    original = index_path.read_text()

    def edit(fn):
        data = json.loads(original)
        for e in data["engines"]:
            fn(e)
        index_path.write_text(json.dumps(data))

    edit(lambda e: e.update(tensorrt="10.7.0"))
    with pytest.raises(FeatherError, match="not portable across TensorRT versions"):
        TensorRTBackend().load(art, embed)
    edit(lambda e: e.update(device={"name": "Orin", "compute_capability": "8.7"}))
    with pytest.raises(FeatherError, match="on the device that runs them"):
        TensorRTBackend().load(art, embed)
    edit(lambda e: e.update(onnx_sha256="0" * 64))
    with pytest.raises(FeatherError, match="stale engines"):
        TensorRTBackend().load(art, embed)
    index_path.write_text(original)
    plan = art / "engines" / "embed.fp32.plan"
    spec = json.loads(plan.read_text())
    plan.write_text(json.dumps({"profiles": spec["profiles"], "onnx": spec["onnx"]}))  # same size
    with pytest.raises(FeatherError, match="tampered or corrupted"):
        TensorRTBackend().load(art, embed)
    TensorRTBackend(verify=False).load(art, embed)                    # size check only
    data = json.loads(original)
    data["default_precision"] = None
    index_path.write_text(json.dumps(data))
    with pytest.raises(FeatherError, match="did not finish"):
        TensorRTBackend().load(art, embed)


def test_plugin_engines_load_the_library_first(fakes, artifacts, tmp_path, monkeypatch):
    from feather_runtime.backends.tensorrt import PLUGIN_ENV, TensorRTBackend

    art = _copy(artifacts["plugin_only"], tmp_path / "p")
    lib = tmp_path / "libfeather_plugin.so"
    lib.write_bytes(b"\x7fELF fake")
    trt_build.build_engines(art, plugin_library=lib, progress=lambda m: None)
    import feather_runtime.backends.tensorrt as backend_module
    monkeypatch.setattr(backend_module, "_loaded_plugins", {})
    fakes.trt.loaded_plugins.clear()
    manifest = load_manifest(art)
    backend = TensorRTBackend()
    backend.load(art, manifest.segment("decoder_0_1"))
    assert fakes.trt.loaded_plugins == []                  # no plugin in a decoder engine
    backend.load(art, manifest.segment("select_1"))        # recorded path
    backend.load(art, manifest.segment("select_2"))        # once per process
    assert fakes.trt.loaded_plugins == [str(lib.resolve())]
    other = tmp_path / "elsewhere.so"
    monkeypatch.setenv(PLUGIN_ENV, str(other))
    with pytest.raises(FeatherError, match="does not exist"):
        TensorRTBackend().load(art, manifest.segment("select_1"))


def test_fake_cuda_matches_cuda_python_signatures():
    """Every cuda-python call the backends make (as the fake implements it) exists in the real
    cuda.bindings.runtime with the same number of arguments, and every enum member they use
    exists: the calls are right without a GPU to make them on."""
    import inspect
    import re

    if REAL_CUDART is None:
        print(f"SKIP: cuda-python (cuda-bindings) is not importable: {REAL_WHY}")
        pytest.skip(f"cuda-python (cuda-bindings) is not importable: {REAL_WHY}")
    fake = FakeCuda().runtime
    checked = []
    for name, fn in vars(fake).items():
        if not (name.startswith("cuda") and callable(fn)) or isinstance(fn, type):
            continue
        real = getattr(REAL_CUDART, name, None)
        assert real is not None, f"cuda.bindings.runtime has no {name}"
        match = re.match(rf"{name}\((.*)\)", (real.__doc__ or "").strip().splitlines()[0])
        assert match, f"cannot read the signature of {name}: {real.__doc__[:80]!r}"
        real_args = [a for a in match.group(1).split(",") if a.strip()]
        assert len(inspect.signature(fn).parameters) == len(real_args), (name, match.group(1))
        checked.append(name)
    for enum, members in (("cudaMemcpyKind", ("cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost",
                                              "cudaMemcpyDeviceToDevice")),
                          ("cudaStreamCaptureMode", ("cudaStreamCaptureModeThreadLocal",)),
                          ("cudaError_t", ("cudaSuccess",))):
        for member in members:
            assert hasattr(getattr(REAL_CUDART, enum), member), f"{enum}.{member}"
    print(f"checked against cuda-bindings: {sorted(checked)}")
    assert len(checked) >= 17


def test_runtime_import_stays_light():
    code = ("import sys, feather_runtime, feather_runtime.backends.tensorrt, "
            "feather_export.tensorrt.build, feather_export.tensorrt.plans; "
            "print(sorted(m for m in ('tensorrt', 'torch', 'transformers', 'cuda', 'polygraphy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_module_entry_point(fakes, artifacts, tmp_path, capsys):
    art = _copy(artifacts["b64"], tmp_path / "m")
    assert trt_build.main([str(art), "--precision", "fp16", "--workspace", "512"]) == 0
    err = capsys.readouterr().err
    assert "--memPoolSize=workspace:512M" in err and "--fp16" in err
    index = json.loads((art / "engines" / "engines.json").read_text())
    assert index["default_precision"] == "fp16"
    assert all(e["builder"] == {"tf32": False, "workspace_mib": 512} for e in index["engines"])
    plugin_only = _copy(artifacts["plugin_only"], tmp_path / "po")
    assert trt_build.main([str(plugin_only)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("feather-export: error: this artifact was exported with --trt-plugin-only")
