"""LLaVA checkpoints: the tiny in-process registry and loading of local checkpoint directories.

A checkpoint directory is the Hugging Face ``LlavaForConditionalGeneration`` layout: ``config.json``,
safetensors weights, ``tokenizer.json`` and ``preprocessor_config.json``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import ModelGeometry
from .errors import FeatherError

TINY_SEED = 20261121
# trained checkpoints shipped inside the package, by name (feather_export/train_tiny.py made them)
TINY_SHAPES_DIR = Path(__file__).resolve().parent / "assets" / "tiny-shapes"
BUILTIN_CHECKPOINTS: dict[str, Path] = {"tiny-shapes": TINY_SHAPES_DIR}


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
    from .tiny_tokenizer import build_tiny_tokenizer

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

    from .tiny_tokenizer import save_tiny_tokenizer

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FeatherError(f"{out} exists and is not empty; choose a new directory")
    model = build_tiny_model(name)
    _quiet_transformers()
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tiny_tokenizer(tmp)
        write_preprocessor_config(tmp, TINY_MODELS[name].image_size)
    return out


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yield a fresh sibling temp dir to write into; on success it becomes ``out`` (absent or
    empty), on any error it is removed, so nothing half-written is left at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def geometry_of(config) -> ModelGeometry:
    """The pruning geometry of a ``LlavaConfig`` (refuses layouts the exporter does not handle)."""
    vision = config.vision_config
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise FeatherError("only vision_feature_select_strategy='default' (CLS dropped) is supported")
    if not isinstance(config.vision_feature_layer, int):
        raise FeatherError("a list of vision_feature_layer values is not supported; use one layer")
    side = vision.image_size // vision.patch_size
    return ModelGeometry(config.text_config.num_hidden_layers, side * side, side)


def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FeatherError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise FeatherError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise FeatherError(f"{cfg_file} does not hold a JSON object")
    return cfg


def check_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a LLaVA checkpoint we can export, before loading any weights."""
    path = Path(path)
    if not path.exists():
        raise FeatherError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise FeatherError(f"--model {path} is not a directory (or a tiny model name)")
    cfg = _read_config(path)
    if cfg.get("model_type") != "llava":
        raise FeatherError(
            f"{path} holds model_type {cfg.get('model_type')!r}; only 'llava' "
            "(LlavaForConditionalGeneration) checkpoints are supported")
    text_type = (cfg.get("text_config") or {}).get("model_type", "llama")
    vision_type = (cfg.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if text_type != "llama":
        raise FeatherError(f"{path}: text model {text_type!r} is not supported (llama only)")
    if vision_type != "clip_vision_model":
        raise FeatherError(f"{path}: vision model {vision_type!r} is not supported (CLIP only)")
    if not list(path.glob("*.safetensors")):
        raise FeatherError(f"{path} has no *.safetensors weights")
    for name in ("tokenizer.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise FeatherError(f"{path} has no {name}; the artifact needs it to run on its own")
    return path


def _quiet_transformers() -> None:
    """Our CLI shows its own progress; transformers' per-shard bars would interleave with it."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_checkpoint(path: str | os.PathLike):
    """Load a local LLaVA checkpoint directory as an fp32 ``LlavaForConditionalGeneration``."""
    from transformers import LlavaForConditionalGeneration

    _quiet_transformers()
    path = check_checkpoint_dir(path)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype="float32")
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad checkpoint to the user
        raise FeatherError(f"could not load the checkpoint in {path}: {exc}") from None
    geometry_of(model.config)
    return model.eval()


def load_config(spec: str | os.PathLike):
    """The ``LlavaConfig`` of a model name or a checkpoint directory, without any weights."""
    from transformers import LlavaConfig

    from .shapes import SHAPE_MODELS, shape_llava_config

    if str(spec) in TINY_MODELS:
        return tiny_llava_config(str(spec))
    if str(spec) in SHAPE_MODELS:
        return shape_llava_config(str(spec))
    path = check_checkpoint_dir(checkpoint_path(spec))
    try:
        return LlavaConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects is a bad checkpoint
        raise FeatherError(f"could not read the config in {path}: {exc}") from None


def checkpoint_path(spec: str | os.PathLike) -> Path:
    """The directory of a built-in trained checkpoint name (``tiny-shapes``), else ``spec`` itself."""
    if str(spec) in BUILTIN_CHECKPOINTS:
        path = BUILTIN_CHECKPOINTS[str(spec)]
        if not (path / "model.safetensors").is_file():
            raise FeatherError(f"the built-in {spec} checkpoint is missing from {path} (a broken "
                               "install?); retrain it with python -m feather_export.train_tiny")
        return path
    return Path(spec)


def resolve_model(spec: str | os.PathLike):
    """``spec`` is a tiny or shape-only model name (random weights, built in-process), the trained
    built-in ``tiny-shapes`` or a checkpoint directory; returns (model, source_dir or None)."""
    from .shapes import SHAPE_MODELS, build_shape_model

    if str(spec) in TINY_MODELS:
        return build_tiny_model(str(spec)), None
    if str(spec) in SHAPE_MODELS:
        return build_shape_model(str(spec)), None
    path = checkpoint_path(spec)
    return load_checkpoint(path), path
