"""TensorRT backend: runs the engines that ``feather_export.trt_build`` recorded in
``<artifact>/engines/engines.json``, behind the same ``load(root, segment) -> runner.run(feeds)``
interface as ONNX Runtime.

Per engine: one execution context per optimization profile (prefill, decode), chosen per call
from the input shapes; device buffers allocated once at the largest shapes any profile allows
and bound once with ``set_tensor_address``; each call sets the input shapes, copies the inputs to
the device, ``execute_async_v3`` on the backend's stream, copies the outputs back and
synchronizes. Contexts use ``ExecutionContextAllocationStrategy.USER_MANAGED`` and share one
activation ("scratch") buffer sized for the largest engine: every runner of a backend runs on one
stream, one call at a time (a lock), so the contexts never run concurrently, which is what
``IExecutionContext::setDeviceMemoryV2`` requires of shared memory.

Scope, stated plainly: inputs and outputs are host numpy arrays, as the Pipeline's protocol is
today, so every segment call makes host round trips (including the KV cache prefix in decode).
Device-resident chaining (outputs feeding the next segment on the device, KV caches in device
memory) and CUDA graphs for the decode step need a device-side protocol between Pipeline and
backend; they are the next step, not done here.

CUDA calls go through cuda-python: ``cuda.bindings.runtime`` (cuda-python >= 12.6.1; the only
layout in 13.x), falling back to ``cuda.cudart`` (older 12.x). Nothing here imports tensorrt or
cuda-python at module import time.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import FeatherError

ENGINES_DIR = "engines"
INDEX_NAME = "engines.json"
INDEX_FORMAT = "feather-engines"
INDEX_VERSION = 1
PLUGIN_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE = "SelectTokens", "1", "feather"
PLUGIN_ENV = "FEATHER_PLUGIN_LIBRARY"
MIN_ALLOCATION = 256                      # bytes; TensorRT wants non-null, 256-byte aligned buffers

_loaded_plugins: dict[str, object] = {}   # realpath -> registry handle (load once per process)
_logger = None


# ---- imports and small CUDA helpers -----------------------------------------------------------

def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise FeatherError("the TensorRT backend needs TensorRT >= 10.3 with its Python bindings "
                           "(pip install 'feather-export[trt]', or JetPack on Jetson); not "
                           f"importable here ({exc})") from None
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart      # cuda-python >= 12.6.1
    except ImportError:
        try:
            from cuda import cudart                      # cuda-python < 12.6.1 (removed in 13.0)
        except ImportError:
            raise FeatherError("the TensorRT backend needs cuda-python (pip install "
                               "'cuda-python>=12.6,<13' on CUDA 12 / JetPack 6)") from None
    return cudart


def _check(cudart, result, what: str):
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise FeatherError(f"CUDA error in {what}: {err}")
    return rest[0] if len(rest) == 1 else rest


def _handle(obj) -> int:
    """The integer handle TensorRT's Python API takes for a CUDA stream."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle   # cuda-bindings >= 13.0
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def device_identity(device: int | None = None) -> dict:
    """Name and compute capability of the current (or given) CUDA device."""
    cudart = import_cudart()
    if device is None:
        device = _check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    props = _check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {"name": str(name), "compute_capability": f"{props.major}.{props.minor}"}


def load_plugin_library(trt, path) -> None:
    """Register ``libfeather_plugin.so`` with TensorRT's plugin registry (once per process) and
    check that ``feather::SelectTokens`` version 1 is now known."""
    path = Path(path)
    if not path.is_file():
        raise FeatherError(f"plugin library {path} does not exist; build it with CMake "
                           "(engines/plugin/README.md)")
    real = os.path.realpath(path)
    registry = trt.get_plugin_registry()
    if real not in _loaded_plugins:
        handle = registry.load_library(real)     # None when a plugin of it is already registered
        _loaded_plugins[real] = handle
    if registry.get_creator(PLUGIN_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise FeatherError(f"{path} did not register {PLUGIN_NAMESPACE}::{PLUGIN_TYPE} version "
                           f"{PLUGIN_VERSION}; is it libfeather_plugin.so built for this TensorRT?")


def _trt_logger(trt):
    global _logger
    if _logger is None:
        _logger = trt.Logger(trt.Logger.WARNING)
    return _logger


def _numpy_dtype(trt, dtype):
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        if dtype == getattr(trt, "bfloat16", object()):
            try:
                import ml_dtypes
            except ImportError:
                raise FeatherError("this engine has bfloat16 inputs or outputs; host bf16 arrays "
                                   "need ml_dtypes (pip install ml_dtypes)") from None
            return np.dtype(ml_dtypes.bfloat16)
        raise FeatherError(f"TensorRT data type {dtype} has no numpy equivalent") from None


def _shape(dims) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


def _volume(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---- backend ---------------------------------------------------------------------------------

class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, precision: str | None = None, plugin_library=None, device: int = 0,
                 verify: bool = True):
        """``precision``: which engines of the artifact to run (default: the index's
        ``default_precision``). ``plugin_library``: default ``$FEATHER_PLUGIN_LIBRARY``, else the
        path recorded at build time. ``verify``: check each plan's sha256 before loading it."""
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.precision = precision
        self.plugin_library = plugin_library or os.environ.get(PLUGIN_ENV)
        self.verify = verify
        self._lock = threading.Lock()
        self._allocations: list[int] = []
        self._contexts: list = []
        self._scratch, self._scratch_size = 0, 0
        self._indexes: dict[Path, dict] = {}
        _check(self.cudart, self.cudart.cudaSetDevice(device), "cudaSetDevice")
        self.device = device_identity(device)
        self.stream = _check(self.cudart, self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = _handle(self.stream)
        self.runtime = self.trt.Runtime(_trt_logger(self.trt))

    # -- loading --
    def load(self, root, segment) -> "TensorRTRunner":
        root = Path(root)
        index = self._index(root)
        precision = self.precision or index.get("default_precision")
        if precision is None:
            raise FeatherError(f"{root / ENGINES_DIR}: the engine build did not finish; build the "
                               "engines again")
        entry = next((e for e in index["engines"]
                      if e["segment"] == segment.name and e["precision"] == precision), None)
        if entry is None:
            raise FeatherError(f"{root}: no {precision} TensorRT engine for segment {segment.name}; "
                               "build the engines (feather-export build --backend tensorrt)")
        self._check_entry(root, segment, entry)
        if entry.get("uses_plugin"):
            self._ensure_plugin(entry)
        engine = self._deserialize(root / entry["file"])
        runner = TensorRTRunner(self, segment.name, engine, entry)
        expected = ({i["name"] for i in segment.inputs}, {o["name"] for o in segment.outputs})
        if (set(runner.inputs), set(runner.outputs)) != expected:
            raise FeatherError(f"{root}: the engine of {segment.name} has inputs {runner.inputs} and "
                               f"outputs {runner.outputs}; the manifest expects {sorted(expected[0])} "
                               f"and {sorted(expected[1])}. Build the engines again")
        return runner

    def _index(self, root: Path) -> dict:
        if root not in self._indexes:
            path = root / ENGINES_DIR / INDEX_NAME
            if not path.is_file():
                raise FeatherError(f"{root} has no TensorRT engines ({ENGINES_DIR}/{INDEX_NAME}); "
                                   "build them on this machine: feather-export build --backend "
                                   "tensorrt, or python -m feather_export.trt_build ARTIFACT")
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise FeatherError(f"{path} is not valid JSON ({exc}); build the engines again") from None
            if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT \
                    or data.get("format_version") != INDEX_VERSION:
                raise FeatherError(f"{path} is not a feather-export engine index of format "
                                   f"{INDEX_VERSION}; build the engines again")
            self._indexes[root] = data
        return self._indexes[root]

    def _check_entry(self, root: Path, segment, entry: dict) -> None:
        from ..manifest import sha256_file

        if entry["onnx_sha256"] != segment.sha256:
            raise FeatherError(f"{root}: the engine of {segment.name} was built from another version "
                               "of its ONNX file (stale engines); build the engines again")
        if entry["tensorrt"] != self.trt.__version__:
            raise FeatherError(f"{root}: engines were built with TensorRT {entry['tensorrt']}; this is "
                               f"TensorRT {self.trt.__version__}. Engines are not portable across "
                               "TensorRT versions: build them again here")
        if entry["device"] != self.device:
            built = entry["device"]
            raise FeatherError(f"{root}: engines were built on {built['name']} (sm "
                               f"{built['compute_capability']}); this is {self.device['name']} (sm "
                               f"{self.device['compute_capability']}). Build engines on the device "
                               "that runs them")
        file = root / entry["file"]
        if not file.is_file():
            raise FeatherError(f"{root}: {entry['file']} is missing; build the engines again")
        if file.stat().st_size != entry["size"] or (self.verify and sha256_file(file) != entry["sha256"]):
            raise FeatherError(f"{root}: {entry['file']} does not match its record in "
                               f"{ENGINES_DIR}/{INDEX_NAME} (tampered or corrupted); build it again")

    def _ensure_plugin(self, entry: dict) -> None:
        recorded = (entry.get("plugin") or {}).get("path")
        path = self.plugin_library or recorded
        if path is None:
            raise FeatherError(f"the engine of {entry['segment']} contains the SelectTokens plugin; "
                               f"pass plugin_library= or set {PLUGIN_ENV}")
        load_plugin_library(self.trt, path)

    def _deserialize(self, path: Path):
        trt = self.trt
        reader_base = getattr(trt, "IStreamReader", None)
        if reader_base is not None:
            # stream the plan instead of holding a second copy in host memory (Jetson: shared DRAM)
            class _Reader(reader_base):
                def __init__(self, f):
                    reader_base.__init__(self)
                    self.f = f

                def read(self, size: int) -> bytes:
                    return self.f.read(size)

            with open(path, "rb") as f:
                engine = self.runtime.deserialize_cuda_engine(_Reader(f))
        else:
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise FeatherError(f"TensorRT could not deserialize {path} (see the TensorRT log above); "
                               "build the engines again on this machine")
        return engine

    # -- device memory --
    def malloc(self, nbytes: int) -> int:
        ptr = int(_check(self.cudart, self.cudart.cudaMalloc(max(int(nbytes), MIN_ALLOCATION)),
                         "cudaMalloc"))
        self._allocations.append(ptr)
        return ptr

    def _free(self, ptr: int) -> None:
        _check(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")
        self._allocations.remove(ptr)

    def attach_context(self, context, size: int) -> None:
        """Give a USER_MANAGED context the shared scratch buffer, growing it when needed."""
        size = max(int(size), MIN_ALLOCATION)
        if size > self._scratch_size:
            new = self.malloc(size)
            for c in self._contexts:
                c.set_device_memory(new, size)
            if self._scratch:
                self._free(self._scratch)
            self._scratch, self._scratch_size = new, size
        context.set_device_memory(self._scratch, self._scratch_size)
        self._contexts.append(context)

    def copy(self, dst: int, src: int, nbytes: int, kind) -> None:
        if nbytes:
            _check(self.cudart, self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream),
                   "cudaMemcpyAsync")

    def synchronize(self) -> None:
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Free device memory and the stream (contexts and engines must not be used afterwards)."""
        if getattr(self, "cudart", None) is None:
            return
        self._contexts.clear()
        for ptr in list(self._allocations):
            self._free(ptr)
        self._scratch, self._scratch_size = 0, 0
        if getattr(self, "stream", None) is not None:
            _check(self.cudart, self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None


class TensorRTRunner:
    def __init__(self, backend: TensorRTBackend, name: str, engine, entry: dict):
        trt = backend.trt
        self.name = name
        self.backend = backend
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        for n in names:
            if engine.get_tensor_location(n) != trt.TensorLocation.DEVICE:
                raise FeatherError(f"{name}: tensor {n} lives on the host (a shape tensor); the "
                                   "TensorRT backend binds device tensors only")
        self.dtypes = {n: _numpy_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.static = {n: _shape(engine.get_tensor_shape(n)) for n in self.inputs}
        dynamic = [n for n in self.inputs if any(d < 0 for d in self.static[n])]
        count = engine.num_optimization_profiles
        # per profile: input name -> (min, max)
        self.ranges = [{n: tuple(_shape(s) for s in engine.get_tensor_profile_shape(n, k))[0::2]
                        for n in dynamic} for k in range(count)]
        roles = [p.get("role") for p in entry.get("profiles", [])]
        self.roles = roles if len(roles) == count else [f"profile{k}" for k in range(count)]
        self.contexts = []
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        for k in range(count):
            context = engine.create_execution_context(strategy)
            if context is None:
                raise FeatherError(f"{name}: TensorRT could not create an execution context")
            context.set_optimization_profile_async(k, backend.stream_handle)
            backend.attach_context(context, engine.device_memory_size_v2)
            self.contexts.append(context)
        # buffer sizes: the largest shape of every tensor over all profiles
        capacity = {n: 0 for n in names}
        for k, context in enumerate(self.contexts):
            for n in self.inputs:
                shape = self.ranges[k][n][1] if n in self.ranges[k] else self.static[n]
                if not context.set_input_shape(n, shape):
                    raise FeatherError(f"{name}: TensorRT refused shape {shape} for {n}")
            for n in names:
                shape = _shape(context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise FeatherError(f"{name}: output {n} has a data-dependent shape {shape}; the "
                                       "TensorRT backend does not support IOutputAllocator outputs")
                capacity[n] = max(capacity[n], _volume(shape) * self.dtypes[n].itemsize)
        self.capacity = capacity
        self.buffers = {n: backend.malloc(capacity[n]) for n in names}
        for context in self.contexts:
            for n, ptr in self.buffers.items():
                if not context.set_tensor_address(n, ptr):
                    raise FeatherError(f"{name}: TensorRT refused the address of {n}")
        backend.synchronize()

    def profile_for(self, shapes: dict) -> int:
        for k, ranges in enumerate(self.ranges):
            if all(len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi))
                   for n, (lo, hi) in ranges.items()):
                return k
        allowed = "; ".join(f"{self.roles[k]}: " + ", ".join(f"{n} {lo}..{hi}" for n, (lo, hi) in r.items())
                            for k, r in enumerate(self.ranges))
        got = ", ".join(f"{n} {shapes[n]}" for n in self.ranges[0]) if self.ranges else ""
        raise FeatherError(f"{self.name}: input shapes {got} fit none of the engine's optimization "
                           f"profiles ({allowed}); rebuild the engines for these limits "
                           "(--max-text-tokens/--max-new-tokens at export)")

    def run(self, feeds: dict) -> dict:
        backend = self.backend
        unknown = set(feeds) - set(self.inputs)
        if unknown:
            raise FeatherError(f"{self.name}: unknown inputs {sorted(unknown)}; expected {self.inputs}")
        arrays = {}
        for n in self.inputs:
            if n not in feeds:
                raise FeatherError(f"{self.name}: missing input {n}")
            a = np.asarray(feeds[n])
            if a.dtype != self.dtypes[n]:
                raise FeatherError(f"{self.name}: input {n} has dtype {a.dtype}; the engine takes "
                                   f"{self.dtypes[n]}")
            if n not in self.ranges[0] and a.shape != self.static[n]:
                raise FeatherError(f"{self.name}: input {n} must have shape {self.static[n]}; got {a.shape}")
            arrays[n] = a if a.flags.c_contiguous else a.copy(order="C")   # keeps 0-d scalars 0-d
        k = self.profile_for({n: a.shape for n, a in arrays.items()})
        context = self.contexts[k]
        h2d = backend.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = backend.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with backend._lock:
            for n, a in arrays.items():
                if not context.set_input_shape(n, a.shape):
                    raise FeatherError(f"{self.name}: TensorRT refused shape {a.shape} for {n}")
                backend.copy(self.buffers[n], a.ctypes.data, a.nbytes, h2d)
            if not context.execute_async_v3(backend.stream_handle):
                raise FeatherError(f"{self.name}: TensorRT execution failed (see the TensorRT log)")
            outputs = {}
            for n in self.outputs:
                shape = _shape(context.get_tensor_shape(n))
                host = np.empty(shape, self.dtypes[n])
                if host.nbytes > self.capacity[n]:
                    raise FeatherError(f"{self.name}: output {n} {shape} exceeds its buffer")
                backend.copy(host.ctypes.data, self.buffers[n], host.nbytes, d2h)
                outputs[n] = host
            backend.synchronize()
        return outputs
