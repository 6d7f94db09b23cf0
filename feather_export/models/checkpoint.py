"""Local LLaVA checkpoint directories and model names: check, read the config, load the weights.

A checkpoint directory is the Hugging Face ``LlavaForConditionalGeneration`` (or
``LlavaNextForConditionalGeneration``) layout: ``config.json``,
safetensors weights, ``tokenizer.json`` and ``preprocessor_config.json``. A model *name* is a tiny or
shape-only model built in-process, or the trained built-in ``tiny-shapes``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from feather_export.errors import FeatherError
from feather_export.models.family import check_config, llava_class
from feather_export.models.geometry import geometry_of

# trained checkpoints shipped inside the package, by name (feather_export/train_tiny.py made them)
TINY_SHAPES_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-shapes"


BUILTIN_CHECKPOINTS: dict[str, Path] = {"tiny-shapes": TINY_SHAPES_DIR}


def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FeatherError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    return _read_json(cfg_file)


def _read_json(cfg_file: Path) -> dict:
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
    try:
        _, vision = check_config(cfg)
    except FeatherError as exc:
        raise FeatherError(f"{path}: {exc}") from None
    if not list(path.glob("*.safetensors")):
        raise FeatherError(f"{path} has no *.safetensors weights")
    for name in ("tokenizer.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise FeatherError(f"{path} has no {name}; the artifact needs it to run on its own")
    processor = _read_json(path / "preprocessor_config.json").get("image_processor_type",
                                                                   vision.processors[0])
    if processor not in vision.processors:
        raise FeatherError(f"{path}: image_processor_type {processor!r} does not prepare a "
                           f"{vision.family} tower ({' or '.join(vision.processors[:1])} does)")
    return path


def quiet_transformers() -> None:
    """Our CLI shows its own progress; transformers' per-shard bars would interleave with it."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_checkpoint(path: str | os.PathLike):
    """Load a local LLaVA checkpoint directory as an fp32 ``LlavaForConditionalGeneration``
    (``LlavaNextForConditionalGeneration`` for ``llava_next``)."""
    quiet_transformers()
    path = check_checkpoint_dir(path)
    try:
        model = llava_class(_read_config(path)).from_pretrained(path, dtype="float32")
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad checkpoint to the user
        raise FeatherError(f"could not load the checkpoint in {path}: {exc}") from None
    geometry_of(model.config)
    return model.eval()


def load_config(spec: str | os.PathLike):
    """The ``LlavaConfig`` (``LlavaNextConfig``) of a model name or a checkpoint directory, without
    any weights."""
    from feather_export.models.shapes import SHAPE_MODELS, shape_llava_config
    from feather_export.models.tiny import TINY_MODELS, tiny_llava_config

    if str(spec) in TINY_MODELS:
        return tiny_llava_config(str(spec))
    if str(spec) in SHAPE_MODELS:
        return shape_llava_config(str(spec))
    path = check_checkpoint_dir(checkpoint_path(spec))
    try:
        return llava_class(_read_config(path), "config_class").from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects is a bad checkpoint
        raise FeatherError(f"could not read the config in {path}: {exc}") from None


def checkpoint_path(spec: str | os.PathLike) -> Path:
    """The directory of a built-in trained checkpoint name (``tiny-shapes``), else ``spec`` itself."""
    if str(spec) in BUILTIN_CHECKPOINTS:
        path = BUILTIN_CHECKPOINTS[str(spec)]
        if not (path / "model.safetensors").is_file():
            raise FeatherError(f"the built-in {spec} checkpoint is missing from {path} (a broken "
                               "install?); retrain it with python -m feather_export.quality.train")
        return path
    return Path(spec)


def resolve_model(spec: str | os.PathLike):
    """``spec`` is a tiny or shape-only model name (random weights, built in-process), the trained
    built-in ``tiny-shapes`` or a checkpoint directory; returns (model, source_dir or None)."""
    from feather_export.models.shapes import SHAPE_MODELS, build_shape_model
    from feather_export.models.tiny import TINY_MODELS, build_tiny_model

    if str(spec) in TINY_MODELS:
        return build_tiny_model(str(spec)), None
    if str(spec) in SHAPE_MODELS:
        return build_shape_model(str(spec)), None
    path = checkpoint_path(spec)
    return load_checkpoint(path), path


def is_builtin(spec: str | os.PathLike) -> bool:
    """A tiny or shape-only model built in-process (not a directory, nor ``tiny-shapes``)."""
    from feather_export.models.shapes import SHAPE_MODELS
    from feather_export.models.tiny import TINY_MODELS

    return str(spec) in TINY_MODELS or str(spec) in SHAPE_MODELS


def open_weights(spec: str | os.PathLike, config=None):
    """The weight source of ``spec`` (``models.weights``) and its checkpoint directory (None for
    models built in-process), reading no weight yet: a checkpoint's safetensors headers only,
    a shape model's names and shapes. Tiny models are built whole (they are kilobytes)."""
    from feather_export.models.shapes import SHAPE_MODELS, shape_weights
    from feather_export.models.tiny import TINY_MODELS, build_tiny_model
    from feather_export.models.weights import CheckpointWeights, ModelWeights

    if str(spec) in TINY_MODELS:
        return ModelWeights(build_tiny_model(str(spec))), None
    if str(spec) in SHAPE_MODELS:
        return shape_weights(str(spec)), None
    path = check_checkpoint_dir(checkpoint_path(spec))
    return CheckpointWeights(path, config if config is not None else load_config(path)), path
