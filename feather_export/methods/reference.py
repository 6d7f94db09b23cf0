"""PyTorch reference of the pruning methods (docs/design.md §3-§4): the oracle exported engines are tested against.

Batch 1, greedy decoding with a KV cache, run through transformers' own layer modules. Layers after a
prune point cache only the kept tokens; kept tokens keep their original positions (FasterVLM: the
shortened sequence has contiguous positions) and decoding continues after the last position.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from feather_export.methods.config import PruneConfig, Stage
from feather_export.errors import FeatherError
from feather_export.models.geometry import ModelGeometry, geometry_of
from feather_export.methods.selection import (btp_select, farthest_point_seed, grid_mask,
                                              select_per_crop, select_tokens)


@dataclass
class ReferenceResult:
    token_ids: list[int]                       # generated tokens (EOS included when reached)
    kept: list[list[int]]                      # original image indices kept, per stage
    first_logits: "object" = None              # float32 [vocab] logits of the first new token
    scores: list[np.ndarray] = field(default_factory=list)   # per-stage scores (current image set)


def resolve_prune_config(model, method="none", budget=None, schedule=None, stride=None,
                         config: PruneConfig | None = None, btp_lambda=None,
                         resolution=None) -> PruneConfig:
    if config is not None:
        return config
    return PruneConfig.create(method, geometry_of(model.config, resolution), budget=budget,
                              schedule=schedule, stride=stride, btp_lambda=btp_lambda)


def image_span(input_ids, image_token_id: int, num_image: int) -> int:
    """Start index of the single contiguous block of ``num_image`` image tokens in ``input_ids``."""
    where = np.flatnonzero(np.asarray(input_ids).reshape(-1) == image_token_id)
    if len(where) != num_image or (len(where) and where[-1] - where[0] != num_image - 1):
        raise FeatherError(
            f"the prompt must hold one contiguous block of {num_image} image tokens "
            f"(id {image_token_id}); found {len(where)}")
    return int(where[0])


def select_stage(stage: Stage, scores, layout, features=None) -> np.ndarray:
    """The kept ranks of one stage; ``layout`` is the model's ``ModelGeometry`` (or, for one square
    raster, its side). The forced grid (stage 1 of FEATHER) covers every raster; FasterVLM on crops
    keeps ``per_crop`` per crop and every newline."""
    geo = layout if isinstance(layout, ModelGeometry) else None
    side = geo.grid_side if geo is not None else int(layout)
    scores = scores.detach().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores)
    if stage.criterion == "btp":
        seed = (farthest_point_seed(side, stage.seed_count, stage.raster_offset)
                if stage.seed_count else None)
        return btp_select(scores, features, stage.keep,
                          stage.attention_count, stage.candidate_count, seed)
    if stage.per_crop:
        return select_per_crop(scores, geo.crops(), stage.per_crop, geo.free_indices())
    if geo is not None and not geo.single_raster and stage.num_in == geo.num_image_tokens:
        forced = geo.grid_mask(stage.grid_stride)
    else:
        forced = grid_mask(stage.num_in, side, stage.grid_stride, stage.raster_offset)
    return select_tokens(scores, stage.keep, forced)


def gather_sequence(tensor, start: int, num_image: int, kept: np.ndarray):
    import torch

    index = np.concatenate([np.arange(start), start + kept,
                            np.arange(start + num_image, tensor.shape[1])])
    return tensor[:, torch.as_tensor(index)]


def _causal_mask(length: int, dtype):
    import torch

    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def reference_generate(model, pixel_values, input_ids, method: str = "none", budget=None,
                       schedule=None, stride=None, max_new_tokens: int = 16,
                       config: PruneConfig | None = None, btp_lambda=None,
                       resolution=None) -> ReferenceResult:
    """Greedy generation with pruning as docs/design.md §4 specifies.

    ``pixel_values``: float [1, 3, H, W] (LLaVA-NeXT: [1, crops, 3, h, w], the crops of an image
    letterboxed to the pinpoint ``resolution``, default the largest square one); ``input_ids``: int
    [1, T] with the image token expanded to N copies. Returns generated token ids and the kept
    original image indices per stage.
    """
    import torch
    from transformers import DynamicCache

    from feather_export.methods.scoring import btp_logits, fastv_scores, feather_scores

    cfg = resolve_prune_config(model, method, budget, schedule, stride, config, btp_lambda,
                               resolution)
    geo = geometry_of(model.config, resolution)
    input_ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).reshape(1, -1)
    pixel_values = torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32)
    start = image_span(input_ids, model.config.image_token_index, geo.num_image_tokens)
    lm = model.model.language_model
    result = ReferenceResult([], [])
    original = np.arange(geo.num_image_tokens)

    with torch.no_grad():
        features, cls_scores = vision_features(model, pixel_values, geo)
        hidden = lm.embed_tokens(input_ids)
        hidden = torch.cat([hidden[:, :start], features.to(hidden.dtype),
                            hidden[:, start + geo.num_image_tokens:]], dim=1)
        positions = torch.arange(hidden.shape[1])[None]
        stages = {s.layer: s for s in cfg.stages if s.criterion != "fastervlm"}
        num_image = geo.num_image_tokens
        if cfg.method == "fastervlm":
            stage = cfg.stages[0]
            kept = select_stage(stage, cls_scores, geo)
            result.scores.append(cls_scores.numpy())
            hidden = gather_sequence(hidden, start, num_image, kept)
            positions = torch.arange(hidden.shape[1])[None]
            original, num_image = original[kept], stage.keep
            result.kept.append(original.tolist())

        cache = DynamicCache()
        layer_input = None
        for index, layer in enumerate(lm.layers):
            stage = stages.get(index)
            if stage is not None:
                prev = lm.layers[index - 1]
                features = None
                if stage.criterion == "feather":
                    scores = feather_scores(prev, layer_input, start, num_image)
                elif stage.criterion == "btp":       # + the hidden states entering layer K
                    scores = btp_logits(prev, lm.rotary_emb, layer_input, positions, start, num_image)
                    features = hidden[0, start:start + num_image].float().numpy()
                else:
                    scores = fastv_scores(prev, lm.rotary_emb, layer_input, positions,
                                          start, num_image)
                kept = select_stage(stage, scores, geo, features)
                result.scores.append(scores.numpy())
                hidden = gather_sequence(hidden, start, num_image, kept)
                positions = gather_sequence(positions, start, num_image, kept)
                original, num_image = original[kept], stage.keep
                result.kept.append(original.tolist())
            layer_input = hidden
            hidden = run_layer(layer, lm.rotary_emb, hidden, positions, cache,
                            _causal_mask(hidden.shape[1], hidden.dtype))

        logits = lm_logits(model, hidden[:, -1:])
        result.first_logits = logits.float().clone()
        eos = _eos_ids(model)
        next_pos = int(positions[0, -1]) + 1
        for _ in range(max_new_tokens):
            token = int(torch.argmax(logits))
            result.token_ids.append(token)
            if token in eos or len(result.token_ids) == max_new_tokens:
                break
            hidden = lm.embed_tokens(torch.tensor([[token]]))
            pos = torch.tensor([[next_pos]])
            for layer in lm.layers:
                hidden = run_layer(layer, lm.rotary_emb, hidden, pos, cache, None)
            logits = lm_logits(model, hidden)
            next_pos += 1
    return result


def vision_features(model, pixel_values, geometry: ModelGeometry | None = None):
    """Projected image features [1, N, d] by transformers' own ``get_image_features`` (feature
    layers concatenated, CLS dropped or kept per strategy; LLaVA-NeXT: base raster, then the
    stitched raster with its newlines, for an image of the geometry's pinpoint size), and
    FasterVLM's scores [N] in the deepest feature layer (``models.family`` says whether the tower
    has a CLS token). With crops, each patch is scored in its own crop and newlines score 0."""
    import torch

    from feather_export.methods.scoring import fastervlm_scores
    from feather_export.models.family import vision_encoder, vision_spec

    spec = vision_spec(model.config)
    geo = geometry if geometry is not None else geometry_of(model.config)
    extra = {"image_sizes": torch.tensor([geo.image_size])} if geo.crop_side else {}
    out = model.model.get_image_features(pixel_values, output_hidden_states=True,
                                         return_dict=True, **extra)
    features = out.pooler_output[0][None]
    layer = vision_encoder(model).encoder.layers[spec.run_layers - 1]
    hidden = out.hidden_states[spec.run_layers - 1]              # [crops or 1, T, d]
    if not geo.crop_side:
        return features, fastervlm_scores(layer, hidden, spec.cls_token, spec.keep_cls)
    scores = torch.zeros(geo.num_image_tokens, dtype=torch.float32)
    for crop, index in enumerate(geo.crops()):
        scores[torch.as_tensor(index)] = fastervlm_scores(layer, hidden[crop:crop + 1],
                                                          spec.cls_token, spec.keep_cls)
    return features, scores


def run_layer(layer, rotary, hidden, positions, cache, mask):
    pos_emb = rotary(hidden, positions)
    out = layer(hidden, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, position_embeddings=pos_emb)
    return out[0] if isinstance(out, tuple) else out


def lm_logits(model, hidden):
    lm = model.model.language_model
    return model.lm_head(lm.norm(hidden))[0, -1]


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.text_config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
