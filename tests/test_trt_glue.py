"""The TensorRT glue on CPU, against *fake* ``tensorrt`` and ``cuda.bindings.runtime`` modules.

What this proves: the builder's orchestration (plans, names, engines.json, reuse within and across
artifacts, plugin rules, trtexec lines) and the backend's mechanics (index checks, one context per
profile chosen by shape, buffers sized once and bound once, host<->device copies, refusals), and
that a Pipeline on the backend reproduces ONNX Runtime token for token.
What it does not prove: anything about TensorRT itself. The fake engine executes the segment's ONNX
file with ONNX Runtime, and the fakes implement only the documented TensorRT / cuda-python calls
the code makes (signatures from TensorRT's python/src/infer/pyCore.cpp at v10.3.0), in two API
generations: 10.x (``BuilderFlag.FP16/BF16``, ``IStreamReader``; ``IStreamReaderV2`` from 10.7) and
11.x (no FP16/BF16 builder flags: strongly typed only; ``IStreamReaderV2`` only; read from the
enum and class names in the tensorrt-cu12-bindings 11.4.0 wheel). The build step runs for real
against a fake ``polygraphy.backend.trt`` that mirrors polygraphy 0.49-0.53 where it matters
(``CreateConfig`` fails on a missing builder flag; ``EngineBytesFromNetwork`` opens
``<cache>.lock`` beside a ``save_timing_cache`` path and leaves it). The real thing is
tests/test_tensorrt.py (marked ``tensorrt``).
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
        self.driver_version, self.bindings_version = 12060, "12.9.0"     # CUDA 12.6 driver
        rt.cudaDriverGetVersion = lambda: (OK, self.driver_version)
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
        bindings.__version__ = self.bindings_version
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

def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:2])


class FakeTensorRT:
    def __init__(self, cuda: FakeCuda, version="10.3.0"):
        self.cuda = cuda
        self.loaded_plugins = []
        self.contexts = []
        self.readers = []                  # which stream reader deserialized each plan
        trt = _module("tensorrt")
        trt.__version__ = version
        v = _version(version)
        flags = ["DEBUG", "GPU_FALLBACK", "TF32", "REFIT"] + (["FP16", "BF16", "INT8"] if v < (11, 0) else [])
        trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED="strongly_typed")
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
        trt.TensorLocation = types.SimpleNamespace(DEVICE="device", HOST="host")
        trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(
            STATIC="static", ON_PROFILE_CHANGE="on_profile_change", USER_MANAGED="user_managed")
        trt.LayerType = types.SimpleNamespace(PLUGIN_V3="plugin_v3")
        trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
        if v < (11, 0):
            trt.IStreamReader = type("IStreamReader", (), {"__init__": lambda self: None})
        if v >= (10, 7):
            trt.IStreamReaderV2 = type("IStreamReaderV2", (), {"__init__": lambda self: None})
            trt.SeekPosition = types.SimpleNamespace(SET="set", CUR="cur", END="end")
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
                v2 = getattr(trt, "IStreamReaderV2", None)
                if v2 is not None and isinstance(source, v2):     # read(num_bytes, stream), seek
                    assert source.seek(0, trt.SeekPosition.END) and source.seek(0, trt.SeekPosition.SET)
                    chunks = []
                    while chunk := source.read(4096, 0x5EED):
                        chunks.append(chunk)
                    data, kind = b"".join(chunks), "IStreamReaderV2"
                elif hasattr(trt, "IStreamReader") and isinstance(source, trt.IStreamReader):
                    data, kind = source.read(1 << 30), "IStreamReader"
                else:
                    assert isinstance(source, (bytes, bytearray)), type(source)
                    data, kind = source, "bytes"
                fake.readers.append(kind)
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


# ---- fake polygraphy (the four loaders the builder uses) ---------------------------------------

class FakePolygraphy:
    """``polygraphy.backend.trt`` over the fake TensorRT. The "network" is the ONNX path; the
    "engine" a JSON spec the fake runtime executes with ONNX Runtime. Mirrors polygraphy where the
    builder's behaviour depends on it: ``CreateConfig`` raises PolygraphyException for a builder
    flag this TensorRT lacks (``try_set_flag`` -> ``fail_unavailable``); ``EngineBytesFromNetwork``
    with a ``save_timing_cache`` path opens ``path + ".lock"`` ("wb+", outside any try) after the
    build and never deletes it (``util.LockFile``). The parser's plugin precedence follows the
    TensorRT changelog: before 10.7 a local function wins over a registered plugin."""

    def __init__(self, trt: FakeTensorRT):
        self.trt = trt
        self.compiled: list[str] = []
        fake = self
        exception = _module("polygraphy.exception")

        class PolygraphyException(Exception):
            pass
        exception.PolygraphyException = PolygraphyException
        backend = _module("polygraphy.backend.trt")

        class NetworkFromOnnxPath:
            def __init__(self, path, strongly_typed=False):
                self.path, self.strongly_typed = path, strongly_typed

            def __call__(self):
                import onnx

                if self.strongly_typed:
                    getattr(trt.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
                model = onnx.load(self.path, load_external_data=False)
                select = any(n.domain == "feather" for n in model.graph.node)
                plugin = trt.module.get_plugin_registry().get_creator("SelectTokens", "1", "feather")
                inlined = bool(model.functions) and _version(trt.module.__version__) < (10, 7)
                layers = ["plugin_v3"] if select and plugin is not None and not inlined else ["matmul"]
                return FakeBuilder(), FakeNetwork(self.path, layers, self.strongly_typed), object()

        class Profile(dict):
            def add(self, name, min, opt, max):
                self[name] = {"min": list(min), "opt": list(opt), "max": list(max)}
                return self

        class CreateConfig:
            def __init__(self, profiles=None, tf32=None, fp16=None, bf16=None, memory_pool_limits=None,
                         load_timing_cache=None):
                self.kw = dict(profiles=profiles or [], tf32=bool(tf32), fp16=bool(fp16), bf16=bool(bf16),
                               pools=memory_pool_limits, load=load_timing_cache)

            def __call__(self, builder, network):
                config = FakeBuilderConfig(trt, self.kw["profiles"], self.kw["pools"])
                for name in ("fp16", "bf16", "tf32"):
                    if self.kw[name]:
                        flag = getattr(trt.module.BuilderFlag, name.upper(), None)
                        if flag is None:
                            raise PolygraphyException(f"{name} is not available on TensorRT version "
                                                      f"{trt.module.__version__}")
                        config.flags.add(flag)
                if self.kw["load"]:
                    try:
                        config.set_timing_cache(config.create_timing_cache(Path(self.kw["load"]).read_bytes()),
                                                ignore_mismatch=False)
                    except FileNotFoundError:
                        pass
                return config

        class EngineBytesFromNetwork:
            def __init__(self, network, config=None, save_timing_cache=None):
                self.network, self.config, self.save = network, config, save_timing_cache

            def __call__(self):
                builder, network, _ = self.network
                config = self.config(builder, network) if callable(self.config) else self.config
                engine = builder.build_serialized_network(network, config)
                fake.compiled.append(Path(network.path).stem)
                if self.save:
                    with open(self.save + ".lock", "wb+"):
                        previous = Path(self.save).read_bytes() if Path(self.save).exists() else None
                        cache = config.get_timing_cache()
                        if previous:
                            cache.combine(config.create_timing_cache(previous), True)
                        Path(self.save).write_bytes(cache.serialize())
                return engine

        backend.NetworkFromOnnxPath, backend.Profile = NetworkFromOnnxPath, Profile
        backend.CreateConfig, backend.EngineBytesFromNetwork = CreateConfig, EngineBytesFromNetwork
        self.modules = {"polygraphy": _module("polygraphy"), "polygraphy.backend": _module("polygraphy.backend"),
                        "polygraphy.backend.trt": backend, "polygraphy.exception": exception}

    def install(self, monkeypatch):
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)


class FakeLayer:
    def __init__(self, kind):
        self.type = kind


class FakeNetwork:
    def __init__(self, path, layers, strongly_typed):
        self.path, self.layers, self.strongly_typed = path, [FakeLayer(k) for k in layers], strongly_typed

    num_layers = property(lambda self: len(self.layers))

    def get_layer(self, i):
        return self.layers[i]


class FakeBuilder:
    def build_serialized_network(self, network, config):
        config.timing.entries.add(Path(network.path).stem)       # tactics timed for this network
        spec = {"onnx": str(Path(network.path).resolve()), "strongly_typed": network.strongly_typed,
                "flags": sorted(config.flags), "pools": config.pools,
                "profiles": [{"shapes": dict(p)} for p in config.profiles]}
        return json.dumps(spec).encode()


class FakeTimingCache:
    def __init__(self, owner: str, entries=()):
        self.owner, self.entries = owner, set(entries)

    def combine(self, other, ignore_mismatch):
        assert isinstance(other, FakeTimingCache) and isinstance(ignore_mismatch, bool)
        if other.owner != self.owner and not ignore_mismatch:
            return False
        self.entries |= other.entries
        return True

    def serialize(self):
        return json.dumps({"owner": self.owner, "entries": sorted(self.entries)}).encode()


class FakeBuilderConfig:
    """IBuilderConfig: flags, profiles, pools and the timing cache API (create/set/get)."""

    def __init__(self, trt: FakeTensorRT, profiles, pools):
        self.owner = f"TensorRT {trt.module.__version__} on Fake GPU"
        self.flags, self.profiles = set(), list(profiles)
        self.pools = {str(k): v for k, v in (pools or {}).items()}
        self.timing = FakeTimingCache(self.owner)

    def create_timing_cache(self, data):
        blob = json.loads(bytes(data)) if data else {"owner": self.owner, "entries": []}
        return FakeTimingCache(blob["owner"], blob["entries"])

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.owner != self.owner and not ignore_mismatch:
            return False
        self.timing = cache
        return True

    def get_timing_cache(self):
        return self.timing


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

def _install_fakes(monkeypatch, version="10.3.0"):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    trt = FakeTensorRT(cuda, version)
    trt.install(monkeypatch)
    polygraphy = FakePolygraphy(trt)
    polygraphy.install(monkeypatch)
    import feather_runtime.backends.tensorrt as backend_module
    monkeypatch.setattr(backend_module, "_loaded_plugins", {})
    monkeypatch.setattr(backend_module, "_logger", None)
    return types.SimpleNamespace(cuda=cuda, trt=trt, polygraphy=polygraphy, compiled=polygraphy.compiled)


@pytest.fixture
def fakes(monkeypatch):
    """TensorRT 10.3 (JetPack 6) generation."""
    return _install_fakes(monkeypatch)


@pytest.fixture(params=["10.3.0", "11.4.0"])
def fakes_any(request, monkeypatch):
    """Both API generations."""
    return _install_fakes(monkeypatch, request.param)


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
def test_pipeline_on_fake_tensorrt_matches_onnxruntime(fakes_any, artifacts, tmp_path, name):
    from feather_export.models.tiny import build_tiny_model

    fakes = fakes_any
    art = _copy(artifacts[name], tmp_path / name)
    trt_build.build_engines(art, progress=lambda m: None)
    pixels, ids = tiny_inputs(build_tiny_model("tiny"), seed=3)
    ref = Pipeline.load(art, backend="onnxruntime-cpu").generate_ids(pixels, ids, max_new_tokens=12)
    pipe = _trt_pipeline(art)
    res = pipe.generate_ids(pixels, ids, max_new_tokens=12)
    assert res.token_ids == ref.token_ids and res.kept == ref.kept and len(res.token_ids) == 12
    # plans are streamed, never read whole: IStreamReader on 10.3, IStreamReaderV2 (11 has no other)
    reader = "IStreamReaderV2" if fakes.trt.module.__version__.startswith("11") else "IStreamReader"
    assert fakes.trt.readers == [reader] * len(pipe.runners)
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
    plan.write_text(json.dumps(dict(reversed(list(spec.items())))))   # same size, other bytes
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


# ---- review findings (issue 19): TensorRT 11, timing cache, staging, plugin hash, pins, ties ----

def test_tensorrt11_builds_strongly_typed_only(artifacts, tmp_path, monkeypatch):
    """TensorRT 11 has no FP16/BF16 builder flags: the artifact's dtype builds (strongly typed), and
    another --precision is refused before anything is built; 10.3 builds fp16 weakly typed."""
    fakes = _install_fakes(monkeypatch, "11.4.0")
    art = _copy(artifacts["b64"], tmp_path / "a")
    with pytest.raises(FeatherError, match="TensorRT 11.4.0 builds strongly typed networks only.*"
                                           "--dtype fp16"):
        trt_build.build_engines(art, "fp16", progress=lambda m: None)
    assert fakes.compiled == [] and not (art / "engines" / "engines.json").exists()
    assert trt_build.main([str(art), "--precision", "bf16"]) == 2
    trt_build.build_engines(art, progress=lambda m: None)
    index = json.loads((art / "engines" / "engines.json").read_text())
    assert index["default_precision"] == "fp32" and all(e["strongly_typed"] for e in index["engines"])
    specs = [json.loads((art / e["file"]).read_text()) for e in index["engines"]]
    assert all(s["strongly_typed"] and s["flags"] == [] for s in specs)

    fakes10 = _install_fakes(monkeypatch, "10.3.0")
    art10 = _copy(artifacts["b64"], tmp_path / "b")
    trt_build.build_engines(art10, "fp16", progress=lambda m: None)
    assert len(fakes10.compiled) == 7
    index = json.loads((art10 / "engines" / "engines.json").read_text())
    specs = [json.loads((art10 / e["file"]).read_text()) for e in index["engines"]]
    assert all(not s["strongly_typed"] and s["flags"] == ["FP16"] for s in specs)


def test_timing_cache_in_a_new_directory(fakes_any, artifacts, tmp_path):
    """The docs' ~/.cache/feather/timing.cache on a fresh machine: the directories are created,
    every engine's tactics land in the cache, builds sharing it merge, and no .lock is left."""
    cache = tmp_path / "fresh" / "feather" / "timing.cache"
    a = _copy(artifacts["b144"], tmp_path / "a")
    msgs = []
    trt_build.build_engines(a, timing_cache=cache, progress=msgs.append)
    assert any(f"--timingCacheFile={cache}" in m for m in msgs)
    entries = json.loads(cache.read_bytes())["entries"]
    assert entries == sorted(["vision", "embed", "decoder_0_1", "select_1", "decoder_1_2", "select_2",
                              "decoder_2_4"])
    b = _copy(artifacts["vlm"], tmp_path / "b")
    trt_build.build_engines(b, timing_cache=cache, progress=msgs.append)
    assert set(json.loads(cache.read_bytes())["entries"]) >= set(entries) | {"select_0"}
    assert sorted(p.name for p in cache.parent.iterdir()) == ["timing.cache"]      # no .lock, no tmp
    assert not any(p.name.endswith(".lock") for p in (a / "engines").iterdir())
    # a cache from another TensorRT/GPU is not used (said so) and is replaced
    cache.write_bytes(json.dumps({"owner": "TensorRT 9.0 on Other GPU", "entries": ["x"]}).encode())
    msgs.clear()
    c = _copy(artifacts["b64"], tmp_path / "c")
    trt_build.build_engines(c, timing_cache=cache, progress=msgs.append)
    assert any("another TensorRT version or GPU" in m for m in msgs)
    assert "x" not in json.loads(cache.read_bytes())["entries"]


def test_timing_cache_that_cannot_be_written_is_refused_first(fakes, artifacts, tmp_path):
    art = _copy(artifacts["b64"], tmp_path / "a")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(FeatherError, match="cannot create the timing cache directory"):
        trt_build.build_engines(art, timing_cache=blocker / "timing.cache", progress=lambda m: None)
    with pytest.raises(FeatherError, match="is a directory"):
        trt_build.build_engines(art, timing_cache=tmp_path, progress=lambda m: None)
    assert fakes.compiled == [] and not (art / "engines").exists()
    assert trt_build.main([str(art), "--timing-cache", str(blocker / "x")]) == 2


def test_runners_keep_no_input_buffers(fakes, artifacts, tmp_path):
    """A runner allocates its outputs only: inputs (the static KV caches among them) are the
    caller's buffers. ``run`` stages host inputs lazily, at their size."""
    from feather_runtime.backends.tensorrt import TensorRTBackend

    art = _copy(artifacts["b144"], tmp_path / "s")
    trt_build.build_engines(art, progress=lambda m: None)
    manifest = load_manifest(art)
    backend = TensorRTBackend()
    backend.load(art, manifest.segment("embed"))             # the shared scratch exists now
    before = sum(len(b) for b in fakes.cuda.memory.values())
    runner = backend.load(art, manifest.segment("decoder_0_1"))
    allocated = sum(len(b) for b in fakes.cuda.memory.values()) - before
    assert set(runner.buffers) == set(runner.outputs)
    assert allocated == sum(max(runner.capacity[n], 256) for n in runner.outputs)
    assert any(n.startswith("past_key_values") for n in runner.inputs)

    ref = Pipeline.load(art, backend="onnxruntime-cpu").runners["decoder_0_1"]
    seg = manifest.segment("decoder_0_1")
    rng = np.random.default_rng(0)

    def feeds(seq):
        out = {}
        for i in seg.inputs:
            shape = [{"seq": seq, "capacity": 0}.get(d, d) for d in i["shape"]]
            if i["name"] == "position_ids":
                out[i["name"]] = np.arange(seq, dtype=np.int64)[None]
            elif i["name"] == "past_length":
                out[i["name"]] = np.zeros(shape, np.int64)
            else:
                out[i["name"]] = rng.standard_normal(shape).astype(np.dtype(i["dtype"]))
        return out

    largest = {}
    for seq in (600, 580, 640):                 # grows only when a call needs more
        f = feeds(seq)
        got, want = runner.run(f), ref.run(f)
        for n in want:
            np.testing.assert_allclose(got[n], want[n], rtol=0, atol=1e-5)
        largest = {n: max(largest.get(n, 0), a.nbytes, 256) for n, a in f.items()}
        assert {n: size for n, (_, size) in runner._staging.items()} == largest
    assert largest["inputs_embeds"] < runner_capacity_bound(runner, seg)
    backend.close()
    assert fakes.cuda.memory == {}


def runner_capacity_bound(runner, seg) -> int:
    """What the old eager staging held for ``inputs_embeds``: its largest profile shape."""
    k = runner.ranges[0]["inputs_embeds"][1]
    return int(np.prod(k)) * runner.dtypes["inputs_embeds"].itemsize


def test_plugin_library_must_match_the_build(fakes, artifacts, tmp_path, monkeypatch):
    from feather_runtime.backends.tensorrt import PLUGIN_ENV, TensorRTBackend

    art = _copy(artifacts["plugin_only"], tmp_path / "p")
    lib = tmp_path / "libfeather_plugin.so"
    lib.write_bytes(b"\x7fELF fake v1")
    trt_build.build_engines(art, plugin_library=lib, progress=lambda m: None)
    manifest = load_manifest(art)
    TensorRTBackend().load(art, manifest.segment("select_1"))
    other = tmp_path / "other.so"
    other.write_bytes(b"\x7fELF fake v2")
    monkeypatch.setenv(PLUGIN_ENV, str(other))
    with pytest.raises(FeatherError, match="is not the one the engines were built with"):
        TensorRTBackend().load(art, manifest.segment("select_1"))
    monkeypatch.delenv(PLUGIN_ENV)
    lib.write_bytes(b"\x7fELF fake v3")                     # rebuilt in place since the build
    with pytest.raises(FeatherError, match="is not the one the engines were built with"):
        TensorRTBackend().load(art, manifest.segment("select_1"))


def test_cuda_python_for_a_newer_driver_is_refused(fakes, monkeypatch):
    from feather_runtime.backends.tensorrt import TensorRTBackend

    monkeypatch.setattr(sys.modules["cuda.bindings"], "__version__", "13.0.1")
    with pytest.raises(FeatherError, match=r"cuda-python 13.0.1 needs a CUDA 13 driver; this driver "
                                           r"supports CUDA 12.6.*cuda-python>=12.6,<13"):
        TensorRTBackend()
    fakes.cuda.driver_version = 13000
    TensorRTBackend().close()
    fakes.cuda.driver_version = 0                            # no driver: the first call says so
    TensorRTBackend().close()


def test_trt_extras_pin_cuda_python_to_the_driver_generation():
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    assert "cuda-python>=12.6,<13" in extras["trt"] and "tensorrt-cu12>=10.3,<12" in extras["trt"]
    assert "cuda-python>=13,<14" in extras["trt-cu13"]
    assert any(r.startswith("tensorrt-cu13>=") and r.endswith(",<12") for r in extras["trt-cu13"])


def test_tie_order_note_where_the_function_body_runs(fakes_any, artifacts, tmp_path):
    """SelectTokens as the function body runs TensorRT's TopK (tie order undocumented): the build
    says so once; with the plugin in the engine it does not."""
    lib = tmp_path / "libfeather_plugin.so"
    lib.write_bytes(b"\x7fELF fake")
    msgs = []
    a = _copy(artifacts["b144"], tmp_path / "a")
    trt_build.build_engines(a, progress=msgs.append)
    assert sum("does not document the order among equal scores" in m for m in msgs) == 1
    msgs.clear()
    trt_build.build_engines(a, progress=msgs.append)                # all up to date: said again
    assert sum("equal scores" in m for m in msgs) == 1 and sum("up to date" in m for m in msgs) == 7
    msgs.clear()
    trt_build.build_engines(_copy(artifacts["plugin_only"], tmp_path / "b"), plugin_library=lib,
                            progress=msgs.append)
    assert not any("equal scores" in m for m in msgs)
    msgs.clear()
    trt_build.build_engines(_copy(artifacts["b144"], tmp_path / "c"), plugin_library=lib,
                            progress=msgs.append)
    old = fakes_any.trt.module.__version__.startswith("10.3")    # < 10.7: the body wins
    assert any("equal scores" in m for m in msgs) == old


@pytest.mark.parametrize("version,reader", [("10.3.0", "IStreamReader"), ("10.7.0", "IStreamReaderV2"),
                                            ("11.4.0", "IStreamReaderV2")])
def test_plan_reader_per_tensorrt_generation(version, reader, tmp_path, monkeypatch):
    """10.3-10.6: IStreamReader; 10.7+ has both and IStreamReaderV2 is used; 11 has only V2."""
    from feather_runtime.backends.tensorrt import _stream_reader_class

    trt = FakeTensorRT(FakeCuda(), version).module
    cls = _stream_reader_class(trt)
    assert getattr(trt, reader) in cls.__mro__
    plan = tmp_path / "plan"
    plan.write_bytes(b"0123456789" * 1000)
    with open(plan, "rb") as f:
        r = cls(f)
        if reader == "IStreamReaderV2":
            assert r.seek(5, trt.SeekPosition.SET) and r.read(3, 0x5EED) == b"567"
            assert r.seek(-2, trt.SeekPosition.END) and r.read(10, 0) == b"89"
            assert r.seek(0, trt.SeekPosition.SET) and len(r.read(1 << 20, 0)) == 10000
        else:
            assert len(r.read(1 << 20)) == 10000
