"""The ``select_K`` segments: scoring in standard ops, then one ``feather::SelectTokens`` node.

Decoder criteria (FEATHER, FastV) score with what layer K-1 already computed, output by the span
before: the last position's query and the keys (FEATHER: before RoPE, image rows gathered here;
FastV: RoPE'd, the cached ``present.{K-1}.key``). Dot products and softmax run in fp32; no
projection is recomputed and no weight is duplicated.
FasterVLM (K = 0) selects image features with the vision segment's ``cls_scores``.
BTP scores like FastV (RoPE'd query and ``present.{K-1}.key``, but pre-softmax logits over the image
keys) and also takes the image rows of the span's hidden states, into one ``feather::SelectBalanced``
(``btp_op.py``); its 0-count stage is a plain gather.
"""
from __future__ import annotations

import numpy as np

from feather_export.methods.config import Stage
from feather_export.onnx.decoder import attn_geometry
from feather_export.onnx.graph import GraphBuilder
from feather_export.onnx.layers import F32, attention_logits, attention_probs, heads_first
from feather_export.onnx.select_op import select_function, select_node

SELECT_OUTPUTS = ["kept", "pruned_hidden_states", "pruned_position_ids"]
BTP_FILL = "loop"          # the greedy fill as an ONNX Loop (see benchmarks/btp_fill.py)


def score_input_names(stage: Stage) -> tuple[str, str]:
    """The span outputs a select segment scores with: (query, keys)."""
    src = stage.layer - 1
    keys = f"score_keys.{src}" if stage.criterion == "feather" else f"present.{src}.key"
    return f"score_query.{src}", keys


def _layout(layout):
    """(side, geometry or None) from a ``ModelGeometry`` or a square raster's side."""
    from feather_export.models.geometry import ModelGeometry

    if isinstance(layout, ModelGeometry):
        return layout.grid_side, (None if layout.single_raster else layout)
    return int(layout), None


def build_select(model, stage: Stage, layout, et: int):
    """``layout``: the model's ``ModelGeometry`` (or one square raster's side). One square raster
    uses the op's grid attributes; other layouts (LLaVA-NeXT) force their grid with a constant mask
    in standard ops before the op (forced tokens rank as +inf, ``grid_stride`` 0 on the node)."""
    side, geo = _layout(layout)
    if stage.criterion == "fastervlm":
        return _build_vision_select(model, stage, side, et, geo)
    if stage.criterion == "btp":
        return build_btp_select(model, stage, side, et)
    g, (query, keys, hidden, positions, start, image_rows), (heads, kv_heads, head_dim, d) = \
        _span_select_inputs(model, stage, et)
    n = stage.num_in
    if stage.criterion == "feather":            # no rotary embedding, keys = current image tokens
        keys = g.op("Gather", keys, image_rows, axis=2)
    q, k = heads_first(g, g.op("Cast", query, to=F32)), g.op("Cast", keys, to=F32)
    probs = attention_probs(g, q, k, heads // kv_heads, kv_heads, head_dim, None)  # [1,kvh,g,1,T]
    scores = g.op("Reshape", g.op("ReduceMean", probs, axes=[0, 1, 2, 3], keepdims=0), g.const([-1]))
    if stage.criterion == "fastv":              # RoPE'd keys of the whole causal row: image columns
        scores = g.op("Gather", scores, image_rows, axis=0)
    scores = g.op("Identity", scores, outputs=["scores"])
    outs = [f"{name}_sel" for name in SELECT_OUTPUTS]
    ranked, stride = scores, stage.grid_stride
    if geo is not None and stride > 0:          # several rasters: the united grid as a mask
        ranked = g.op("Where", g.const(geo.grid_mask(stride), bool),
                      g.const(np.inf, np.float32), scores)
        stride = 0
    select_node(g, ranked, hidden, positions, start, budget=stage.keep, num_image_tokens=n,
                grid_side=side, grid_stride=stride, criterion=stage.criterion,
                outputs=outs, name=f"SelectTokens_{stage.layer}", raster_offset=stage.raster_offset)
    _outputs(g, outs, stage.keep, d, et)
    g.output(scores, "scores", F32, [n])
    return g.model([select_function()])


def _span_select_inputs(model, stage: Stage, et: int):
    """A select graph's inputs from the span before it, and the current image rows."""
    cfg = model.config.text_config
    heads, kv_heads, head_dim = attn_geometry(cfg)
    d, n = cfg.hidden_size, stage.num_in
    g = GraphBuilder(f"select_{stage.layer}")
    query_name, keys_name = score_input_names(stage)
    query = g.input(query_name, et, [1, 1, heads, head_dim])
    keys = g.input(keys_name, et, [1, kv_heads, "seq", head_dim])           # heads-first
    hidden = g.input("hidden_states", et, [1, "seq", d])
    positions = g.input("position_ids", 7, [1, "seq"])
    start = g.input("image_start", 7, [])
    image_rows = g.op("Add", g.op("Range", g.const(0), g.const(n), g.const(1)), start)
    return g, (query, keys, hidden, positions, start, image_rows), (heads, kv_heads, head_dim, d)


def _outputs(g: GraphBuilder, sources, keep: int, d: int, et: int) -> None:
    for src_name, name, shape, t in zip(sources, SELECT_OUTPUTS,
                                        ([keep], [1, "pruned_seq", d], [1, "pruned_seq"]),
                                        (7, et, 7)):
        g.output(src_name, name, t, shape)


def build_btp_select(model, stage: Stage, side: int, et: int, fill: str = BTP_FILL):
    """BTP (docs/design.md §4): pre-softmax RoPE logits of the last token over the image keys (mean over
    heads) and the image rows of the hidden states entering layer K, into one
    ``feather::SelectBalanced``; a 0-count stage drops every image row (no op: nothing to select)."""
    from feather_export.methods.selection import farthest_point_seed
    from feather_export.onnx.btp_op import balanced_function, balanced_node, seed_priority

    if stage.keep == 0:
        return _build_drop_all(model, stage, et)
    g, (query, keys, hidden, positions, start, image_rows), (heads, kv_heads, head_dim, d) = \
        _span_select_inputs(model, stage, et)
    n = stage.num_in
    outs = [f"{name}_sel" for name in SELECT_OUTPUTS]
    keys = g.op("Gather", keys, image_rows, axis=2)                 # RoPE'd image keys
    q, k = heads_first(g, g.op("Cast", query, to=F32)), g.op("Cast", keys, to=F32)
    logits = attention_logits(g, q, k, heads // kv_heads, kv_heads, head_dim)   # [1,kvh,g,1,n]
    logits = g.op("Reshape", g.op("ReduceMean", logits, axes=[0, 1, 2, 3], keepdims=0),
                  g.const([-1]))
    logits = g.op("Identity", logits, outputs=["scores"])
    features = g.op("Reshape", g.op("Cast", g.op("Gather", hidden, image_rows, axis=1), to=F32),
                    g.const([n, d]))
    seed = (farthest_point_seed(side, stage.seed_count, stage.raster_offset)
            if stage.seed_count else [])
    balanced_node(g, logits, features, g.const(seed_priority(n, seed), np.float32), hidden,
                  positions, start, budget=stage.keep, num_image_tokens=n,
                  attention_count=stage.attention_count, candidate_count=stage.candidate_count,
                  outputs=outs, name=f"SelectBalanced_{stage.layer}")
    _outputs(g, outs, stage.keep, d, et)
    g.output(logits, "scores", F32, [n])
    steps = stage.keep - stage.attention_count
    return g.model([balanced_function(fill, steps if fill == "unrolled" else None)])


def _build_drop_all(model, stage: Stage, et: int):
    """A 0-count stage: every image row is dropped (text rows in order), ``kept`` is empty."""
    d, n = model.config.text_config.hidden_size, stage.num_in
    g = GraphBuilder(f"select_{stage.layer}")
    hidden = g.input("hidden_states", et, [1, "seq", d])
    positions = g.input("position_ids", 7, [1, "seq"])
    start = g.input("image_start", 7, [])
    seq = g.op("Gather", g.op("Shape", hidden), g.const(1), axis=0)
    text_rows = g.op("Concat", g.op("Range", g.const(0), start, g.const(1)),
                     g.op("Range", g.op("Add", start, g.const(n)), seq, g.const(1)), axis=0)
    sources = [g.op("Identity", g.const(np.zeros(0, np.int64))),
               g.op("Gather", hidden, text_rows, axis=1), g.op("Gather", positions, text_rows, axis=1)]
    _outputs(g, sources, 0, d, et)
    return g.model()


def _per_crop_ranking(g: GraphBuilder, scores: str, geo, per_crop: int) -> str:
    """FasterVLM on crops (LLaVA-NeXT): a TopK of ``per_crop`` in each crop (rows of a constant
    [crops, patches] index table, ascending, so ties go to the lower index) and every newline
    become 1, the rest 0; the op's TopK of ``keep`` then takes exactly those, ascending."""
    table = np.stack(geo.crops()).astype(np.int64)                     # [C, P]
    by_crop = g.op("Gather", scores, g.const(table), axis=0)              # [C, P]
    _, top = g.op("TopK", by_crop, g.const(np.array([per_crop], np.int64)), axis=1, largest=1,
                  sorted=1, outputs=2)
    picked = g.op("Reshape", g.op("GatherElements", g.const(table), top, axis=1), g.const([-1]))
    free = geo.free_indices()
    base = np.zeros(geo.num_image_tokens, np.float32)
    base[free] = 1.0
    ones = g.const(np.ones(table.shape[0] * per_crop), np.float32)
    return g.op("ScatterElements", g.const(base, np.float32), picked, ones, axis=0)


def _build_vision_select(model, stage: Stage, side: int, et: int, geo=None):
    d = model.config.text_config.hidden_size
    n = stage.num_in
    g = GraphBuilder("select_0")
    scores = g.input("cls_scores", F32, [n])
    features = g.input("image_features", et, [1, n, d])
    positions = g.const(np.arange(n, dtype=np.int64)[None])
    if stage.per_crop:
        scores = _per_crop_ranking(g, scores, geo, stage.per_crop)
    select_node(g, scores, features, positions, g.const(0), budget=stage.keep, num_image_tokens=n,
                grid_side=side, grid_stride=0, criterion="fastervlm",
                outputs=["kept_sel", "features_sel", "unused_positions"], name="SelectTokens_0",
                raster_offset=stage.raster_offset)
    g.output("kept_sel", "kept", 7, [stage.keep])
    g.output("features_sel", "pruned_image_features", et, [1, stage.keep, d])
    return g.model([select_function()])
