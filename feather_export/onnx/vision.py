"""The ``vision`` segment: CLIP up to ``vision_feature_layer``, CLS dropped, projector.

Also outputs ``cls_scores`` [N]: the CLS query's attention over CLS + patches in the last layer run,
mean over heads, patch columns (FasterVLM's criterion), taken from probabilities computed anyway.
"""
from __future__ import annotations


from feather_export.errors import FeatherError
from feather_export.onnx.graph import DTYPES, GraphBuilder
from feather_export.onnx.layers import (F32, activation, attend, attention_probs, cast, layer_norm,
                                        linear, heads_first, split_heads)

BF16 = DTYPES["bf16"]


def _clip_model(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def feature_layer_count(model) -> int:
    """How many CLIP layers run: hidden_states[f] is the output of layer f-1."""
    num = model.config.vision_config.num_hidden_layers
    index = model.config.vision_feature_layer % (num + 1)
    if index < 1:
        raise FeatherError("vision_feature_layer must select the output of a CLIP layer")
    return index


def build_vision(model, et: int):
    vcfg = model.config.vision_config
    clip = _clip_model(model)
    size, patch = vcfg.image_size, vcfg.patch_size
    side = size // patch
    n, c, heads = side * side, vcfg.hidden_size, vcfg.num_attention_heads
    head_dim = c // heads
    g = GraphBuilder("vision")
    pixels = g.input("pixel_values", F32, [1, 3, size, size])
    emb = clip.embeddings
    conv_type = F32 if et == BF16 else et      # ONNX Conv has no bfloat16 before opset 22
    x = g.op("Conv", cast(g, pixels, F32, conv_type), g.weight("patch_embedding.weight",
             emb.patch_embedding.weight, conv_type), kernel_shape=[patch, patch],
             strides=[patch, patch])
    x = cast(g, x, conv_type, et)
    x = g.op("Transpose", g.op("Reshape", x, g.const([1, c, n])), perm=[0, 2, 1])
    cls = g.weight("class_embedding", emb.class_embedding.reshape(1, 1, c), et)
    x = g.op("Concat", cls, x, axis=1)
    x = g.op("Add", x, g.weight("position_embedding", emb.position_embedding.weight[None], et))
    x = layer_norm(g, x, clip.pre_layrnorm, "pre_layrnorm", et)
    count = feature_layer_count(model)
    for i in range(count):
        layer, p = clip.encoder.layers[i], f"vision.layers.{i}"
        h = layer_norm(g, x, layer.layer_norm1, f"{p}.layer_norm1", et)
        a = layer.self_attn
        qkv = linear(g, h, [a.q_proj, a.k_proj, a.v_proj], f"{p}.qkv_proj", et)
        q, k, v = (heads_first(g, split_heads(g, t, heads, head_dim))
                   for t in g.op("Split", qkv, g.const([c, c, c]), axis=-1, outputs=3))
        probs = attention_probs(g, q, k, 1, heads, head_dim, None)      # [1, H, 1, 1+N, 1+N]
        x = g.op("Add", x, linear(g, attend(g, probs, v, heads, head_dim, et), a.out_proj,
                                  f"{p}.out_proj", et))
        h = layer_norm(g, x, layer.layer_norm2, f"{p}.layer_norm2", et)
        h = activation(g, linear(g, h, layer.mlp.fc1, f"{p}.fc1", et), vcfg.hidden_act, et)
        x = g.op("Add", x, linear(g, h, layer.mlp.fc2, f"{p}.fc2", et))
    cls_row = g.op("Gather", probs, g.const(0), axis=3)                   # [1, H, 1, 1+N]
    patch_cols = g.op("Slice", cls_row, g.const([1]), g.const([1 + n]), g.const([3]))
    scores = g.op("Reshape", g.op("ReduceMean", patch_cols, axes=[0, 1, 2], keepdims=0),
                  g.const([n]))
    patches = g.op("Slice", x, g.const([1]), g.const([1 + n]), g.const([1]))
    proj = model.model.multi_modal_projector
    act = getattr(model.config, "projector_hidden_act", "gelu")
    y = activation(g, linear(g, patches, proj.linear_1, "projector.linear_1", et), act, et)
    y = linear(g, y, proj.linear_2, "projector.linear_2", et)
    g.output(y, "image_features", et, [1, n, model.config.text_config.hidden_size])
    g.output(scores, "cls_scores", F32, [n])
    return g.model()
