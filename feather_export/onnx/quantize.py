"""Weight-only quantization of one linear weight (docs/design.md §6). Pure numpy, one tensor at a time.

Weights arrive as the MatMul operand ``[K, N]`` (input width K, output width N; the exporter stores
``W^T``). Quantization is symmetric (zero point 0) and round-to-nearest with ties to even, as ONNX
``QuantizeLinear`` rounds:

- int8: one scale per output channel (column), ``scale = max|w| / 127``, values in [-127, 127];
  ``DequantizeLinear(q, scale, axis=1)``.
- int4: one scale per block of ``block`` consecutive input rows of a column,
  ``scale = max|w_block| / 7``, values in [-7, 7]; ``DequantizeLinear(q, scale, axis=0,
  block_size=block)`` with scales ``[ceil(K / block), N]``. A width K that is not a multiple of the
  block gets a shorter last block (ONNX's blocked form allows it: it equals zero-padding the
  weight to full blocks, zeros never change a block's max), so no width is refused. A block wider
  than K is thereby capped at K (one scale per column); the ``block_size`` attribute keeps the
  requested power of two (the same partition; ONNX Runtime fuses only power-of-two blocks).

The most negative code (-128 / -8) is never used, so the grid is symmetric as TensorRT's weight-only
quantization requires. Scales are computed in fp32 and stored in the artifact's float dtype (they
are what ``DequantizeLinear`` outputs, i.e. the MatMul's type); codes are rounded against the
*stored* scale, so dequantization in any consumer gives exactly ``q * scale``. A block or column of
zeros gets scale 1 (codes 0, exact).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feather_export.errors import FeatherError

QMAX = {"int8": 127, "int4": 7}
DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True)
class WeightQuant:
    """How one group of linear weights is stored: ``int8`` or ``int4`` (with its ``block_size``)."""
    kind: str
    block_size: int = DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class QuantizedWeight:
    """``codes`` int8 ``[K, N]`` (int4 values held in int8), ``scales`` ``[N]`` (int8) or
    ``[ceil(K/block), N]`` (int4) in the scale dtype; ``block`` is None for int8."""
    kind: str
    codes: np.ndarray
    scales: np.ndarray
    block: int | None

    def dequantize(self) -> np.ndarray:
        """``q * scale`` in fp32 (what DequantizeLinear computes, before the cast to its type)."""
        scales = self.scales.astype(np.float32)
        if self.block is None:
            return self.codes.astype(np.float32) * scales[None, :]
        expanded = np.repeat(scales, self.block, axis=0)[: self.codes.shape[0]]
        return self.codes.astype(np.float32) * expanded


def check_block_size(block_size: int) -> None:
    """Block sizes ONNX Runtime's n-bit kernels take (power of two, at least 16)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise FeatherError(f"--block-size {block_size} must be a power of two >= 16 "
                           "(ONNX Runtime's 4-bit kernels; TensorRT uses 64 or 128)")


def quantize(weight: np.ndarray, kind: str, block_size: int = DEFAULT_BLOCK_SIZE,
             scale_dtype=np.float32) -> QuantizedWeight:
    """Quantize one ``[K, N]`` weight (any float dtype; converted to fp32 here, one tensor only)."""
    if kind not in QMAX:
        raise FeatherError(f"weight quantization {kind!r} is not one of {', '.join(QMAX)}")
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2 or 0 in w.shape:
        raise FeatherError(f"only non-empty 2-D linear weights are quantized, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise FeatherError("cannot quantize a weight with NaN or infinite values")
    qmax = QMAX[kind]
    k, n = w.shape
    if kind == "int8":
        block = None
        absmax = np.abs(w).max(axis=0)                                     # [N]
    else:
        check_block_size(block_size)
        block = block_size
        blocks = -(-k // block)
        padded = np.zeros((blocks * block, n), np.float32)
        padded[:k] = w
        absmax = np.abs(padded.reshape(blocks, block, n)).max(axis=1)     # [blocks, N]
    scales = (absmax / qmax).astype(scale_dtype)
    scales[scales.astype(np.float32) == 0] = 1             # zero columns/blocks (or underflow)
    stored = scales.astype(np.float32)
    expanded = stored[None, :] if block is None else np.repeat(stored, block, axis=0)[:k]
    codes = np.clip(np.rint(w / expanded), -qmax, qmax).astype(np.int8)
    return QuantizedWeight(kind, codes, scales, block)


def pack_int4(codes: np.ndarray) -> bytes:
    """ONNX INT4 raw data: two values per byte, the first in the low nibble (odd counts padded)."""
    flat = codes.reshape(-1).astype(np.int8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = flat.view(np.uint8) & 0x0F
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, count: int) -> np.ndarray:
    """Inverse of ``pack_int4``: ``count`` signed int4 values as int8."""
    packed = np.frombuffer(raw, np.uint8)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


def stored_bytes(kind: str, k: int, n: int, block_size: int, scale_bytes: int) -> int:
    """Bytes of one quantized ``[K, N]`` weight as stored: codes plus scales."""
    if kind == "int8":
        return k * n + n * scale_bytes
    return (k * n + 1) // 2 + -(-k // block_size) * n * scale_bytes
