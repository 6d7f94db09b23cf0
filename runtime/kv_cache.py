"""Preallocated (static) KV caches, one per decoder span, reused across steps and calls.

Buffers have the segments' layout [1, kv_heads, capacity, head_dim] (heads-first, as transformers).
In decode the WHOLE buffer is fed (zero-copy, contiguous) together with ``past_length``, the number
of valid rows; the graph masks the rest. In prefill the cache is empty: [1, kv_heads, 0, head_dim]
and past_length 0. Each call's ``present.*`` outputs are only the new rows, written at
``past_length``; nothing else is copied per step.
"""
from __future__ import annotations

import numpy as np

from .errors import FeatherError


class SpanCache:
    def __init__(self, layers: range, capacity: int, kv_heads: int, head_dim: int, dtype):
        self.layers = layers
        self.capacity = capacity
        shape = (1, kv_heads, capacity, head_dim)
        # zeros, not empty: masked rows still flow through the MatMuls and must be finite
        self.keys = {i: np.zeros(shape, dtype) for i in layers}
        self.values = {i: np.zeros(shape, dtype) for i in layers}
        self._empty = np.zeros((1, kv_heads, 0, head_dim), dtype)
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def feeds(self, prefill: bool) -> dict:
        """Prefill: empty buffers and past_length 0. Decode: the whole buffers (no copy) and the
        number of valid rows."""
        feeds = {"past_length": np.asarray(0 if prefill else self.length, np.int64)}
        for i in self.layers:
            feeds[f"past_key_values.{i}.key"] = self._empty if prefill else self.keys[i]
            feeds[f"past_key_values.{i}.value"] = self._empty if prefill else self.values[i]
        return feeds

    def append(self, outputs: dict) -> None:
        new = outputs[f"present.{self.layers[0]}.key"].shape[2]
        end = self.length + new
        if end > self.capacity:
            raise FeatherError(f"the KV cache holds {self.capacity} tokens; this request needs "
                               f"{end}. Build the artifact with larger --max-text-tokens/--max-new-tokens")
        for i in self.layers:
            self.keys[i][:, :, self.length:end] = outputs[f"present.{i}.key"]
            self.values[i][:, :, self.length:end] = outputs[f"present.{i}.value"]
        self.length = end
