"""Preallocated KV caches, one per decoder span, reused across steps and calls.

Buffers have the segments' layout [1, capacity, kv_heads, head_dim], so the past fed to a segment is
a contiguous prefix view (no copy) and each step writes only its new rows.
"""
from __future__ import annotations

import numpy as np

from .errors import FeatherError


class SpanCache:
    def __init__(self, layers: range, capacity: int, kv_heads: int, head_dim: int, dtype):
        self.layers = layers
        self.capacity = capacity
        shape = (1, capacity, kv_heads, head_dim)
        self.keys = {i: np.zeros(shape, dtype) for i in layers}
        self.values = {i: np.zeros(shape, dtype) for i in layers}
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def past_feeds(self) -> dict:
        n = self.length
        feeds = {}
        for i in self.layers:
            feeds[f"past_key_values.{i}.key"] = self.keys[i][:, :n]
            feeds[f"past_key_values.{i}.value"] = self.values[i][:, :n]
        return feeds

    def append(self, outputs: dict) -> None:
        new = outputs[f"present.{self.layers[0]}.key"].shape[1]
        end = self.length + new
        if end > self.capacity:
            raise FeatherError(f"the KV cache holds {self.capacity} tokens; this request needs "
                               f"{end}. Build the artifact with larger --max-text-tokens/--max-new-tokens")
        for i in self.layers:
            self.keys[i][:, self.length:end] = outputs[f"present.{i}.key"]
            self.values[i][:, self.length:end] = outputs[f"present.{i}.value"]
        self.length = end
