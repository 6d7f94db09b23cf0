"""LLaVA-1.5 prompt building with the `tokenizers` library only (no transformers).

``build`` expands the single ``<image>`` placeholder to N image tokens before tokenizing,
exactly as transformers' LlavaProcessor does, so the ids match it.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable, Union

import numpy as np
from tokenizers import Tokenizer

from .errors import FeatherError

IMAGE_TOKEN = "<image>"
TEMPLATE = "USER: {image}\n{question} ASSISTANT:"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def format_prompt(question: str, image: str = IMAGE_TOKEN) -> str:
    """The LLaVA-1.5 conversation text for one question about one image."""
    return TEMPLATE.format(image=image, question=question)


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken-style dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class PromptBuilder:
    """Turns a question into LLaVA-1.5 input ids with the image placeholder expanded."""

    def __init__(self, tokenizer: Tokenizer, image_token: str = IMAGE_TOKEN, eos_token: str = "</s>"):
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = self._require_id(image_token, "image")
        self.eos_token_id = self._require_id(eos_token, "end-of-sequence")

    def _require_id(self, token: str, role: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise FeatherError(f"the tokenizer has no {role} token {token!r}; use the tokenizer saved with the model")
        return token_id

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "PromptBuilder":
        """Load ``tokenizer.json`` (and special tokens from ``tokenizer_config.json`` if present)."""
        directory = pathlib.Path(path)
        file = directory / TOKENIZER_FILE
        if not file.is_file():
            raise FeatherError(f"{file} not found: the model directory must contain {TOKENIZER_FILE}")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises bare Exception subclasses on parse errors
            raise FeatherError(f"cannot load {file}: {exc}") from exc
        config = _read_config(directory / TOKENIZER_CONFIG_FILE)
        extra = config.get("extra_special_tokens")
        image = _token_content(config.get("image_token")) or (
            _token_content(extra.get("image_token")) if isinstance(extra, dict) else None
        )
        eos = _token_content(config.get("eos_token"))
        return cls(tokenizer, image_token=image or IMAGE_TOKEN, eos_token=eos or "</s>")

    def build(self, question: str, num_image_tokens: int) -> np.ndarray:
        """Token ids, int64 [1, T], of the LLaVA-1.5 prompt with num_image_tokens image tokens."""
        if not isinstance(question, str) or not question.strip():
            raise FeatherError("the question must be a non-empty string")
        if self.image_token in question:
            raise FeatherError(f"the question must not contain {self.image_token!r}; the image placeholder is added for you")
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, (int, np.integer)) or num_image_tokens <= 0:
            raise FeatherError(
                f"this model needs an image: num_image_tokens must be a positive integer, got {num_image_tokens!r}"
            )
        text = format_prompt(question, image=self.image_token * int(num_image_tokens))
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        found = sum(1 for i in ids if i == self.image_token_id)
        if found != num_image_tokens:
            raise FeatherError(
                f"the tokenizer split {self.image_token!r} into pieces ({found} image ids for {num_image_tokens} "
                "placeholders); it must be an added special token"
            )
        return np.asarray(ids, dtype=np.int64)[None, :]

    def decode(self, ids: Union[Iterable[int], np.ndarray]) -> str:
        """Text of generated ids, special tokens skipped."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self.tokenizer.decode([int(i) for i in flat], skip_special_tokens=True)


def _read_config(file: pathlib.Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatherError(f"cannot parse {file}: {exc}") from exc
    if not isinstance(config, dict):
        raise FeatherError(f"{file} must hold a JSON object")
    return config
