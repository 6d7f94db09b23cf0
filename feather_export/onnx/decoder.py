"""The ``embed`` and ``decoder_a_b`` segments (Llama, Mistral, Qwen2 per ``models.family``),
shared by prefill and decode."""
from __future__ import annotations

import numpy as np

from feather_export.errors import FeatherError
from feather_export.models.family import rope_inv_freq, text_spec
from feather_export.onnx.graph import OPSET, QUANT_OPSET, GraphBuilder
from feather_export.onnx.layers import (F32, activation, apply_rope, cached_attention, causal_mask,
                                        dim, heads_first, linear, past_mask, rms_norm, rope_tables,
                                        split_heads)


def attn_geometry(text_config):
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return heads, kv_heads, head_dim


def build_embed(model, et: int):
    lm = model.model.language_model
    g = GraphBuilder("embed")
    ids = g.input("input_ids", 7, [1, "seq"])
    table = g.weight("embed_tokens.weight", lm.embed_tokens.weight, et)
    g.output(g.op("Gather", table, ids, axis=0), "inputs_embeds", et, [1, "seq", lm.config.hidden_size])
    return g.model()


def build_decoder_span(model, start: int, end: int, et: int, *, final: bool,
                       score_layer: int | None = None, score_criterion: str | None = None,
                       quant=None, lm_head_quant=None):
    """Layers [start, end); ``final`` adds the norm and lm_head on the last position.

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
    lm = model.model.language_model
    cfg = lm.config
    spec = text_spec(model.config)
    heads, kv_heads, head_dim = attn_geometry(cfg)
    d = cfg.hidden_size
    quantized = quant is not None or (final and lm_head_quant is not None)
    g = GraphBuilder(f"decoder_{start}_{end}", QUANT_OPSET if quantized else OPSET)
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
        hidden = _decoder_layer(g, lm.layers[i], i, hidden, cos, sin, mask, past_k, past_v,
                                (heads, kv_heads, head_dim), et, spec, score, quant)
    if final:
        last = g.op("Slice", hidden, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1]))
        normed = rms_norm(g, last, lm.norm, "norm", et)
        logits = g.op("Cast", linear(g, normed, model.lm_head, "lm_head", et, lm_head_quant), to=F32)
        g.output(logits, "logits", F32, [1, 1, cfg.vocab_size])
    else:
        g.output(hidden, "hidden_states", et, [1, "seq", d])
    return g.model()


def _decoder_layer(g, layer, i, hidden, cos, sin, mask, past_k, past_v, geometry, et, spec,
                   score=None, quant=None):
    """One pre-norm decoder layer (Llama, Mistral, Qwen2: they differ only in ``spec``);
    ``quant``: weight-only quantization of its linear weights."""
    heads, kv_heads, head_dim = geometry
    attn, p = layer.self_attn, f"layers.{i}"
    x = rms_norm(g, hidden, layer.input_layernorm, f"{p}.input_layernorm", et)
    qkv = linear(g, x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{p}.qkv_proj", et, quant,
                 bias=spec.qkv_bias)
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
    hidden = g.op("Add", hidden, linear(g, ctx, attn.o_proj, f"{p}.o_proj", et, quant,
                                         bias=spec.o_bias))
    x = rms_norm(g, hidden, layer.post_attention_layernorm, f"{p}.post_attention_layernorm", et)
    mlp = layer.mlp
    inter = mlp.gate_proj.out_features
    gate_up = linear(g, x, [mlp.gate_proj, mlp.up_proj], f"{p}.gate_up_proj", et, quant,
                     bias=spec.mlp_bias)
    gate, up = g.op("Split", gate_up, g.const([inter, inter]), axis=-1, outputs=2)
    act = activation(g, gate, "silu", et)
    return g.op("Add", hidden, linear(g, g.op("Mul", act, up), mlp.down_proj,
                                     f"{p}.down_proj", et, quant, bias=spec.mlp_bias))


def _score_outputs(g, i, q, k_pre_rope, criterion, geometry, et) -> None:
    """The last position's query [1,1,H,hd]; FEATHER also needs the keys before RoPE
    (heads-first [1,kvh,S,hd], like ``present.{i}.key``)."""
    heads, kv_heads, head_dim = geometry
    last = g.op("Slice", q, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1]))
    g.output(last, f"score_query.{i}", et, [1, 1, heads, head_dim])
    if criterion == "feather":
        g.output(heads_first(g, k_pre_rope), f"score_keys.{i}", et, [1, kv_heads, "seq", head_dim])
