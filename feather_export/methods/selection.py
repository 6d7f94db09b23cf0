"""Token selection rules of docs/design.md §4 in numpy: the oracle for the ONNX op and the CUDA kernel."""
from __future__ import annotations

import numpy as np


def grid_mask(num_tokens: int, side: int, stride: int, offset: int = 0) -> np.ndarray:
    """Boolean mask of the uniform grid: raster row and column both multiples of ``stride`` (0 =
    none). Token i is raster token i - ``offset``; the ``offset`` tokens before the raster (a CLS
    image token) are never on the grid."""
    if stride <= 0:
        return np.zeros(num_tokens, dtype=bool)
    r = np.arange(num_tokens) - offset
    return (r >= 0) & ((r // side) % stride == 0) & ((r % side) % stride == 0)


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


def select_per_crop(scores: np.ndarray, crops, per_crop: int, always: np.ndarray) -> np.ndarray:
    """FasterVLM on crops (LLaVA-NeXT, docs/design.md §3): the top ``per_crop`` tokens of each crop
    by score (ties to the lower index), plus every token of ``always`` (the newlines); ascending.

    ``crops``: per crop, its tokens' indices into ``scores`` (ascending)."""
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    picked = [np.asarray(c)[np.argsort(-scores[np.asarray(c)], kind="stable")[:per_crop]]
              for c in crops]
    return np.sort(np.concatenate([*picked, np.asarray(always, np.int64)])).astype(np.int64)


# ---- BTP (docs/design.md §4) ------------------------------------------------------------------------------

COSINE_EPS = np.float32(1e-12)      # a zero hidden state counts as norm 1e-12 (never NaN)


def farthest_point_seed(side: int, count: int, offset: int = 0) -> np.ndarray:
    """BTP's spatial seed F: greedy farthest-point sampling on the side x side raster with Manhattan
    distance, starting from raster index 0, ties to the lower index; ``count`` indices in pick order,
    as image-token indices (raster index + ``offset``, the tokens before the raster: a CLS)."""
    n = side * side
    count = min(count, n)
    rows, cols = np.divmod(np.arange(n), side)
    picked = np.zeros(n, bool)
    nearest = np.full(n, np.iinfo(np.int64).max, np.int64)
    order = []
    t = 0
    for _ in range(count):
        order.append(t)
        picked[t] = True
        nearest = np.minimum(nearest, np.abs(rows - rows[t]) + np.abs(cols - cols[t]))
        t = int(np.argmax(np.where(picked, -1, nearest)))       # first maximum: the lower index
    return np.asarray(order, np.int64) + offset


def btp_attention_set(logits: np.ndarray, keep: int, attention_count: int,
                      candidate_count: int) -> np.ndarray:
    """A: the top ``candidate_count`` ranks by logit (ties to the lower rank), ordered as [ranks
    < keep by logit descending] then [the rest by logit descending]; the first ``attention_count``."""
    logits = np.asarray(logits, np.float32).reshape(-1)
    top = np.argsort(-logits, kind="stable")[:candidate_count]
    front = top[top < keep]
    return np.concatenate([front, top[top >= keep]])[:attention_count].astype(np.int64)


def cosine_distance(features: np.ndarray) -> np.ndarray:
    """D = 1 - cosine similarity of the rows of ``features`` [n, d], in fp32."""
    x = np.asarray(features, np.float32)
    norm = np.maximum(np.sqrt((x * x).sum(axis=1, keepdims=True, dtype=np.float32)), COSINE_EPS)
    xn = (x / norm).astype(np.float32)
    return (np.float32(1) - xn @ xn.T).astype(np.float32)


def btp_select(logits: np.ndarray, features: np.ndarray, keep: int, attention_count: int,
               candidate_count: int, seed: np.ndarray | None = None) -> np.ndarray:
    """One BTP stage over the n current image tokens; kept ranks sorted ascending.

    S = A; then the seed members not in S (in seed order) while |S| < keep; then, while |S| < keep,
    argmax_j min_{i in S} D[i, j] over j not in S (ties to the lower index; min over an empty S is
    +inf). The fill runs exactly keep - |A| steps: a step takes the next seed member if one is
    left, else the farthest token, as the exported graph and the CUDA kernel do.
    """
    n = len(np.asarray(logits).reshape(-1))
    if keep == 0:
        return np.zeros(0, np.int64)
    chosen = np.zeros(n, bool)
    nearest = np.full(n, np.inf, np.float32)
    dist = cosine_distance(features)
    seed = np.zeros(0, np.int64) if seed is None else np.asarray(seed, np.int64)

    def add(t: int) -> None:
        nonlocal nearest
        chosen[t] = True
        nearest = np.minimum(nearest, dist[t])

    for t in btp_attention_set(logits, keep, attention_count, candidate_count):
        add(int(t))
    for _ in range(keep - int(chosen.sum())):
        left = seed[~chosen[seed]]
        add(int(left[0]) if len(left) else int(np.argmax(np.where(chosen, -np.inf, nearest))))
    return np.flatnonzero(chosen).astype(np.int64)
