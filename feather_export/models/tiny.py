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
    """Geometry of a tiny LLaVA built in-process with deterministic weights."""

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


TINY_MODELS: dict[str, TinySpec] = {
    # CLIP 336 px / patch 14 -> 24 x 24 = 576 image tokens, like LLaVA-1.5; Llama MHA.
    "tiny": TinySpec(336, 14, 32, 2, 4, 64, 4, 4, 4, 128, 10000.0),
    # 224 px -> 16 x 16 grid, grouped-query attention, a different rope theta, 8 layers.
    "tiny-gqa": TinySpec(224, 14, 32, 2, 4, 96, 8, 6, 2, 192, 500000.0),
}


def tiny_llava_config(name: str):
    """The ``LlavaConfig`` of a registered tiny model (vocabulary from the tiny tokenizer)."""
    from feather_export.models.tokenizer import build_tiny_tokenizer

    if name not in TINY_MODELS:
        raise FeatherError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    return small_llava_config(TINY_MODELS[name], build_tiny_tokenizer())


def small_llava_config(spec, tok, initializer_range: float | None = None):
    """A ``LlavaConfig`` (CLIP ViT + Llama, default RoPE) from a ``TinySpec``-like geometry and a
    tokenizer built by ``tiny_tokenizer.build_bpe_tokenizer`` (vocabulary and special ids)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    init = {} if initializer_range is None else {"initializer_range": initializer_range}
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden)
    text = LlamaConfig(
        hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, vocab_size=tok.get_vocab_size(with_added_tokens=True),
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"), **init)
    grid = spec.image_size // spec.patch_size
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tok.token_to_id("<image>"),
                       image_seq_length=grid * grid, tie_word_embeddings=False, **init)


def build_tiny_model(name: str):
    """A tiny ``LlavaForConditionalGeneration`` with deterministic, well-spread weights.

    Weights are scaled 1/sqrt(fan_in) (not the 0.02 default) so attention is peaked and pruning
    scores are well separated, which keeps kept-index comparisons meaningful.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(name)
    model = LlavaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(TINY_SEED + sum(map(ord, name)))

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    with torch.no_grad():
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.Embedding):
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

    from feather_export.models.tokenizer import save_tiny_tokenizer

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FeatherError(f"{out} exists and is not empty; choose a new directory")
    model = build_tiny_model(name)
    quiet_transformers()
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tiny_tokenizer(tmp)
        write_preprocessor_config(tmp, TINY_MODELS[name].image_size)
    return out
