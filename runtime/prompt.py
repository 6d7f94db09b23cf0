"""Prompt building with the `tokenizers` library only (no transformers, no template engine).

The exporter renders the checkpoint's chat template once, for one user turn holding the image and
a placeholder question, and stores the text before and after the question in the manifest
(``PromptTemplate``); here the question is put between them. ``build`` then expands the single
``<image>`` placeholder to N image tokens before tokenizing, exactly as transformers'
LlavaProcessor does, so the ids match the processor's on ``apply_chat_template`` output (a rendered
text that starts with the BOS token is tokenized without adding special tokens, as the processor
does). Checkpoints without a chat template use LLaVA-1.5's ``USER: <image>\n{question} ASSISTANT:``.
"""
from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PromptTemplate:
    """A rendered chat template: ``before + question + after``; the image placeholder appears
    exactly once, in ``before`` or ``after``."""

    before: str = "USER: <image>\n"
    after: str = " ASSISTANT:"
    add_special_tokens: bool = True     # False when the rendered text already starts with BOS
    source: str = "LLaVA-1.5 default (no chat template in the checkpoint)"

    def text(self, question: str, image: str = IMAGE_TOKEN, image_token: str = IMAGE_TOKEN) -> str:
        return (self.before + question + self.after).replace(image_token, image)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Any) -> "PromptTemplate":
        """From a manifest's ``prompt`` entry (absent: the LLaVA-1.5 default)."""
        if data is None:
            return cls()
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("before", "after")) \
                or not isinstance(data.get("add_special_tokens", True), bool):
            raise FeatherError(f"the manifest's prompt template is malformed: {data!r}; re-export the artifact")
        return cls(data["before"], data["after"], data.get("add_special_tokens", True),
                   str(data.get("source", "manifest")))


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken-style dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class PromptBuilder:
    """Turns a question into input ids (the artifact's chat template, LLaVA-1.5's by default) with
    the image placeholder expanded."""

    def __init__(self, tokenizer: Tokenizer, image_token: str = IMAGE_TOKEN, eos_token: str = "</s>",
                 template: PromptTemplate | None = None):
        self.tokenizer = tokenizer
        self.template = template or PromptTemplate()
        self.image_token = image_token
        if (self.template.before + self.template.after).count(image_token) != 1:
            raise FeatherError(f"the prompt template must hold the image placeholder {image_token!r} exactly "
                               f"once: {self.template.before!r} ... {self.template.after!r}")
        self.image_token_id = self._require_id(image_token, "image")
        self.eos_token_id = self._require_id(eos_token, "end-of-sequence")

    def _require_id(self, token: str, role: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise FeatherError(f"the tokenizer has no {role} token {token!r}; use the tokenizer saved with the model")
        return token_id

    @classmethod
    def for_artifact(cls, manifest) -> "PromptBuilder":
        """The builder an artifact's prompts use: its tokenizer with the template its manifest
        records (``feather_runtime.manifest.Manifest``)."""
        return cls.from_dir(manifest.root / "tokenizer",
                            PromptTemplate.from_dict(manifest.data.get("prompt")))

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike], template: PromptTemplate | None = None) -> "PromptBuilder":
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
        return cls(tokenizer, image_token=image or IMAGE_TOKEN, eos_token=eos or "</s>", template=template)

    def build(self, question: str, num_image_tokens: int) -> np.ndarray:
        """Token ids, int64 [1, T], of the templated prompt with num_image_tokens image tokens."""
        if not isinstance(question, str) or not question.strip():
            raise FeatherError("the question must be a non-empty string")
        if self.image_token in question:
            raise FeatherError(f"the question must not contain {self.image_token!r}; the image placeholder is added for you")
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, (int, np.integer)) or num_image_tokens <= 0:
            raise FeatherError(
                f"this model needs an image: num_image_tokens must be a positive integer, got {num_image_tokens!r}"
            )
        text = self.template.text(question, self.image_token * int(num_image_tokens), self.image_token)
        ids = self.tokenizer.encode(text, add_special_tokens=self.template.add_special_tokens).ids
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
