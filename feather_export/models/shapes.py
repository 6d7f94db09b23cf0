"""Shape-only LLaVA configs: real geometry with deterministic random weights, for benchmarks.

GPU runs measure LLaVA-1.5-7B/13B geometry without downloading a checkpoint; CPU runs use a ~1.2B
LLaVA-shaped model (CLIP-L/14-336 vision + a TinyLlama-sized 16-layer decoder) that fits a 2-core,
24 GiB machine in fp32. The tokenizer is the tiny in-process one (ids < 500, inside every vocab
here). Answers are noise; only the shapes matter. EOS is disabled in the exported manifest so a
benchmark generates exactly the number of tokens it asks for.

``feather_export.export.shapes.export_shape_artifacts`` builds a model once and exports several
artifacts from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from feather_export.errors import FeatherError

SHAPE_SEED = 20261206
INIT_STD = 0.02          # initializer_range of llava-hf configs: keeps fp16 activations in range


@dataclass(frozen=True)
class ShapeSpec:
    """Geometry of a LLaVA-1.5-style model (CLIP vision tower + 2-layer GELU projector + Llama)."""

    description: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_feature_layer: int = -2
    rope_theta: float = 10000.0
    text: str = "llama"                 # llama | mistral | qwen2 (models.family)
    vision: str = "clip"                # clip | siglip
    strategy: str = "default"           # vision_feature_select_strategy
    tied: bool = False                  # lm_head tied to the embeddings
    pinpoints: tuple = ()               # LLaVA-NeXT (anyres) grid pinpoints (H, W)

    @property
    def num_image_tokens(self) -> int:
        """Patches of one crop (LLaVA-NeXT: see ``models.anyres`` for the whole plan)."""
        return (self.image_size // self.patch_size) ** 2


_CLIP_L_336 = dict(image_size=336, patch_size=14, vision_hidden=1024, vision_intermediate=4096,
                   vision_layers=24, vision_heads=16)

SHAPE_MODELS: dict[str, ShapeSpec] = {
    "shape-llava-1.5-7b": ShapeSpec(
        "LLaVA-1.5-7B geometry: CLIP-L/14-336 (24 layers, feature layer -2) + Llama-2-7B "
        "(32 layers, hidden 4096, 32 heads, FFN 11008, vocab 32064)",
        **_CLIP_L_336, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
        vocab=32064),
    "shape-llava-1.5-13b": ShapeSpec(
        "LLaVA-1.5-13B geometry: CLIP-L/14-336 + Llama-2-13B (40 layers, hidden 5120, 40 heads, "
        "FFN 13824, vocab 32064)",
        **_CLIP_L_336, hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824,
        vocab=32064),
    "shape-llava-1b": ShapeSpec(
        "~1.2B LLaVA-shaped model for CPU: CLIP-L/14-336 (576 image tokens) + a TinyLlama-sized "
        "Llama (16 layers, hidden 2048, 16 heads, FFN 5632, vocab 32064)",
        **_CLIP_L_336, hidden=2048, layers=16, heads=16, kv_heads=16, intermediate=5632,
        vocab=32064),
    "shape-llava-interleave-qwen-0.5b": ShapeSpec(
        "llava-interleave-qwen-0.5b-hf geometry: SigLIP-so400m/14-384 (26 layers, width 1152, "
        "FFN 4304; 27 x 27 = 729 image tokens, feature layer -1, strategy full) + Qwen1.5-0.5B "
        "(Qwen2 class: 24 layers, hidden 1024, 16 heads, FFN 2816, q/k/v biases, tied "
        "embeddings, vocab 152000)",
        image_size=384, patch_size=14, vision_hidden=1152, vision_intermediate=4304,
        vision_layers=26, vision_heads=16, hidden=1024, layers=24, heads=16, kv_heads=16,
        intermediate=2816, vocab=152000, vision_feature_layer=-1, rope_theta=1000000.0,
        text="qwen2", vision="siglip", strategy="full", tied=True),
    "shape-llava-next-cpu": ShapeSpec(
        "LLaVA-NeXT token plan for CPU benchmarks: CLIP 336/14 crops (a 4-layer width-512 tower, "
        "feature layer -2) x 5 at 672x672 + 48 newlines = 2,928 image tokens, llava-v1.6's "
        "pinpoints; a Mistral-shaped decoder (8 layers, hidden 1024, 16 heads, 8 KV heads, FFN "
        "2816, vocab 32064, no sliding window)",
        image_size=336, patch_size=14, vision_hidden=512, vision_intermediate=2048,
        vision_layers=4, vision_heads=8, hidden=1024, layers=8, heads=16, kv_heads=8,
        intermediate=2816, vocab=32064, rope_theta=1000000.0, text="mistral",
        pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))),
}


def shape_spec(name: str) -> ShapeSpec:
    if name not in SHAPE_MODELS:
        raise FeatherError(f"unknown shape model {name!r}; choose one of {', '.join(SHAPE_MODELS)}")
    return SHAPE_MODELS[name]


def shape_llava_config(name: str):
    """The ``LlavaConfig`` (``LlavaNextConfig`` with pinpoints) of a shape model (no weights)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig,
                              MistralConfig, Qwen2Config, SiglipVisionConfig)

    from feather_export.models.tokenizer import (BOS_TOKEN_ID, EOS_TOKEN_ID, IMAGE_TOKEN_ID,
                                                 PAD_TOKEN_ID, TINY_VOCAB_SIZE)

    spec = shape_spec(name)
    if spec.vocab < TINY_VOCAB_SIZE:
        raise FeatherError(f"{name}: vocab {spec.vocab} is smaller than the tiny tokenizer's")
    vision_common = dict(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size)
    if spec.vision == "siglip":
        vision = SiglipVisionConfig(**vision_common, hidden_act="gelu_pytorch_tanh",
                                    layer_norm_eps=1e-6, vision_use_head=False)
    else:
        vision = CLIPVisionConfig(**vision_common, projection_dim=768, hidden_act="quick_gelu")
    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[spec.text]
    text_extra = {"sliding_window": None} if spec.text == "mistral" else {}
    text = text_cls(
        hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab, max_position_embeddings=4096,
        rms_norm_eps=1e-5 if spec.text == "llama" else 1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tied, **text_extra,
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID)
    config_cls, extra = LlavaConfig, {}
    if spec.pinpoints:
        config_cls, extra = LlavaNextConfig, {"image_grid_pinpoints": [list(p) for p in spec.pinpoints]}
    return config_cls(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                      image_seq_length=spec.num_image_tokens,
                      vision_feature_layer=spec.vision_feature_layer,
                      vision_feature_select_strategy=spec.strategy,
                      projector_hidden_act="gelu", tie_word_embeddings=spec.tied, **extra)


def shape_weights(name: str):
    """The shape model's weights as a ``ShapeWeights`` source: each tensor generated on request
    from a seed of the model and the tensor's name (export streams them; nothing is held)."""
    from feather_export.models.weights import ShapeWeights

    return ShapeWeights(name, shape_llava_config(name), SHAPE_SEED + sum(map(ord, name)), INIT_STD)


def build_shape_model(name: str, progress: Callable[[str], None] | None = None):
    """A ``LlavaForConditionalGeneration`` (``LlavaNext...`` with pinpoints) of the shape, fp32,
    with ``shape_weights(name)``
    (the same tensors a streamed export writes).

    EOS is cleared from the generation config: an artifact exported from it never stops early.
    """
    from transformers.initialization import no_init_weights

    from feather_export.models.family import llava_class
    from feather_export.models.weights import fill_model

    say = progress or (lambda msg: None)
    weights = shape_weights(name)
    with no_init_weights():                 # allocation only; the weights are filled below
        model = llava_class(weights.config)(weights.config)
    count = sum(p.numel() for p in model.parameters())
    say(f"filling {count / 1e9:.2f}B random parameters of {name}")
    fill_model(model, weights)
    model.generation_config.pad_token_id = weights.config.text_config.pad_token_id
    model.generation_config.eos_token_id = None
    return model.eval()
