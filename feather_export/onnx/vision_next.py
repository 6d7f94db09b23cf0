"""The LLaVA-NeXT ``vision`` segment for one pinpoint (docs/design.md §3): the base image and every
crop as one static batch through the tower (``vision.tower_hidden_states``), the projector, then
the image sequence exactly as transformers packs it for an image of the pinpoint's aspect ratio:
the base raster, then the crops stitched into one raster with ``image_newline`` after each row.

Inputs:  ``pixel_values`` f32 [1, crops, 3, s, s] (the runtime's letterboxed crops).
Outputs: ``image_features`` [1, N, d]; ``cls_scores`` f32 [N]: each patch's CLS attention in its
         own crop (FasterVLM per crop), 0 on newlines.

The stitching is one ``Gather`` with a constant index table built from ``ModelGeometry.crops()``
(crop c's patch p -> its place in the sequence; newlines -> the ``image_newline`` row), so the
layout lives in one place, the geometry.
"""
from __future__ import annotations

import numpy as np

from feather_export.models.family import vision_spec
from feather_export.models.geometry import ModelGeometry
from feather_export.models.weights import NEWLINE
from feather_export.onnx.graph import GraphBuilder
from feather_export.onnx.layers import F32
from feather_export.onnx.vision import project_features, tower_hidden_states


def sequence_sources(geo: ModelGeometry) -> np.ndarray:
    """For each image-token position, its row in [crop 0's patches, crop 1's, ..., the newline]."""
    crops = geo.crops()
    per = len(crops[0])
    source = np.full(geo.num_image_tokens, len(crops) * per, np.int64)      # newline row
    for c, index in enumerate(crops):
        source[index] = c * per + np.arange(per)
    return source


def build_next_vision(w, geo: ModelGeometry, et: int, store=None, on_layer=None):
    """From the weight source ``w`` (``models.weights``): tower, projector, ``image_newline``."""
    spec = vision_spec(w.config)
    vcfg = w.config.vision_config
    size = vcfg.image_size
    crops, per = len(geo.crops()), geo.crop_side ** 2
    heads, d, n = vcfg.num_attention_heads, w.config.text_config.hidden_size, geo.num_image_tokens
    first = 1 if spec.cls_token else 0
    g = GraphBuilder("vision", store=store)
    pixels = g.input("pixel_values", F32, [1, crops, 3, size, size])
    batch = g.op("Reshape", pixels, g.const([crops, 3, size, size]))
    hidden_states, probs = tower_hidden_states(g, w, batch, crops, et, on_layer)
    source = g.const(sequence_sources(geo))
    # FasterVLM: each crop's CLS query row over its own patches, mean over heads -> [crops * per]
    tokens = first + per
    probs = g.op("Reshape", probs, g.const([crops, heads, tokens, tokens]))
    row = g.op("Gather", probs, g.const(0), axis=2)                       # [C, H, T]
    cols = g.op("Slice", row, g.const([first]), g.const([first + per]), g.const([2]))
    scores = g.op("Reshape", g.op("ReduceMean", cols, axes=[1], keepdims=0), g.const([-1]))
    scores = g.op("Concat", scores, g.const(np.zeros(1, np.float32), np.float32), axis=0)
    scores = g.op("Gather", scores, source, axis=0)                       # [N], newlines 0
    y = project_features(g, w, spec, hidden_states, first, per, et)          # [C, per, d]
    newline = g.weight("image_newline", w.get(NEWLINE).reshape(1, d), et)
    rows = g.op("Concat", g.op("Reshape", y, g.const([crops * per, d])), newline, axis=0)
    y = g.op("Unsqueeze", g.op("Gather", rows, source, axis=0), g.const([0]))
    g.output(y, "image_features", et, [1, n, d])
    g.output(scores, "cls_scores", F32, [n])
    return g.model()
