"""TensorRT backend: runs the engines that ``feather_export.tensorrt.build`` recorded in
``<artifact>/engines/engines.json``, behind the same ``load(root, segment)`` ->
``runner.run_device(inputs)`` interface as ONNX Runtime.

Per engine: one execution context per optimization profile (prefill, decode), chosen per call
from the input shapes. Output buffers are allocated once at the largest shape any profile allows
and bound once (``set_tensor_address``). Inputs have no buffers of their own: they are bound by
address (``set_tensor_address`` only when the address changed), so a segment reads the previous
segment's output, the Pipeline's workspace or a KV cache buffer in place: no host round trips
between segments. Each call sets the input shapes that changed and runs ``execute_async_v3`` on
the backend's stream without synchronizing; the host waits only when it downloads (logits, kept
indices).

CUDA graphs: a decode-profile call whose input addresses and shapes equal those of the previous
one is replayed from a CUDA graph captured after the first such call (TensorRT's guidance: run
``execute_async_v3`` once after shape changes, then capture a second enqueue with
``cudaStreamBeginCapture``/``cudaStreamEndCapture``; replay with ``cudaGraphLaunch``). Decode
inputs have fixed shapes and addresses (the Pipeline's static KV caches and workspace), so every
decode step after the first is one graph launch per segment. A capture that fails (an engine
TensorRT cannot capture) turns graphs off for that context, and it runs with
``execute_async_v3``. Graphs are dropped when the shared activation memory is reallocated.

Contexts use ``ExecutionContextAllocationStrategy.USER_MANAGED`` and share one activation
("scratch") buffer sized for the largest engine: every runner of a backend runs on one stream,
one call at a time (a lock), so the contexts never run concurrently, which is what
``IExecutionContext::setDeviceMemoryV2`` requires of shared memory.

``runner.run`` (host numpy in and out: validation, sweeps) stages its inputs in buffers allocated
on its first call, at the size of the arrays given (grown when a later call needs more), so a
runner used only through ``run_device`` (the Pipeline) holds no second copy of any input, the
static KV caches included.

Plugin engines: the library loaded must be the one the engines were built with (its sha256 is
recorded in ``engines.json``); another build of it is refused.

TensorRT 10.3+ and 11: plans are streamed through ``IStreamReaderV2`` (10.7+, the only reader in
11) or ``IStreamReader`` (10.3-10.x).

CUDA calls go through cuda-python (``backends/cuda.py``, ``device.CudaMemory``). Nothing here
imports tensorrt or cuda-python at module import time.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from ..device import ALIGNMENT, CudaMemory, Tensor
from ..errors import FeatherError
from .cuda import check, device_identity, import_cudart, stream_handle

__all__ = ["TensorRTBackend", "TensorRTRunner", "device_identity", "import_cudart",
           "import_tensorrt", "load_plugin_library"]

ENGINES_DIR = "engines"
INDEX_NAME = "engines.json"
INDEX_FORMAT = "feather-engines"
INDEX_VERSION = 1
PLUGIN_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE = "SelectTokens", "1", "feather"
PLUGIN_ENV = "FEATHER_PLUGIN_LIBRARY"

_loaded_plugins: dict[str, object] = {}   # realpath -> registry handle (load once per process)
_logger = None


# ---- imports and small CUDA helpers -----------------------------------------------------------

def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise FeatherError("the TensorRT backend needs TensorRT >= 10.3 with its Python bindings "
                           "(pip install 'feather-export[trt]', '[trt-cu13]' with a CUDA 13 driver, "
                           "or JetPack on Jetson); not "
                           f"importable here ({exc})") from None
    return trt


def load_plugin_library(trt, path, sha256: str | None = None) -> None:
    """Register ``libfeather_plugin.so`` with TensorRT's plugin registry (once per process) and
    check that ``feather::SelectTokens`` version 1 is now known. ``sha256``: the library's hash
    recorded at build time; a different file is refused before it is loaded."""
    path = Path(path)
    if not path.is_file():
        raise FeatherError(f"plugin library {path} does not exist; build it with CMake "
                           "(engines/plugin/README.md)")
    real = os.path.realpath(path)
    if sha256 is not None:
        from ..manifest import sha256_file

        found = sha256_file(real)
        if found != sha256:
            raise FeatherError(f"plugin library {path} (sha256 {found[:12]}...) is not the one the "
                               f"engines were built with (sha256 {sha256[:12]}...); rebuild the "
                               f"engines with this library, or pass the library they were built "
                               f"with (plugin_library= or ${PLUGIN_ENV})")
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
                 verify: bool = True, cuda_graphs: bool = True):
        """``precision``: which engines of the artifact to run (default: the index's
        ``default_precision``). ``plugin_library``: default ``$FEATHER_PLUGIN_LIBRARY``, else the
        path recorded at build time. ``verify``: check each plan's sha256 before loading it.
        ``cuda_graphs``: replay decode steps from CUDA graphs (module docstring)."""
        self.trt = import_tensorrt()
        self.memory = CudaMemory(device)            # sets the device, owns the stream
        self.cudart = self.memory.cudart
        self.precision = precision
        self.plugin_library = plugin_library or os.environ.get(PLUGIN_ENV)
        self.verify = verify
        self.cuda_graphs = cuda_graphs
        self._lock = threading.Lock()
        self._contexts: list = []
        self._runners: list = []
        self._scratch, self._scratch_size = 0, 0
        self.scratch_generation = 0                 # bumps when the shared scratch moves
        self._indexes: dict[Path, dict] = {}
        self._plugins_checked: set[tuple[str, str]] = set()
        self.device = device_identity(device)
        self.stream = self.memory.stream
        self.stream_handle = stream_handle(self.stream)
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
        self._runners.append(runner)
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
                                   "tensorrt, or python -m feather_export.tensorrt.build ARTIFACT")
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
        recorded = entry.get("plugin") or {}
        path = self.plugin_library or recorded.get("path")
        if path is None:
            raise FeatherError(f"the engine of {entry['segment']} contains the SelectTokens plugin; "
                               f"pass plugin_library= or set {PLUGIN_ENV}")
        if recorded.get("sha256") is None:
            raise FeatherError(f"{entry['segment']}: engines.json records no plugin library hash for "
                               "an engine with the SelectTokens plugin; build the engines again")
        key = (os.path.realpath(path), recorded["sha256"])
        if key not in self._plugins_checked:     # hash a library once per backend
            load_plugin_library(self.trt, path, sha256=recorded["sha256"])
            self._plugins_checked.add(key)

    def _deserialize(self, path: Path):
        # stream the plan instead of holding a second copy in host memory (Jetson: shared DRAM)
        reader = _stream_reader_class(self.trt)
        if reader is not None:
            with open(path, "rb") as f:
                engine = self.runtime.deserialize_cuda_engine(reader(f))
        else:
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise FeatherError(f"TensorRT could not deserialize {path} (see the TensorRT log above); "
                               "build the engines again on this machine")
        return engine

    # -- device memory --
    def malloc(self, nbytes: int) -> int:
        return self.memory.malloc(nbytes)

    def attach_context(self, context, size: int) -> None:
        """Give a USER_MANAGED context the shared scratch buffer, growing it when needed."""
        size = max(int(size), ALIGNMENT)
        if size > self._scratch_size:
            new = self.malloc(size)
            for c in self._contexts:
                c.set_device_memory(new, size)
            if self._scratch:
                self.memory.free(self._scratch)
            self._scratch, self._scratch_size = new, size
            self.scratch_generation += 1           # captured graphs hold the old address
        context.set_device_memory(self._scratch, self._scratch_size)
        self._contexts.append(context)

    def synchronize(self) -> None:
        self.memory.synchronize()

    def close(self) -> None:
        """Free graphs, device memory and the stream (contexts and engines must not be used
        afterwards)."""
        if getattr(self, "memory", None) is None:
            return
        for runner in self._runners:
            runner.release_graphs()
        self._runners.clear()
        self._contexts.clear()
        self.memory.close()
        self._scratch, self._scratch_size = 0, 0
        self.memory = None


def _stream_reader_class(trt):
    """A file reader for ``deserialize_cuda_engine``: ``IStreamReaderV2`` (TensorRT 10.7+; the only
    one in 11: ``read(num_bytes, stream)`` and ``seek(offset, SeekPosition)``), else
    ``IStreamReader`` (``read(size)``), else None (read the plan into memory)."""
    v2 = getattr(trt, "IStreamReaderV2", None)
    if v2 is not None:
        whence = {getattr(trt.SeekPosition, name): i for i, name in enumerate(("SET", "CUR", "END"))}

        class ReaderV2(v2):
            def __init__(self, f):
                v2.__init__(self)
                self.f = f

            def read(self, num_bytes: int, stream: int) -> bytes:
                return self.f.read(num_bytes)

            def seek(self, offset: int, where) -> bool:
                try:
                    self.f.seek(offset, whence[where])
                except (OSError, ValueError, KeyError):
                    return False
                return True
        return ReaderV2
    v1 = getattr(trt, "IStreamReader", None)
    if v1 is not None:
        class Reader(v1):
            def __init__(self, f):
                v1.__init__(self)
                self.f = f

            def read(self, size: int) -> bytes:
                return self.f.read(size)
        return Reader
    return None


class CudaGraph:
    """One context's enqueue captured as a CUDA graph, valid for one binding state (``key``)."""

    def __init__(self, cudart, key, graph, instance):
        self.cudart, self.key, self.graph, self.instance = cudart, key, graph, instance

    @classmethod
    def capture(cls, backend, context, key) -> "CudaGraph":
        cudart = backend.cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart, cudart.cudaStreamBeginCapture(backend.stream, mode), "cudaStreamBeginCapture")
        ok = context.execute_async_v3(backend.stream_handle)
        graph = check(cudart, cudart.cudaStreamEndCapture(backend.stream), "cudaStreamEndCapture")
        if not ok:
            check(cudart, cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
            raise FeatherError("execute_async_v3 failed under stream capture")
        try:
            instance = check(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except FeatherError:
            check(cudart, cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
            raise
        return cls(cudart, key, graph, instance)

    def launch(self, stream) -> None:
        check(self.cudart, self.cudart.cudaGraphLaunch(self.instance, stream), "cudaGraphLaunch")

    def destroy(self) -> None:
        check(self.cudart, self.cudart.cudaGraphExecDestroy(self.instance), "cudaGraphExecDestroy")
        check(self.cudart, self.cudart.cudaGraphDestroy(self.graph), "cudaGraphDestroy")


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
        # buffer sizes: the largest shape of every tensor over all profiles. Output buffers are
        # allocated and bound once; inputs are bound by address per call (``run`` stages its host
        # inputs in buffers allocated on demand: ``_staging``)
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
        self.buffers = {n: backend.malloc(capacity[n]) for n in self.outputs}
        self._staging: dict[str, tuple[int, int]] = {}   # input name -> (address, bytes), by run()
        for context in self.contexts:
            for n in self.outputs:
                if not context.set_tensor_address(n, self.buffers[n]):
                    raise FeatherError(f"{name}: TensorRT refused the address of {n}")
        # what each context has bound now: input name -> (address, shape); nothing yet
        self._bound = [{n: (None, None) for n in self.inputs} for _ in self.contexts]
        self._output_shapes: list[tuple | None] = [None] * count   # (input shapes, output shapes)
        self._graphs: dict[int, CudaGraph] = {}
        self._graphs_usable = [backend.cuda_graphs and self.roles[k] == "decode"
                               for k in range(count)]
        self.graph_error: str | None = None
        self.graph_launches = 0
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

    def _check_names(self, given) -> None:
        unknown = set(given) - set(self.inputs)
        if unknown:
            raise FeatherError(f"{self.name}: unknown inputs {sorted(unknown)}; expected {self.inputs}")
        for n in self.inputs:
            if n not in given:
                raise FeatherError(f"{self.name}: missing input {n}")

    def _check_input(self, n: str, dtype, shape) -> None:
        if dtype != self.dtypes[n]:
            raise FeatherError(f"{self.name}: input {n} has dtype {dtype}; the engine takes "
                               f"{self.dtypes[n]}")
        if n not in self.ranges[0] and tuple(shape) != self.static[n]:
            raise FeatherError(f"{self.name}: input {n} must have shape {self.static[n]}; got "
                               f"{tuple(shape)}")

    def run_device(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run on device tensors (bound in place). Asynchronous on the backend's stream; the
        outputs live in this runner's buffers until it runs again."""
        self._check_names(inputs)
        for n, t in inputs.items():
            self._check_input(n, t.dtype, t.shape)
        k = self.profile_for({n: t.shape for n, t in inputs.items()})
        context, bound = self.contexts[k], self._bound[k]
        with self.backend._lock:
            for n, t in inputs.items():
                ptr, shape = bound[n]
                if shape != t.shape and not context.set_input_shape(n, t.shape):
                    raise FeatherError(f"{self.name}: TensorRT refused shape {t.shape} for {n}")
                if ptr != t.ptr and not context.set_tensor_address(n, t.ptr):
                    raise FeatherError(f"{self.name}: TensorRT refused the address of {n}")
                bound[n] = (t.ptr, t.shape)
            self._execute(k, context)
            shapes = self._shapes_out(k, context)
        return {n: Tensor(self.buffers[n], shapes[n], self.dtypes[n]) for n in self.outputs}

    def _shapes_out(self, k: int, context) -> dict:
        key = tuple(shape for _, shape in self._bound[k].values())
        cached = self._output_shapes[k]
        if cached is None or cached[0] != key:
            shapes = {n: _shape(context.get_tensor_shape(n)) for n in self.outputs}
            for n, shape in shapes.items():
                if _volume(shape) * self.dtypes[n].itemsize > self.capacity[n]:
                    raise FeatherError(f"{self.name}: output {n} {shape} exceeds its buffer")
            cached = self._output_shapes[k] = (key, shapes)
        return cached[1]

    def _execute(self, k: int, context) -> None:
        backend = self.backend
        if not self._graphs_usable[k]:
            if not context.execute_async_v3(backend.stream_handle):
                raise FeatherError(f"{self.name}: TensorRT execution failed (see the TensorRT log)")
            return
        key = (tuple(sorted(self._bound[k].items())), backend.scratch_generation)
        graph = self._graphs.get(k)
        if graph is not None and graph.key == key:
            graph.launch(backend.stream)
            self.graph_launches += 1
            return
        if graph is not None:
            graph.destroy()
            del self._graphs[k]
        # this call runs normally (and flushes shape/address changes); the next identical call
        # replays the graph captured here
        if not context.execute_async_v3(backend.stream_handle):
            raise FeatherError(f"{self.name}: TensorRT execution failed (see the TensorRT log)")
        try:
            self._graphs[k] = CudaGraph.capture(backend, context, key)
        except FeatherError as exc:
            self._graphs_usable[k] = False           # this engine runs without graphs
            self.graph_error = str(exc)

    def release_graphs(self) -> None:
        for graph in self._graphs.values():
            graph.destroy()
        self._graphs.clear()

    def run(self, feeds: dict) -> dict:
        """Host numpy in, host numpy out (validation, sweeps): staged through buffers this method
        allocates on first use, at the arrays' size, then ``run_device``."""
        memory = self.backend.memory
        self._check_names(feeds)
        arrays = {n: np.asarray(feeds[n]) for n in self.inputs}
        for n, a in arrays.items():
            self._check_input(n, a.dtype, a.shape)
        self.profile_for({n: a.shape for n, a in arrays.items()})
        tensors = {n: memory.upload(a, into=Tensor(self._stage(n, a.nbytes), a.shape, self.dtypes[n]))
                   for n, a in arrays.items()}
        outputs = self.run_device(tensors)
        return {n: memory.download(t) for n, t in outputs.items()}

    def _stage(self, name: str, nbytes: int) -> int:
        """The staging buffer of one input, at least ``nbytes`` (>= ALIGNMENT: empty KV caches)."""
        ptr, size = self._staging.get(name, (0, 0))
        if not ptr or nbytes > size:
            memory = self.backend.memory
            if ptr:
                memory.synchronize()               # a queued run may still read the old buffer
                memory.free(ptr)
                self._staging.pop(name)
            size = max(int(nbytes), ALIGNMENT)
            ptr = memory.malloc(size)
            self._staging[name] = (ptr, size)
        return ptr
