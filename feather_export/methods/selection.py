"""Token selection rules of docs/design.md §4 in numpy: the oracle for the ONNX op and the CUDA kernel."""
from __future__ import annotations

import numpy as np


def grid_mask(num_tokens: int, side: int, stride: int) -> np.ndarray:
    """Boolean mask of the uniform grid: row and column both multiples of ``stride`` (0 = none)."""
    if stride <= 0:
        return np.zeros(num_tokens, dtype=bool)
    idx = np.arange(num_tokens)
    return ((idx // side) % stride == 0) & ((idx % side) % stride == 0)


def select_tokens(scores: np.ndarray, budget: int, forced: np.ndarray | None = None) -> np.ndarray:
    """Keep ``forced`` tokens plus the top-scoring others, ``budget`` in all, sorted ascending.

    Ties in score go to the lower index (stable sort on descending scores).
    """
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    forced = np.zeros(scores.shape, bool) if forced is None else np.asarray(forced, bool)
    free = budget - int(forced.sum())
    order = np.argsort(-scores, kind="stable")
    chosen = order[~forced[order]][:free]
    return np.sort(np.concatenate([np.flatnonzero(forced), chosen])).astype(np.int64)
