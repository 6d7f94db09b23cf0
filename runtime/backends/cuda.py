"""cuda-python runtime helpers shared by the CUDA backends (ONNX Runtime CUDA, TensorRT).

``cuda.bindings.runtime`` (cuda-python >= 12.6.1; the only layout in 13.x), falling back to
``cuda.cudart`` (older 12.x). Nothing here imports cuda-python at module import time.
"""
from __future__ import annotations

from ..errors import FeatherError


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart      # cuda-python >= 12.6.1
    except ImportError:
        try:
            from cuda import cudart                      # cuda-python < 12.6.1 (removed in 13.0)
        except ImportError:
            raise FeatherError("the CUDA backends need cuda-python for device memory (pip install "
                               "'cuda-python>=12.6,<13' on CUDA 12 / JetPack 6, "
                               "'cuda-python>=13,<14' on CUDA 13), or run on the CPU "
                               "(backend onnxruntime-cpu)") from None
    _check_driver(cudart)
    return cudart


def _bindings_version() -> str | None:
    try:
        import cuda.bindings as bindings
    except ImportError:
        return None
    return getattr(bindings, "__version__", None)


def _check_driver(cudart) -> None:
    """cuda-python N.x is built for CUDA N and needs a driver for CUDA N or newer: refuse a
    mismatch in one line instead of ``cudaErrorInsufficientDriver`` on the first call. No driver
    at all (version 0) is left to the first call's error."""
    version = _bindings_version()
    if not version or not hasattr(cudart, "cudaDriverGetVersion"):
        return
    try:
        bindings_major = int(version.split(".")[0])
    except ValueError:
        return
    err, driver = cudart.cudaDriverGetVersion()
    if err != cudart.cudaError_t.cudaSuccess or not driver:
        return
    driver_major, driver_minor = int(driver) // 1000, int(driver) % 1000 // 10
    if driver_major < bindings_major:
        pin = "12.6,<13" if driver_major == 12 else f"{driver_major},<{driver_major + 1}"
        raise FeatherError(f"cuda-python {version} needs a CUDA {bindings_major} driver; this "
                           f"driver supports CUDA {driver_major}.{driver_minor}. Install the "
                           f"bindings for it: pip install 'cuda-python>={pin}'")


def check(cudart, result, what: str):
    """Unpack a cuda-python ``(err, *values)`` tuple; a failure is a FeatherError."""
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise FeatherError(f"CUDA error in {what}: {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


def stream_handle(obj) -> int:
    """The integer handle TensorRT's and ONNX Runtime's Python APIs take for a CUDA stream."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle   # cuda-bindings >= 13.0
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def device_identity(device: int | None = None) -> dict:
    """Name and compute capability of the current (or given) CUDA device."""
    cudart = import_cudart()
    if device is None:
        device = check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    props = check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {"name": str(name), "compute_capability": f"{props.major}.{props.minor}"}
