"""The tiny in-process model registry: small LLaVAs with deterministic weights, for tests."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from feather_export.errors import FeatherError
from feather_export.files import staged_dir
from feather_export.models.checkpoint import quiet_transformers


TINY_SEED = 20261121


@dataclass(frozen=True)
class TinySpec:
    """Geometry of a tiny LLaVA built in-process with deterministic weights.

    The family fields name transformers' own config classes (``models.family`` lists them);
    ``text_extra`` holds further text-config settings as (key, value) pairs.
    """

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rope_theta: float
    text: str = "llama"                      # llama | mistral | qwen2
    vision: str = "clip"                     # clip | siglip
    head_dim: int | None = None              # None: hidden // heads
    rope: tuple = ()                         # extra rope_parameters, e.g. (("rope_type", "linear"), ...)
    feature_layer: int | tuple[int, ...] = -2
    strategy: str = "default"
    tied: bool = False
    text_extra: tuple = ()
    chat: tuple[str, str] | None = None      # (models.chat.TINY_CHAT_TEMPLATES key, where stored)
    pinpoints: tuple[tuple[int, int], ...] = ()   # LLaVA-NeXT (anyres) grid pinpoints (H, W)


TINY_MODELS: dict[str, TinySpec] = {
    # CLIP 336 px / patch 14 -> 24 x 24 = 576 image tokens, like LLaVA-1.5; Llama MHA.
    "tiny": TinySpec(336, 14, 32, 2, 4, 64, 4, 4, 4, 128, 10000.0),
    # 224 px -> 16 x 16 grid, grouped-query attention, a different rope theta, 8 layers.
    "tiny-gqa": TinySpec(224, 14, 32, 2, 4, 96, 8, 6, 2, 192, 500000.0),
    # bakLlava-like: Mistral (GQA, an explicit head_dim wider than hidden/heads, a sliding window
    # longer than any artifact sequence), linear rope scaling; CLIP, two feature layers concatenated.
    "tiny-mistral": TinySpec(224, 14, 32, 3, 4, 64, 4, 4, 2, 128, 1000000.0, text="mistral",
                             head_dim=24, rope=(("rope_type", "linear"), ("factor", 2.0)),
                             feature_layer=(-3, -2), text_extra=(("sliding_window", 8192),),
                             chat=("inst", "tokenizer_config")),
    # llava-interleave-qwen-like: Qwen2 (q/k/v biases, MQA, tied embeddings) + SigLIP, layer -1,
    # strategy full (SigLIP has no CLS: every patch is an image token).
    "tiny-qwen2-siglip": TinySpec(192, 16, 32, 2, 4, 64, 4, 4, 1, 128, 1000000.0, text="qwen2",
                                  vision="siglip", feature_layer=-1, strategy="full", tied=True,
                                  chat=("chatml", "chat_template.json")),
    # Llama with attention and MLP biases and llama3 rope scaling + SigLIP with a list of
    # feature layers under strategy full.
    "tiny-llama-siglip": TinySpec(224, 16, 32, 3, 4, 64, 4, 4, 2, 128, 500000.0, vision="siglip",
                                  rope=(("rope_type", "llama3"), ("factor", 8.0),
                                        ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                                        ("original_max_position_embeddings", 64)),
                                  feature_layer=(-3, -1), strategy="full",
                                  text_extra=(("attention_bias", True), ("mlp_bias", True)),
                                  chat=("llava", "chat_template.jinja")),
    # CLIP under strategy full: the CLS is image token 0, before the 16 x 16 raster (N = 257);
    # two feature layers concatenated; Llama with GQA; LLaVA's template in chat_template.json.
    "tiny-clip-full": TinySpec(224, 14, 32, 3, 4, 64, 4, 4, 2, 128, 10000.0,
                               feature_layer=(-3, -1), strategy="full",
                               chat=("llava", "chat_template.json")),
    # llava-v1.6-mistral-like LLaVA-NeXT (anyres): CLIP 112 px / patch 14 -> 8 x 8 patches per crop,
    # llava-v1.6's pinpoints scaled by 112/336; Mistral without a sliding window, [INST] template.
    # 224x224: 64 + 16 x 16 + 16 newlines = 336 image tokens.
    "tiny-next": TinySpec(112, 14, 32, 2, 4, 64, 4, 4, 2, 128, 1000000.0, text="mistral",
                          text_extra=(("sliding_window", None),),
                          chat=("inst", "chat_template.json"),
                          pinpoints=((112, 224), (224, 112), (224, 224), (336, 112), (112, 336))),
}

FAMILY_TINY_MODELS = ("tiny-mistral", "tiny-qwen2-siglip", "tiny-llama-siglip", "tiny-clip-full")
NEXT_TINY_MODELS = ("tiny-next",)


def tiny_llava_config(name: str):
    """The ``LlavaConfig`` of a registered tiny model (vocabulary from the tiny tokenizer)."""
    from feather_export.models.tokenizer import build_tiny_tokenizer

    if name not in TINY_MODELS:
        raise FeatherError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    return small_llava_config(TINY_MODELS[name], build_tiny_tokenizer())


def small_llava_config(spec, tok, initializer_range: float | None = None):
    """A ``LlavaConfig`` from a ``TinySpec``-like geometry (family fields optional: CLIP + Llama,
    default RoPE) and a tokenizer built by ``tiny_tokenizer.build_bpe_tokenizer``."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig,
                              Qwen2Config, SiglipVisionConfig)

    init = {} if initializer_range is None else {"initializer_range": initializer_range}
    vision_cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[
        getattr(spec, "vision", "clip")]
    vision_extra = {"projection_dim": spec.vision_hidden} if vision_cls is CLIPVisionConfig else {}
    vision = vision_cls(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, **vision_extra)
    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[
        getattr(spec, "text", "llama")]
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, **dict(getattr(spec, "rope", ()))}
    head_dim = getattr(spec, "head_dim", None)
    tied = getattr(spec, "tied", False)
    text = text_cls(
        hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, vocab_size=tok.get_vocab_size(with_added_tokens=True),
        max_position_embeddings=4096, rope_parameters=rope, tie_word_embeddings=tied,
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"), **({"head_dim": head_dim} if head_dim else {}),
        **dict(getattr(spec, "text_extra", ())), **init)
    from feather_export.models.geometry import geometry_of

    feature_layer = getattr(spec, "feature_layer", -2)
    pinpoints = getattr(spec, "pinpoints", ())
    config_cls, extra = LlavaConfig, {}
    if pinpoints:
        from transformers import LlavaNextConfig

        config_cls, extra = LlavaNextConfig, {"image_grid_pinpoints": [list(p) for p in pinpoints]}
    config = config_cls(vision_config=vision, text_config=text,
                        image_token_index=tok.token_to_id("<image>"), tie_word_embeddings=tied,
                        vision_feature_layer=list(feature_layer) if isinstance(feature_layer, tuple)
                        else feature_layer,
                        vision_feature_select_strategy=getattr(spec, "strategy", "default"),
                        **extra, **init)
    # LLaVA: every image token (the CLS too under full); LLaVA-NeXT: the patches of one crop
    config.image_seq_length = ((spec.image_size // spec.patch_size) ** 2 if pinpoints
                               else geometry_of(config).num_image_tokens)
    return config


def build_tiny_model(name: str):
    """A tiny ``LlavaForConditionalGeneration`` with deterministic, well-spread weights.

    Weights are scaled 1/sqrt(fan_in) (not the 0.02 default) so attention is peaked and pruning
    scores are well separated, which keeps kept-index comparisons meaningful.
    """
    import torch
    import transformers

    from feather_export.models.family import model_kind

    config = tiny_llava_config(name)
    model = getattr(transformers, model_kind(config).model_class)(config)
    gen = torch.Generator().manual_seed(TINY_SEED + sum(map(ord, name)))

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    with torch.no_grad():
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.Embedding) or pname == "image_newline":
                    p.copy_(normal(p.shape, 1.0))
                elif pname == "weight" and p.dim() >= 2:  # Linear / Conv: 1/sqrt(fan_in)
                    p.copy_(normal(p.shape, p[0].numel() ** -0.5))
                elif pname == "weight":                  # norms: around 1
                    p.copy_(1.0 + normal(p.shape, 0.1))
                else:                                    # biases, class embedding
                    p.copy_(normal(p.shape, 0.1))
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


def make_tiny(name: str, out_dir: str | os.PathLike) -> Path:
    """Write a tiny model as a complete checkpoint directory (weights, tokenizer, preprocessor)."""
    from feather_runtime.preprocess import write_preprocessor_config

    from feather_export.models.chat import TINY_CHAT_TEMPLATES, write_chat_template
    from feather_export.models.family import vision_spec
    from feather_export.models.tokenizer import save_tiny_tokenizer

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FeatherError(f"{out} exists and is not empty; choose a new directory")
    model = build_tiny_model(name)
    quiet_transformers()
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tiny_tokenizer(tmp)
        write_preprocessor_config(tmp, TINY_MODELS[name].image_size,
                                  vision_spec(model.config).processors[0],
                                  pinpoints=TINY_MODELS[name].pinpoints)
        if TINY_MODELS[name].chat is not None:
            chat, location = TINY_MODELS[name].chat
            write_chat_template(tmp, TINY_CHAT_TEMPLATES[chat], location)
    return out
