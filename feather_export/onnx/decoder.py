"""The ``embed`` and ``decoder_a_b`` segments (Llama, Mistral, Qwen2 per ``models.family``),
shared by prefill and decode."""
from __future__ import annotations

import numpy as np

from feather_export.models.family import rope_inv_freq, text_spec
from feather_export.models.weights import EMBED, TEXT
from feather_export.onnx.graph import OPSET, QUANT_OPSET, GraphBuilder
from feather_export.onnx.layers import (F32, activation, apply_rope, cached_attention, causal_mask,
                                        dim, heads_first, linear, past_mask, rms_norm, rope_tables,
                                        split_heads)


def attn_geometry(text_config):
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return heads, kv_heads, head_dim


def build_embed(w, et: int, store=None):
    """``w``: the weight source (``models.weights``); ``store``: where initializers stream."""
    g = GraphBuilder("embed", store=store)
    ids = g.input("input_ids", 7, [1, "seq"])
    table = g.weight("embed_tokens.weight", w.get(EMBED), et)
    g.output(g.op("Gather", table, ids, axis=0), "inputs_embeds", et,
             [1, "seq", w.config.text_config.hidden_size])
    return g.model()


def build_decoder_span(w, start: int, end: int, et: int, *, final: bool,
                       score_layer: int | None = None, score_criterion: str | None = None,
                       quant=None, lm_head_quant=None, store=None, on_layer=None):
    """Layers [start, end) of the weight source ``w``; ``final`` adds the norm and lm_head on the
    last position. Weights are read (and, with a ``store``, written) one layer at a time;
    ``on_layer(i)`` is called after layer i is built (progress).

    ``quant`` / ``lm_head_quant`` (``WeightQuant`` or None): the layers' linear weights / lm_head
    stored quantized (docs/design.md §6); None keeps them in the float dtype.

    Static KV cache: ``past_key_values.{i}.key/value`` are the runtime's whole preallocated
    buffers [1, kv_heads, capacity, head_dim] (heads-first, as transformers), of which the first
    ``past_length`` rows are valid (prefill: capacity 0, past_length 0). Attention reads the buffers
    in place with a mask; ``present.{i}.key/value`` [1, kv_heads, seq, head_dim] are the new rows
    only, which the runtime writes at ``past_length``. Nothing concatenates or transposes the cache.

    ``score_layer`` additionally outputs what the next ``select`` segment scores with, taken from
    that layer's own attention: ``score_query.{i}`` (the last position's query) and, for FEATHER,
    ``score_keys.{i}`` (keys before RoPE, heads-first); FastV uses the RoPE'd query and
    ``present.{i}.key``.
    """
    cfg = w.config.text_config
    spec = text_spec(w.config)
    heads, kv_heads, head_dim = attn_geometry(cfg)
    d = cfg.hidden_size
    quantized = quant is not None or (final and lm_head_quant is not None)
    g = GraphBuilder(f"decoder_{start}_{end}", QUANT_OPSET if quantized else OPSET, store)
    hidden = g.input("inputs_embeds", et, [1, "seq", d])
    positions = g.input("position_ids", 7, [1, "seq"])
    past_length = g.input("past_length", 7, [])
    pasts = [(g.input(f"past_key_values.{i}.key", et, [1, kv_heads, "capacity", head_dim]),
              g.input(f"past_key_values.{i}.value", et, [1, kv_heads, "capacity", head_dim]))
             for i in range(start, end)]
    cos, sin = rope_tables(g, positions, rope_inv_freq(cfg), et)
    mask = (past_mask(g, dim(g, pasts[0][0], 2), past_length),      # [capacity] bool
            causal_mask(g, dim(g, hidden, 1), g.const(0)))           # [seq, seq] over the new rows
    for i, (past_k, past_v) in zip(range(start, end), pasts):
        score = score_criterion if i == score_layer else None
        hidden = _decoder_layer(g, w, i, hidden, cos, sin, mask, past_k, past_v,
                                (heads, kv_heads, head_dim), et, spec, cfg.rms_norm_eps, score, quant)
        if on_layer:
            on_layer(i)
    if final:
        last = g.op("Slice", hidden, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1]))
        normed = rms_norm(g, last, w, f"{TEXT}.norm", "norm", et, cfg.rms_norm_eps)
        logits = g.op("Cast", linear(g, normed, w, "lm_head", "lm_head", et, lm_head_quant), to=F32)
        g.output(logits, "logits", F32, [1, 1, cfg.vocab_size])
    else:
        g.output(hidden, "hidden_states", et, [1, "seq", d])
    return g.model()


def _decoder_layer(g, w, i, hidden, cos, sin, mask, past_k, past_v, geometry, et, spec, eps,
                   score=None, quant=None):
    """One pre-norm decoder layer (Llama, Mistral, Qwen2: they differ only in ``spec``);
    ``quant``: weight-only quantization of its linear weights."""
    heads, kv_heads, head_dim = geometry
    src, p = f"{TEXT}.layers.{i}", f"layers.{i}"
    attn, mlp = f"{src}.self_attn", f"{src}.mlp"
    x = rms_norm(g, hidden, w, f"{src}.input_layernorm", f"{p}.input_layernorm", et, eps)
    qkv = linear(g, x, w, [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"],
                 f"{p}.qkv_proj", et, quant, bias=spec.qkv_bias)
    q, k, v = g.op("Split", qkv, g.const([heads * head_dim, kv_heads * head_dim,
                                          kv_heads * head_dim]), axis=-1, outputs=3)
    q, k = split_heads(g, q, heads, head_dim), split_heads(g, k, kv_heads, head_dim)
    q_rot = apply_rope(g, q, cos, sin, head_dim)
    k_new = apply_rope(g, k, cos, sin, head_dim)
    if score is not None:
        _score_outputs(g, i, q if score == "feather" else q_rot, k, score, geometry, et)
    q = heads_first(g, q_rot)
    k_new = heads_first(g, k_new)                      # only the new rows are transposed
    v_new = heads_first(g, split_heads(g, v, kv_heads, head_dim))
    # outputs are only the new rows: the runtime writes them into its preallocated cache
    g.output(k_new, f"present.{i}.key", et, [1, kv_heads, "seq", head_dim])
    g.output(v_new, f"present.{i}.value", et, [1, kv_heads, "seq", head_dim])
    ctx = cached_attention(g, q, past_k, past_v, k_new, v_new, *mask, geometry, et)
    hidden = g.op("Add", hidden, linear(g, ctx, w, f"{attn}.o_proj", f"{p}.o_proj", et, quant,
                                         bias=spec.o_bias))
    x = rms_norm(g, hidden, w, f"{src}.post_attention_layernorm",
                 f"{p}.post_attention_layernorm", et, eps)
    inter = w.shape(f"{mlp}.gate_proj.weight")[0]
    gate_up = linear(g, x, w, [f"{mlp}.gate_proj", f"{mlp}.up_proj"], f"{p}.gate_up_proj", et,
                     quant, bias=spec.mlp_bias)
    gate, up = g.op("Split", gate_up, g.const([inter, inter]), axis=-1, outputs=2)
    act = activation(g, gate, "silu", et)
    # the layer's output gets a stable name: ``export.validate`` cuts large spans there
    return g.op("Add", hidden, linear(g, g.op("Mul", act, up), w, f"{mlp}.down_proj",
                                     f"{p}.down_proj", et, quant, bias=spec.mlp_bias),
                outputs=[layer_output_name(i)], name=f"{p}.residual_mlp")


def layer_output_name(i: int) -> str:
    """The hidden states leaving decoder layer ``i`` inside a span graph."""
    return f"layers.{i}.output"


def _score_outputs(g, i, q, k_pre_rope, criterion, geometry, et) -> None:
    """The last position's query [1,1,H,hd]; FEATHER also needs the keys before RoPE
    (heads-first [1,kvh,S,hd], like ``present.{i}.key``)."""
    heads, kv_heads, head_dim = geometry
    last = g.op("Slice", q, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1]))
    g.output(last, f"score_query.{i}", et, [1, 1, heads, head_dim])
    if criterion == "feather":
        g.output(heads_first(g, k_pre_rope), f"score_keys.{i}", et, [1, kv_heads, "seq", head_dim])
