"""Preallocated (static) KV caches, one per decoder span, in the backend's memory, reused across
steps and calls.

Buffers have the segments' layout [1, kv_heads, capacity, head_dim] (heads-first, as transformers).
In decode the WHOLE buffer is fed (bound by pointer: no copy, and a fixed address, so a decode
step can be replayed as a CUDA graph) together with ``past_length``, the number of valid rows; the
graph masks the rest. In prefill the cache is empty: [1, kv_heads, 0, head_dim] and past_length 0.
Each call's ``present.*`` outputs are only the new rows; ``append`` writes them at ``past_length``
with one strided copy per tensor (all heads at once: ``cudaMemcpy2D`` on CUDA). Nothing else is
copied per step.
"""
from __future__ import annotations

import numpy as np

from .errors import FeatherError


class SpanCache:
    def __init__(self, memory, layers: range, capacity: int, kv_heads: int, head_dim: int, dtype,
                 value_dtype=None):
        """``dtype``: the keys' (and values') dtype; ``value_dtype``: the values' when the backend
        keeps them in another (OpenVINO at bf16)."""
        self.memory = memory
        self.layers = layers
        self.capacity = capacity
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (1, kv_heads, capacity, head_dim)
        value_dtype = dtype if value_dtype is None else value_dtype
        self.keys = {i: memory.empty(shape, dtype) for i in layers}
        self.values = {i: memory.empty(shape, value_dtype) for i in layers}
        for t in (*self.keys.values(), *self.values.values()):
            memory.fill_zero(t)       # masked rows still flow through the MatMuls: keep them finite
        self._past_length = memory.empty((), np.int64)     # fixed address, value set per call
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def release(self) -> None:
        """Free the buffers (the cache cannot be used afterwards)."""
        for t in (*self.keys.values(), *self.values.values(), self._past_length):
            self.memory.release(t)
        self.keys, self.values = {}, {}

    def feeds(self, prefill: bool) -> dict:
        """Prefill: empty views and past_length 0. Decode: the whole buffers and the number of
        valid rows."""
        past = self.memory.upload(np.asarray(0 if prefill else self.length, np.int64),
                                  into=self._past_length)
        feeds = {"past_length": past}
        for i in self.layers:
            key, value = self.keys[i], self.values[i]
            if prefill:
                empty = (1, self.kv_heads, 0, self.head_dim)
                key, value = key.view(empty), value.view(empty)
            feeds[f"past_key_values.{i}.key"] = key
            feeds[f"past_key_values.{i}.value"] = value
        return feeds

    def append(self, outputs: dict) -> None:
        new = outputs[f"present.{self.layers[0]}.key"].shape[2]
        end = self.length + new
        if end > self.capacity:
            raise FeatherError(f"the KV cache holds {self.capacity} tokens; this request needs "
                               f"{end}. Build the artifact with larger --max-text-tokens/--max-new-tokens")
        for i in self.layers:
            for cache, present in ((self.keys[i], outputs[f"present.{i}.key"]),
                                   (self.values[i], outputs[f"present.{i}.value"])):
                if present.dtype != cache.dtype:
                    raise FeatherError(f"present.{i}: {present.dtype}, the cache holds "
                                       f"{cache.dtype}")
                # head h: new rows of present[0, h] -> cache[0, h, length:end]
                row = self.head_dim * cache.dtype.itemsize
                self.memory.copy_rows(cache.ptr + self.length * row, self.capacity * row,
                                      present.ptr, new * row, new * row, self.kv_heads)
        self.length = end
