"""Device memory for the Pipeline: tensors that stay where the backend runs them.

A ``Tensor`` is a pointer, a shape and a dtype in one backend's memory. The Pipeline moves data
only through a backend's ``Memory`` (``HostMemory`` for ONNX Runtime on CPU, ``CudaMemory`` for
ONNX Runtime CUDA and TensorRT), so the same orchestration code runs on both and the CPU tests
exercise the exact offsets and pitches the GPU path uses:

- ``upload`` / ``download``: host numpy <-> memory (inputs, logits, kept indices);
- ``copy``: a contiguous byte range (merging text embeddings and image features);
- ``copy_rows``: a strided 2-D copy with ``cudaMemcpy2D`` semantics (writing a span's new KV rows
  into its preallocated cache, one call per tensor for all heads);
- ``fill_zero``: initialise a buffer (KV caches: masked rows still flow through the MatMuls).

Every method counts the bytes it moves (``traffic``) so tests can prove that a decode step moves
only the new rows, never the cache.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import FeatherError

ALIGNMENT = 256                     # bytes; what cudaMalloc gives and TensorRT expects


@dataclass
class Tensor:
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: object = field(default=None, repr=False)   # keeps the memory alive (allocation, OrtValue)
    host: np.ndarray | None = field(default=None, repr=False)  # the value it was uploaded from

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, shape, offset_bytes: int = 0) -> "Tensor":
        """The same memory (from ``offset_bytes``) seen with another shape."""
        return Tensor(self.ptr + offset_bytes, tuple(int(d) for d in shape), self.dtype, self.owner)


def _traffic() -> dict:
    return {"h2d": 0, "d2h": 0, "d2d": 0}


class HostMemory:
    """CPU memory behind raw pointers, with the same operations (and pitches) as ``CudaMemory``."""

    device_type = "cpu"
    device_id = 0

    def __init__(self):
        self.traffic = _traffic()

    def empty(self, shape, dtype) -> Tensor:
        dtype = np.dtype(dtype)
        nbytes = max(math.prod(shape) * dtype.itemsize, 1)
        raw = np.empty(nbytes + ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        return Tensor(raw.ctypes.data + start, tuple(int(d) for d in shape), dtype, owner=raw)

    def upload(self, array, into: Tensor | None = None) -> Tensor:
        array = _contiguous(array)
        target = _target(self, array, into)
        ctypes.memmove(target.ptr, array.ctypes.data, array.nbytes)
        self.traffic["h2d"] += array.nbytes
        return target

    def download(self, tensor: Tensor) -> np.ndarray:
        out = np.empty(tensor.shape, tensor.dtype)
        ctypes.memmove(out.ctypes.data, tensor.ptr, out.nbytes)
        self.traffic["d2h"] += out.nbytes
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        if nbytes:
            ctypes.memmove(dst, src, nbytes)
            self.traffic["d2d"] += nbytes

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int,
                  rows: int) -> None:
        """``rows`` rows of ``width`` bytes; row r goes from src + r*src_pitch to dst + r*dst_pitch."""
        if not (width and rows):
            return
        if width > min(dst_pitch, src_pitch):
            raise FeatherError(f"copy_rows: width {width} exceeds a pitch ({dst_pitch}, {src_pitch})")
        for r in range(rows):            # rows = KV heads: a handful of calls
            ctypes.memmove(dst + r * dst_pitch, src + r * src_pitch, width)
        self.traffic["d2d"] += width * rows

    def fill_zero(self, tensor: Tensor) -> None:
        ctypes.memset(tensor.ptr, 0, tensor.nbytes)

    def release(self, tensor: Tensor) -> None:
        """Host allocations are freed with their last reference."""

    def close(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _contiguous(array) -> np.ndarray:
    """C-contiguous, keeping 0-d scalars 0-d (np.ascontiguousarray makes them 1-d)."""
    array = np.asarray(array)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _target(memory, array: np.ndarray, into: Tensor | None) -> Tensor:
    if into is None:
        target = memory.empty(array.shape, array.dtype)
    else:
        if array.dtype != into.dtype or array.nbytes > into.nbytes:
            raise FeatherError(f"cannot upload {array.dtype}{list(array.shape)} into "
                               f"{into.dtype}{list(into.shape)}")
        target = into.view(array.shape)
    target.host = array
    return target


class CudaMemory:
    """CUDA device memory through cuda-python's runtime API, on one stream.

    Everything is asynchronous on ``stream`` except ``download`` (it synchronizes: the host needs
    the values) and ``synchronize``. Allocations live until ``close``; the Pipeline allocates its
    workspace once, so nothing is allocated per step.
    """

    device_type = "cuda"

    def __init__(self, device: int = 0, stream=None):
        from .backends.cuda import check, import_cudart

        self.cudart = import_cudart()
        self._check = check
        self.device_id = device
        self.traffic = _traffic()
        self._allocations: list[int] = []
        check(self.cudart, self.cudart.cudaSetDevice(device), "cudaSetDevice")
        self._own_stream = stream is None
        self.stream = (check(self.cudart, self.cudart.cudaStreamCreate(), "cudaStreamCreate")
                       if stream is None else stream)

    def malloc(self, nbytes: int) -> int:
        ptr = int(self._check(self.cudart, self.cudart.cudaMalloc(max(int(nbytes), ALIGNMENT)),
                              "cudaMalloc"))
        self._allocations.append(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        self._check(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")
        self._allocations.remove(ptr)

    def release(self, tensor: Tensor) -> None:
        """Free a tensor this memory allocated (``empty``/``upload``); synchronizes first."""
        if tensor.ptr in self._allocations:
            self.synchronize()
            self.free(tensor.ptr)

    def empty(self, shape, dtype) -> Tensor:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        return Tensor(self.malloc(nbytes), tuple(int(d) for d in shape), dtype)

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        k = getattr(self.cudart.cudaMemcpyKind, kind)
        self._check(self.cudart, self.cudart.cudaMemcpyAsync(dst, src, nbytes, k, self.stream),
                    "cudaMemcpyAsync")

    def upload(self, array, into: Tensor | None = None) -> Tensor:
        # the host array must outlive the asynchronous copy: the Tensor keeps it (``host``)
        array = _contiguous(array)
        target = _target(self, array, into)
        if array.nbytes:
            self._memcpy(target.ptr, array.ctypes.data, array.nbytes, "cudaMemcpyHostToDevice")
        self.traffic["h2d"] += array.nbytes
        return target

    def download(self, tensor: Tensor) -> np.ndarray:
        out = np.empty(tensor.shape, tensor.dtype)
        if out.nbytes:
            self._memcpy(out.ctypes.data, tensor.ptr, out.nbytes, "cudaMemcpyDeviceToHost")
        self.synchronize()
        self.traffic["d2h"] += out.nbytes
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        if nbytes:
            self._memcpy(dst, src, nbytes, "cudaMemcpyDeviceToDevice")
            self.traffic["d2d"] += nbytes

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int,
                  rows: int) -> None:
        if not (width and rows):
            return
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._check(self.cudart, self.cudart.cudaMemcpy2DAsync(
            dst, dst_pitch, src, src_pitch, width, rows, kind, self.stream), "cudaMemcpy2DAsync")
        self.traffic["d2d"] += width * rows

    def fill_zero(self, tensor: Tensor) -> None:
        if tensor.nbytes:
            self._check(self.cudart, self.cudart.cudaMemsetAsync(tensor.ptr, 0, tensor.nbytes,
                                                                 self.stream), "cudaMemsetAsync")

    def synchronize(self) -> None:
        self._check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream),
                    "cudaStreamSynchronize")

    def close(self) -> None:
        """Free every allocation (and the stream this object created)."""
        if getattr(self, "cudart", None) is None or self.stream is None:
            return                        # never opened, or closed already
        self.synchronize()
        for ptr in list(self._allocations):
            self.free(ptr)
        if self._own_stream:
            self._check(self.cudart, self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
        self.stream = None
