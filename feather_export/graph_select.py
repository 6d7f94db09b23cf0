"""The ``select_K`` segments: scoring in standard ops, then one ``feather::SelectTokens`` node.

Decoder criteria (FEATHER, FastV) recompute layer K-1's ``input_layernorm``, ``q_proj`` (last
position only) and ``k_proj`` from ``layer_input.{K-1}``; dot products and softmax run in fp32.
FasterVLM (K = 0) selects image features with the vision segment's ``cls_scores``.
"""
from __future__ import annotations

import numpy as np

from .config import Stage
from .graph_decoder import attn_geometry, inv_freq
from .onnx_graph import GraphBuilder
from .onnx_layers import (F32, apply_rope, attention_probs, dim, heads_first, linear, rms_norm,
                          rope_tables, split_heads)
from .select_op import select_function, select_node

SELECT_OUTPUTS = ["kept", "pruned_hidden_states", "pruned_position_ids"]


def build_select(model, stage: Stage, side: int, et: int):
    if stage.criterion == "fastervlm":
        return _build_vision_select(model, stage, side, et)
    lm = model.model.language_model
    cfg = lm.config
    heads, kv_heads, head_dim = attn_geometry(cfg)
    d, n, src = cfg.hidden_size, stage.num_in, stage.layer - 1
    g = GraphBuilder(f"select_{stage.layer}")
    layer_in = g.input(f"layer_input.{src}", et, [1, "seq", d])
    hidden = g.input("hidden_states", et, [1, "seq", d])
    positions = g.input("position_ids", 7, [1, "seq"])
    start = g.input("image_start", 7, [])
    layer = lm.layers[src]
    p = f"layers.{src}"
    x = rms_norm(g, layer_in, layer.input_layernorm, f"{p}.input_layernorm", et)
    last = g.op("Slice", x, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1]))
    q = split_heads(g, linear(g, last, layer.self_attn.q_proj, f"{p}.q_proj", et), heads, head_dim)
    image_rows = g.op("Add", g.op("Range", g.const(0), g.const(n), g.const(1)), start)
    if stage.criterion == "feather":            # no rotary embedding, keys = current image tokens
        keys = g.op("Gather", x, image_rows, axis=1)
        k = split_heads(g, linear(g, keys, layer.self_attn.k_proj, f"{p}.k_proj", et),
                        kv_heads, head_dim)
    else:                                       # fastv: RoPE, keys = the whole causal row
        k = split_heads(g, linear(g, x, layer.self_attn.k_proj, f"{p}.k_proj", et), kv_heads, head_dim)
        cos, sin = rope_tables(g, positions, inv_freq(cfg, head_dim), F32)
        last_pos = g.op("Sub", dim(g, positions, 1), g.const(1))
        cos_q, sin_q = (g.op("Unsqueeze", g.op("Gather", t, last_pos, axis=1), g.const([1]))
                        for t in (cos, sin))
        q = apply_rope(g, g.op("Cast", q, to=F32), cos_q, sin_q, head_dim)
        k = apply_rope(g, g.op("Cast", k, to=F32), cos, sin, head_dim)
    q, k = heads_first(g, g.op("Cast", q, to=F32)), heads_first(g, g.op("Cast", k, to=F32))
    probs = attention_probs(g, q, k, heads // kv_heads, kv_heads, head_dim, None)  # [1,kvh,g,1,T]
    scores = g.op("Reshape", g.op("ReduceMean", probs, axes=[0, 1, 2, 3], keepdims=0), g.const([-1]))
    if stage.criterion == "fastv":
        scores = g.op("Gather", scores, image_rows, axis=0)
    scores = g.op("Identity", scores, outputs=["scores"])
    outs = [f"{name}_sel" for name in SELECT_OUTPUTS]
    select_node(g, scores, hidden, positions, start, budget=stage.keep, num_image_tokens=n,
                grid_side=side, grid_stride=stage.grid_stride, criterion=stage.criterion,
                outputs=outs, name=f"SelectTokens_{stage.layer}")
    for src_name, name, shape, t in zip(outs, SELECT_OUTPUTS,
                                        ([stage.keep], [1, "pruned_seq", d], [1, "pruned_seq"]),
                                        (7, et, 7)):
        g.output(src_name, name, t, shape)
    g.output(scores, "scores", F32, [n])
    return g.model([select_function()])


def _build_vision_select(model, stage: Stage, side: int, et: int):
    d = model.config.text_config.hidden_size
    n = stage.num_in
    g = GraphBuilder("select_0")
    scores = g.input("cls_scores", F32, [n])
    features = g.input("image_features", et, [1, n, d])
    positions = g.const(np.arange(n, dtype=np.int64)[None])
    select_node(g, scores, features, positions, g.const(0), budget=stage.keep, num_image_tokens=n,
                grid_side=side, grid_stride=0, criterion="fastervlm",
                outputs=["kept_sel", "features_sel", "unused_positions"], name="SelectTokens_0")
    g.output("kept_sel", "kept", 7, [stage.keep])
    g.output("features_sel", "pruned_image_features", et, [1, stage.keep, d])
    return g.model([select_function()])
