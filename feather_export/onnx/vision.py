"""The ``vision`` segment: the vision tower (CLIP or SigLIP, per ``models.family``) up to the
deepest ``vision_feature_layer``, the feature layers concatenated as transformers does (CLS
dropped under strategy ``default``; kept, first, under ``full``), then the projector.

Also outputs ``cls_scores`` [N], FasterVLM's criterion (DESIGN §4), taken from the attention
probabilities of the last layer run, which are computed anyway: a CLS tower scores each patch by
the CLS query's attention (mean over heads, image-token columns: the CLS's own column too under
``full``); SigLIP (no CLS) by the attention each patch *receives* (mean over heads and over all
queries).
"""
from __future__ import annotations


from feather_export.models.family import vision_spec
from feather_export.models.weights import PROJECTOR
from feather_export.onnx.graph import DTYPES, GraphBuilder
from feather_export.onnx.layers import (F32, activation, cast, heads_first, layer_norm, linear,
                                        self_attention, split_heads)

BF16 = DTYPES["bf16"]


def build_vision(w, et: int, store=None, on_layer=None):
    """From the weight source ``w`` (``models.weights``), one layer at a time; ``store``: where
    initializers stream; ``on_layer(i)`` after layer i is built (progress)."""
    spec = vision_spec(w.config)
    vcfg = w.config.vision_config
    size, patch = vcfg.image_size, vcfg.patch_size
    n = (size // patch) ** 2
    first, count = spec.image_token_span(n)        # the image tokens: [first, first + count)
    g = GraphBuilder("vision", store=store)
    pixels = g.input("pixel_values", F32, [1, 3, size, size])
    hidden_states, probs = tower_hidden_states(g, w, pixels, 1, et, on_layer)
    if spec.cls_token:                          # the CLS query's row, image-token columns
        row = g.op("Gather", probs, g.const(0), axis=3)                 # [1, H, 1, 1+N]
        cols = g.op("Slice", row, g.const([first]), g.const([first + count]), g.const([3]))
        scores = g.op("ReduceMean", cols, axes=[0, 1, 2], keepdims=0)
    else:                                       # attention received: mean over heads, queries
        scores = g.op("ReduceMean", probs, axes=[0, 1, 2, 3], keepdims=0)
    scores = g.op("Reshape", scores, g.const([count]))
    y = project_features(g, w, spec, hidden_states, first, count, et)
    g.output(y, "image_features", et, [1, count, w.config.text_config.hidden_size])
    g.output(scores, "cls_scores", F32, [count])
    return g.model()


def tower_hidden_states(g: GraphBuilder, w, pixels: str, batch: int, et: int, on_layer=None):
    """The vision tower (weights by name from ``w``) on ``pixels`` f32 [batch, 3, size, size] up
    to the deepest feature layer: ({hidden_states index: [batch, T, c]}, the last layer's
    attention probabilities). With batch > 1 (LLaVA-NeXT's crops) the batch is folded into the
    heads for attention: probabilities [1, batch x heads, 1, T, T], crop-major."""
    spec = vision_spec(w.config)
    vcfg = w.config.vision_config
    tower = w.vision_prefix
    eps = vcfg.layer_norm_eps
    size, patch = vcfg.image_size, vcfg.patch_size
    n, c, heads = (size // patch) ** 2, vcfg.hidden_size, vcfg.num_attention_heads
    head_dim = c // heads
    emb = f"{tower}.embeddings"
    conv_type = F32 if et == BF16 else et      # ONNX Conv has no bfloat16 before opset 22
    conv_inputs = [cast(g, pixels, F32, conv_type),
                   g.weight("patch_embedding.weight", w.get(f"{emb}.patch_embedding.weight"),
                            conv_type)]
    if spec.patch_bias:
        conv_inputs.append(g.weight("patch_embedding.bias", w.get(f"{emb}.patch_embedding.bias"),
                                    conv_type))
    x = g.op("Conv", *conv_inputs, kernel_shape=[patch, patch], strides=[patch, patch])
    x = cast(g, x, conv_type, et)
    x = g.op("Transpose", g.op("Reshape", x, g.const([batch, c, n])), perm=[0, 2, 1])
    if spec.cls_token:
        cls = g.weight("class_embedding", w.get(f"{emb}.class_embedding").reshape(1, 1, c), et)
        if batch > 1:
            cls = g.op("Expand", cls, g.const([batch, 1, c]))
        x = g.op("Concat", cls, x, axis=1)
    x = g.op("Add", x, g.weight("position_embedding",
                                w.get(f"{emb}.position_embedding.weight")[None], et))
    if spec.pre_norm:
        x = layer_norm(g, x, w, f"{tower}.{spec.pre_norm}", spec.pre_norm, et, eps)
    hidden_states, probs = {0: x}, None
    fold = (lambda t: t) if batch == 1 else (
        lambda t: g.op("Reshape", t, g.const([1, batch * heads, -1, head_dim])))
    for i in range(spec.run_layers):
        layer, p = f"{tower}.encoder.layers.{i}", f"vision.layers.{i}"
        h = layer_norm(g, x, w, f"{layer}.layer_norm1", f"{p}.layer_norm1", et, eps)
        a = f"{layer}.self_attn"
        qkv = linear(g, h, w, [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], f"{p}.qkv_proj", et)
        q, k, v = (fold(heads_first(g, split_heads(g, t, heads, head_dim)))
                   for t in g.op("Split", qkv, g.const([c, c, c]), axis=-1, outputs=3))
        ctx, probs = self_attention(g, q, k, v, head_dim, et)    # [1, T, B*c], [1, BH, T, T]
        if batch > 1:                                                        # -> [B, T, c]
            ctx = g.op("Transpose", g.op("Reshape", ctx, g.const([-1, batch, c])), perm=[1, 0, 2])
        x = g.op("Add", x, linear(g, ctx, w, f"{a}.out_proj", f"{p}.out_proj", et))
        h = layer_norm(g, x, w, f"{layer}.layer_norm2", f"{p}.layer_norm2", et, eps)
        h = activation(g, linear(g, h, w, f"{layer}.mlp.fc1", f"{p}.fc1", et), vcfg.hidden_act, et)
        x = g.op("Add", x, linear(g, h, w, f"{layer}.mlp.fc2", f"{p}.fc2", et))
        hidden_states[i + 1] = x
        if on_layer:
            on_layer(i)
    return hidden_states, g.op("Unsqueeze", probs, g.const([2]))         # [1, BH, 1, T, T]


def project_features(g, w, spec, hidden_states: dict, first: int, count: int, et: int) -> str:
    """Rows [first, first + count) of each feature layer's hidden states, concatenated along
    the width as transformers does, through the projector (linear, activation, linear)."""
    picked = [g.op("Slice", hidden_states[f], g.const([first]), g.const([first + count]),
                   g.const([1])) for f in spec.feature_layers]
    features = picked[0] if len(picked) == 1 else g.op("Concat", *picked, axis=-1)
    act = getattr(w.config, "projector_hidden_act", "gelu")
    y = activation(g, linear(g, features, w, f"{PROJECTOR}.linear_1", "projector.linear_1", et),
                   act, et)
    return linear(g, y, w, f"{PROJECTOR}.linear_2", "projector.linear_2", et)
