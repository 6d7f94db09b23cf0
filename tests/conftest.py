"""Shared fixtures: tiny models built in-process (no network), inputs, and tmp artifacts."""
from __future__ import annotations

import numpy as np
import pytest

TINY_NAMES = ("tiny", "tiny-gqa")


@pytest.fixture(scope="session")
def tiny_models():
    """name -> LlavaForConditionalGeneration, built once per session."""
    from feather_export.models.tiny import build_tiny_model

    return {name: build_tiny_model(name) for name in TINY_NAMES}


def tiny_inputs(model, seed: int = 0, text=(5, 6, 7), suffix=(8, 9, 10, 11)):
    """Random pixel values and prompt ids with the image block after a short text prefix."""
    cfg = model.config
    size = cfg.vision_config.image_size
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    ids = [1, *text] + [cfg.image_token_index] * cfg.image_seq_length + list(suffix)
    return pixels, np.asarray([ids], dtype=np.int64)


def hf_generate(model, pixels, ids, max_new_tokens=16):
    import torch

    out = model.generate(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels),
                         max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()
