"""The llava-hf family, declared once: what each text and vision model type computes.

Every consumer reads these specs instead of branching on ``model_type``: the refusal checks
(``check_config``, run on ``config.json`` before any weight is read), the ONNX graph builders,
the PyTorch reference and the manifest (which tells the torch-free runtime how to preprocess).
A family missing from the tables, or a setting of a known family the builders do not reproduce
exactly, is refused with one line naming it.

The tables follow transformers' own modules (``modeling_llama``, ``modeling_mistral``,
``modeling_qwen2``, ``modeling_clip``, ``modeling_siglip``):

- text: where the linear layers have biases (a bool, or the config attribute that switches it),
  whether a sliding attention window can apply (and the attribute that switches it on), the
  rotary kinds reproduced exactly;
- vision: whether the tower prepends a CLS token, has a pre-encoder LayerNorm, a patch-embedding
  bias, and which image processor prepares its input.
"""
from __future__ import annotations

from dataclasses import dataclass

from feather_export.errors import FeatherError

ROPE_TYPES = ("default", "linear", "llama3")
FEATURE_STRATEGIES = ("default", "full")


@dataclass(frozen=True)
class TextFamily:
    """One decoder family. Bias fields: True/False, or the name of the config flag that sets it."""

    model_type: str
    qkv_bias: bool | str
    o_bias: bool | str
    mlp_bias: bool | str
    window: str | None = None            # config attribute holding the sliding window, if any
    window_switch: str | None = None     # config flag that must be true for the window to apply


@dataclass(frozen=True)
class VisionFamily:
    model_type: str
    cls_token: bool              # a class embedding is prepended (index 0 of every hidden state)
    pre_norm: str | None         # attribute of the pre-encoder LayerNorm, if the tower has one
    patch_bias: bool             # the patch-embedding Conv has a bias
    processors: tuple[str, ...]  # image_processor_type values that prepare its input


TEXT_FAMILIES: dict[str, TextFamily] = {
    "llama": TextFamily("llama", qkv_bias="attention_bias", o_bias="attention_bias",
                        mlp_bias="mlp_bias"),
    "mistral": TextFamily("mistral", qkv_bias=False, o_bias=False, mlp_bias=False,
                          window="sliding_window"),
    "qwen2": TextFamily("qwen2", qkv_bias=True, o_bias=False, mlp_bias=False,
                        window="sliding_window", window_switch="use_sliding_window"),
}

VISION_FAMILIES: dict[str, VisionFamily] = {
    "clip_vision_model": VisionFamily(
        "clip_vision_model", cls_token=True, pre_norm="pre_layrnorm", patch_bias=False,
        processors=("CLIPImageProcessor", "CLIPImageProcessorPil", "CLIPImageProcessorFast")),
    "siglip_vision_model": VisionFamily(
        "siglip_vision_model", cls_token=False, pre_norm=None, patch_bias=True,
        processors=("SiglipImageProcessor", "SiglipImageProcessorPil", "SiglipImageProcessorFast")),
}


@dataclass(frozen=True)
class ModelKind:
    """One top-level checkpoint class (``model_type``): what wraps the text and vision models."""

    model_type: str
    model_class: str                 # transformers' ForConditionalGeneration class
    config_class: str                # transformers' config class
    vision_families: tuple[str, ...]  # towers supported under it
    anyres: bool = False             # LLaVA-NeXT: crops + stitched raster for one pinpoint
    processors: tuple[str, ...] = ()  # image processors of the whole model (empty: the tower's)


MODEL_KINDS: dict[str, ModelKind] = {
    "llava": ModelKind("llava", "LlavaForConditionalGeneration", "LlavaConfig",
                       tuple(VISION_FAMILIES)),
    "llava_next": ModelKind("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextConfig",
                            ("clip_vision_model",), anyres=True,
                            processors=("LlavaNextImageProcessor", "LlavaNextImageProcessorPil",
                                        "LlavaNextImageProcessorFast")),
}


def _get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _flag(config, value: bool | str) -> bool:
    return bool(_get(config, value, False)) if isinstance(value, str) else value


@dataclass(frozen=True)
class TextSpec:
    """A decoder's resolved spec: its family's choices applied to one config."""

    family: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_type: str
    sliding_window: int | None        # the window that applies, None if attention is global
    tied_embeddings: bool


@dataclass(frozen=True)
class VisionSpec:
    family: str
    cls_token: bool
    pre_norm: str | None
    patch_bias: bool
    feature_layers: tuple[int, ...]   # hidden_states indices (0 = embeddings), concatenated
    keep_cls: bool                    # strategy ``full`` on a CLS tower: CLS is an image token
    processors: tuple[str, ...]       # image processors that prepare its input (first: default)

    @property
    def run_layers(self) -> int:
        """Encoder layers that run: up to the deepest feature layer."""
        return max(self.feature_layers)

    @property
    def raster_offset(self) -> int:
        """Image tokens before the patch raster: 1 (the CLS) under ``full`` on a CLIP tower."""
        return 1 if self.keep_cls else 0

    def image_token_span(self, raster_tokens: int) -> tuple[int, int]:
        """(index of the first image token in the tower's hidden states, image-token count N):
        ``default`` drops the CLS (index 0); ``full`` keeps every position, CLS first."""
        first = 1 if self.cls_token and not self.keep_cls else 0
        return first, self.raster_offset + raster_tokens


def _family(config, key: str, default: str, table: dict, what: str):
    """(sub-config, its model_type, its family) for ``config[key]``; refuses unknown types."""
    sub = _get(config, key) or {}
    kind = _get(sub, "model_type", default)
    if kind not in table:
        raise FeatherError(f"{what} model {kind!r} is not supported (supported: "
                           f"{', '.join(table)})")
    return sub, kind, table[kind]


def text_spec(config) -> TextSpec:
    """The spec of the text model of a ``LlavaConfig`` (or its config.json dict); refuses what
    the exporter does not reproduce exactly."""
    text, kind, family = _family(config, "text_config", "llama", TEXT_FAMILIES, "text")
    rope = _get(text, "rope_parameters") or _get(text, "rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    if rope_type not in ROPE_TYPES:
        raise FeatherError(f"rotary scaling {rope_type!r} is not supported (supported: "
                           f"{', '.join(ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", _get(text, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise FeatherError(f"partial_rotary_factor {partial} is not supported (rotary on the "
                           "whole head only)")
    act = _get(text, "hidden_act", "silu")
    if act != "silu":
        raise FeatherError(f"decoder activation {act!r} is not supported (silu only)")
    window = _get(text, family.window) if family.window else None
    if family.window_switch and not _get(text, family.window_switch, False):
        window = None
    tied = _get(config, "tie_word_embeddings", None)
    if tied is None:
        tied = _get(text, "tie_word_embeddings", False)
    return TextSpec(kind, _flag(text, family.qkv_bias), _flag(text, family.o_bias),
                    _flag(text, family.mlp_bias), rope_type, window, bool(tied))


def vision_spec(config) -> VisionSpec:
    """The spec of the vision tower and feature selection of a ``LlavaConfig`` (or dict)."""
    vision, kind, family = _family(config, "vision_config", "clip_vision_model",
                                   VISION_FAMILIES, "vision")
    strategy = _get(config, "vision_feature_select_strategy", "default")
    if strategy not in FEATURE_STRATEGIES:
        raise FeatherError(f"vision_feature_select_strategy {strategy!r} is not supported "
                           f"({' or '.join(FEATURE_STRATEGIES)})")
    if strategy == "default" and not family.cls_token:
        raise FeatherError(f"{kind} has no CLS token: vision_feature_select_strategy 'default' "
                           "would drop a patch and leave no square raster; use 'full'")
    num = _get(vision, "num_hidden_layers", 24)
    layer = _get(config, "vision_feature_layer", -2)
    layers = [layer] if isinstance(layer, int) and not isinstance(layer, bool) else layer
    if not isinstance(layers, (list, tuple)) or not layers or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise FeatherError(f"vision_feature_layer {layer!r} must be an int or a list of ints")
    resolved = []
    for x in layers:
        if not -(num + 1) <= x <= num:
            raise FeatherError(f"vision_feature_layer {x} is outside the {num}-layer vision tower")
        index = x % (num + 1)
        if index < 1:
            raise FeatherError(f"vision_feature_layer {x} selects the embeddings, not the output "
                               "of a vision layer")
        resolved.append(index)
    processors = MODEL_KINDS.get(_get(config, "model_type", "llava"), MODEL_KINDS["llava"]).processors
    return VisionSpec(kind, family.cls_token, family.pre_norm, family.patch_bias, tuple(resolved),
                      keep_cls=strategy == "full" and family.cls_token,
                      processors=processors or family.processors)


def model_kind(config) -> ModelKind:
    """The checkpoint class of a config (object or config.json dict); refuses unknown ones."""
    kind = _get(config, "model_type", "llava")
    if kind not in MODEL_KINDS:
        listed = " and ".join(f"{k!r} ({v.model_class})" for k, v in MODEL_KINDS.items())
        raise FeatherError(f"model_type {kind!r} is not supported; only {listed} checkpoints are")
    return MODEL_KINDS[kind]


def llava_class(config, part: str = "model_class"):
    """transformers' class of a config's model kind: its ForConditionalGeneration class, or with
    ``part="config_class"`` its config class."""
    import transformers

    return getattr(transformers, getattr(model_kind(config), part))


def check_config(config, *, max_sequence: int | None = None,
                 resolution=None) -> tuple[TextSpec, VisionSpec]:
    """Refuse anything the exporter does not reproduce, from the config alone (no weights).

    ``max_sequence`` is the artifact's longest sequence (image + text + new tokens): a sliding
    window shorter than it would change attention, which the graphs do not implement, so such a
    window is refused. ``resolution`` (LLaVA-NeXT only: ``"HxW"`` or (H, W)) is the pinpoint the
    artifact is exported for (default: the largest square one).
    """
    kind = model_kind(config)
    text, vision = text_spec(config), vision_spec(config)
    if vision.family not in kind.vision_families:
        raise FeatherError(f"{kind.model_type} with a {vision.family} tower is not supported "
                           f"(supported: {', '.join(kind.vision_families)})")
    if kind.anyres:
        from feather_export.models.anyres import anyres_plan

        anyres_plan(config, resolution)
    elif resolution is not None:
        raise FeatherError("--resolution applies to LLaVA-NeXT (llava_next) checkpoints only; "
                           f"this one is {kind.model_type!r} with a fixed input size")
    if (max_sequence is not None and text.sliding_window is not None
            and text.sliding_window < max_sequence):
        raise FeatherError(
            f"{text.family} sliding_window {text.sliding_window} is shorter than the artifact's "
            f"longest sequence ({max_sequence} = image + --max-text-tokens + --max-new-tokens); "
            "sliding-window attention is not implemented: lower those limits below the window")
    return text, vision


def rope_inv_freq(text_config):
    """fp32 numpy inverse frequencies of the decoder's rotary embedding, by transformers' own
    initialisers (``default``, ``linear``, ``llama3``: attention scaling 1)."""
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    spec_type = text_spec({"text_config": text_config}).rope_type
    if spec_type == "default":
        inv, scale = _default_rope(text_config)
    else:
        inv, scale = ROPE_INIT_FUNCTIONS[spec_type](text_config, None)
    if scale != 1.0:
        raise FeatherError(f"rotary {spec_type!r} with attention scaling {scale} is not supported")
    return np.asarray(inv.float().numpy(), dtype=np.float32)


def _default_rope(text_config):
    """transformers' default rotary initialiser (each model class carries its own copy)."""
    import torch

    rope = getattr(text_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
    head_dim = (getattr(text_config, "head_dim", None)
                or text_config.hidden_size // text_config.num_attention_heads)
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv, 1.0


def vision_encoder(model):
    """The module of a loaded LLaVA's tower holding ``embeddings`` and ``encoder`` (CLIP wraps it
    in ``vision_model``; SigLIP is it)."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)
