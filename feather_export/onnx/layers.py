"""Transformer building blocks as ONNX subgraphs (standard ops, opset 17).

Activations flow in the export dtype; norms, softmax and rotary tables are computed in fp32.
Weights are stored transposed ([in, out]) so every projection is one MatMul.
"""
from __future__ import annotations

import numpy as np

from feather_export.errors import FeatherError
from feather_export.onnx.graph import GraphBuilder

F32 = 1
NEG_INF = np.float32(-np.inf)


def cast(g: GraphBuilder, x: str, from_type: int, to_type: int) -> str:
    return x if from_type == to_type else g.op("Cast", x, to=to_type)


def linear(g: GraphBuilder, x: str, w, names, prefix: str, et: int, quant=None,
           bias: bool | None = None) -> str:
    """x @ W^T + b for the ``nn.Linear`` weights ``names`` of the weight source ``w`` (a module
    name, or a list of them fused along the output axis), read one tensor at a time.

    ``quant`` (a ``WeightQuant``) stores W^T quantized: ``DequantizeLinear`` feeding the MatMul.
    ``bias``: what the model family's spec says (None: whatever the checkpoint has); a checkpoint
    that disagrees with its spec is one the spec does not describe, and is refused.
    """
    import torch

    names = list(names) if isinstance(names, (list, tuple)) else [names]
    has = [w.has(f"{n}.bias") for n in names]
    if bias is None:
        bias = has[0]
    if any(h != bias for h in has):
        raise FeatherError(f"{prefix}: the checkpoint's linear biases do not match its config "
                           f"(expected {'a bias' if bias else 'no bias'})")
    parts = [w.get(f"{n}.weight") for n in names]
    weight = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)).t()
    del parts
    if quant is None:
        out = g.weight(f"{prefix}.weight", weight, et)
    else:
        out = g.quantized_weight(f"{prefix}.weight", weight, et, quant)
    del weight
    y = g.op("MatMul", x, out)
    if bias:
        y = g.op("Add", y, g.weight(f"{prefix}.bias",
                                    torch.cat([w.get(f"{n}.bias") for n in names]), et))
    return y


def rms_norm(g: GraphBuilder, x: str, w, name: str, prefix: str, et: int, eps: float) -> str:
    """Llama RMSNorm (weight ``name`` of ``w``): x * rsqrt(mean(x^2) + eps) in fp32, cast back,
    times the weight."""
    x32 = cast(g, x, et, F32)
    # Pow(x, 2) (not x*x): the form ONNX Runtime fuses at load time into one
    # SimplifiedLayerNormalization kernel; TensorRT takes either
    var = g.reduce_mean(g.op("Pow", x32, g.const(np.float32(2.0), np.float32)), [-1])
    eps = g.const(np.float32(eps), np.float32)
    normed = g.op("Div", x32, g.op("Sqrt", g.op("Add", var, eps)))
    return g.op("Mul", cast(g, normed, F32, et), g.weight(f"{prefix}.weight",
                                                          w.get(f"{name}.weight"), et))


def layer_norm(g: GraphBuilder, x: str, w, name: str, prefix: str, et: int, eps: float) -> str:
    """LayerNorm (weight and bias ``name`` of ``w``) in fp32 (the ONNX LayerNormalization op)."""
    y = g.op("LayerNormalization", cast(g, x, et, F32),
             g.weight(f"{prefix}.weight", w.get(f"{name}.weight"), F32),
             g.weight(f"{prefix}.bias", w.get(f"{name}.bias"), F32),
             axis=-1, epsilon=float(eps))
    return cast(g, y, F32, et)


def activation(g: GraphBuilder, x: str, name: str, et: int) -> str:
    """The activations LLaVA checkpoints use; computed in fp32."""
    x32 = cast(g, x, et, F32)
    if name == "quick_gelu":
        y = g.op("Mul", x32, g.op("Sigmoid", g.op("Mul", x32, g.const(np.float32(1.702), np.float32))))
    elif name == "gelu":
        inner = g.op("Erf", g.op("Mul", x32, g.const(np.float32(2 ** -0.5), np.float32)))
        y = g.op("Mul", g.op("Mul", x32, g.const(np.float32(0.5), np.float32)),
                 g.op("Add", inner, g.const(np.float32(1.0), np.float32)))
    elif name in ("gelu_pytorch_tanh", "gelu_new"):     # SigLIP: the tanh approximation
        cube = g.op("Mul", g.op("Mul", x32, x32), x32)
        inner = g.op("Mul", g.op("Add", x32, g.op("Mul", cube, g.const(np.float32(0.044715),
                                                                     np.float32))),
                     g.const(np.float32(np.sqrt(2.0 / np.pi)), np.float32))
        y = g.op("Mul", g.op("Mul", x32, g.const(np.float32(0.5), np.float32)),
                 g.op("Add", g.op("Tanh", inner), g.const(np.float32(1.0), np.float32)))
    elif name == "silu":
        y = g.op("Mul", x32, g.op("Sigmoid", x32))
    else:
        raise FeatherError(f"activation {name!r} is not supported by the exporter "
                           "(quick_gelu, gelu, gelu_pytorch_tanh, silu are)")
    return cast(g, y, F32, et)


def split_heads(g: GraphBuilder, x: str, heads: int, head_dim: int) -> str:
    """[1, S, heads*hd] -> [1, S, heads, hd] (the KV-cache layout: a prefix is contiguous)."""
    return g.op("Reshape", x, g.const([0, 0, heads, head_dim]))


def heads_first(g: GraphBuilder, x: str) -> str:
    """[1, S, heads, hd] -> [1, heads, S, hd]."""
    return g.op("Transpose", x, perm=[0, 2, 1, 3])


def merge_heads(g: GraphBuilder, x: str) -> str:
    """[1, heads, S, hd] -> [1, S, heads*hd]."""
    return g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), g.const([0, 0, -1]))


def rope_tables(g: GraphBuilder, position_ids: str, inv_freq: np.ndarray, et: int):
    """cos/sin [1, S, 1, hd] for int64 position ids [1, S] (fp32 math, as transformers)."""
    pos = g.op("Unsqueeze", g.op("Cast", position_ids, to=F32), g.const([2]))        # [1, S, 1]
    freqs = g.op("Mul", pos, g.const(inv_freq.reshape(1, 1, -1), np.float32))      # [1, S, hd/2]
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([2]))    # [1, S, 1, hd]
    return cast(g, g.op("Cos", emb), F32, et), cast(g, g.op("Sin", emb), F32, et)


def apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    """x * cos + rotate_half(x) * sin for x [1, S, heads, hd]."""
    half = head_dim // 2
    x1, x2 = g.op("Split", x, g.const([half, half]), axis=-1, outputs=2)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def _keys_t(g: GraphBuilder, k: str) -> str:
    """k [1, kv_heads, T, hd] -> [1, kv_heads, 1, hd, T]: the GQA group axis first, then a swap of the
    last two dims only, so the Transpose fuses into the MatMul (ORT FusedMatMul transB, TensorRT a
    transposed MatMul operand) instead of copying the keys."""
    return g.op("Transpose", g.op("Unsqueeze", k, g.const([2])), perm=[0, 1, 2, 4, 3])


def _scaled_logits(g: GraphBuilder, q5: str, k: str, head_dim: int) -> str:
    """fp32 q.k^T / sqrt(hd): q5 [1, kvh, groups, S, hd], k [1, kvh, T, hd] -> [1, kvh, groups, S, T]."""
    return g.op("Mul", g.op("Cast", g.op("MatMul", q5, _keys_t(g, k)), to=F32),
                g.const(np.float32(head_dim ** -0.5), np.float32))


def attention_logits(g: GraphBuilder, q: str, k: str, groups: int, kv_heads: int,
                     head_dim: int) -> str:
    """Pre-softmax fp32 q.k/sqrt(hd) as [1, kv_heads, groups, S, T] (GQA by broadcasting).

    q: [1, kv_heads*groups, S, hd]; k: [1, kv_heads, T, hd].
    """
    q5 = g.op("Reshape", q, g.const([1, kv_heads, groups, -1, head_dim]))
    return _scaled_logits(g, q5, k, head_dim)


def attention_probs(g: GraphBuilder, q: str, k: str, groups: int, kv_heads: int, head_dim: int,
                    mask: str | None) -> str:
    """Softmax(q.k/sqrt(hd) + mask) in fp32 as [1, kv_heads, groups, S, T] (GQA by broadcasting).

    q: [1, kv_heads*groups, S, hd]; k: [1, kv_heads, T, hd].
    """
    logits = attention_logits(g, q, k, groups, kv_heads, head_dim)
    if mask is not None:
        logits = g.op("Add", logits, mask)
    return g.op("Softmax", logits, axis=-1)


def self_attention(g: GraphBuilder, q: str, k: str, v: str, head_dim: int, et: int):
    """Plain multi-head attention on 4-D tensors, no mask (the vision tower): q, k, v
    [1, heads, T, hd] -> (ctx [1, T, heads*hd], fp32 probabilities [1, heads, T, T]).

    Written as MatMul(q, k^T) -> scale -> Softmax -> MatMul(., v) on 4-D tensors: the pattern
    OpenVINO's CPU plugin fuses into one attention kernel (a ``Subgraph`` node in
    benchmarks/openvino_segments.py's profile; the 5-D grouped form of ``attention_probs`` ran as
    separate MatMul and Softmax nodes); ONNX Runtime still folds the key transpose into its MatMul."""
    logits = g.op("Mul", g.op("Cast", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])),
                              to=F32), g.const(np.float32(head_dim ** -0.5), np.float32))
    probs = g.op("Softmax", logits, axis=-1)
    ctx = g.op("MatMul", cast(g, probs, F32, et), v)
    return merge_heads(g, ctx), probs


def cached_attention(g: GraphBuilder, q: str, k_buf: str, v_buf: str, k_new: str, v_new: str,
                     past_mask: str, new_mask: str, geometry, et: int) -> str:
    """Attention over a static KV buffer plus the new rows, without copying the buffer.

    q [1, heads, S, hd]; k_buf/v_buf [1, kvh, C, hd] (the whole preallocated cache, C = capacity,
    only the first ``past_length`` rows valid); k_new/v_new [1, kvh, S, hd]. ``past_mask`` [C] bool
    (column < past_length), ``new_mask`` [S, S] additive causal. One fp32 softmax over
    [past columns | new columns]; ctx = probs_past . V_buf + probs_new . v_new -> [1, S, heads*hd].
    Columns beyond past_length get -inf through Where (robust to any finite or infinite logit), so
    rows of the buffer past the valid length never contribute (their values must be finite, as
    zeros or old rows are).
    """
    heads, kv_heads, head_dim = geometry
    q5 = g.op("Reshape", q, g.const([1, kv_heads, heads // kv_heads, -1, head_dim]))
    past = g.op("Where", past_mask, _scaled_logits(g, q5, k_buf, head_dim),
                g.const(NEG_INF, np.float32))
    new = g.op("Add", _scaled_logits(g, q5, k_new, head_dim), new_mask)
    probs = g.op("Softmax", g.op("Concat", past, new, axis=-1), axis=-1)
    capacity = g.op("Slice", g.op("Shape", k_buf), g.const([2]), g.const([3]))   # [1]
    big = g.const([np.iinfo(np.int64).max])
    axis = g.const([-1])
    p_past = cast(g, g.op("Slice", probs, g.const([0]), capacity, axis), F32, et)
    p_new = cast(g, g.op("Slice", probs, capacity, big, axis), F32, et)
    ctx = g.op("Add", g.op("MatMul", p_past, g.op("Unsqueeze", v_buf, g.const([2]))),
               g.op("MatMul", p_new, g.op("Unsqueeze", v_new, g.const([2]))))
    return merge_heads(g, g.op("Reshape", ctx, g.const([1, heads, -1, head_dim])))


def past_mask(g: GraphBuilder, capacity: str, past_length: str) -> str:
    """Bool [C]: the buffer columns holding valid rows (column < past_length)."""
    cols = g.op("Range", g.const(0), capacity, g.const(1))
    return g.op("Less", cols, past_length)


def causal_mask(g: GraphBuilder, seq_len: str, past_len: str) -> str:
    """Additive fp32 mask [S, P+S]: row r sees keys 0..P+r."""
    zero, one = g.const(0), g.const(1)
    rows = g.op("Unsqueeze", g.op("Add", g.op("Range", zero, seq_len, one), past_len), g.const([1]))
    cols = g.op("Unsqueeze", g.op("Range", zero, g.op("Add", seq_len, past_len), one), g.const([0]))
    allowed = g.op("LessOrEqual", cols, rows)
    return g.op("Where", allowed, g.const(np.float32(0), np.float32), g.const(NEG_INF, np.float32))


def dim(g: GraphBuilder, x: str, axis: int) -> str:
    """A scalar int64 with the runtime size of ``x`` along ``axis``."""
    return g.op("Squeeze", g.op("Gather", g.op("Shape", x), g.const([axis]), axis=0), g.const([0]))
