"""Parsing and checking one OpenAI chat-completions request (no Ray, no HTTP here).

A request is turned into a frozen ``ChatRequest`` (question, decoded RGB image, sampling options)
or refused with a ``RequestError`` that carries the HTTP status and OpenAI's error fields. Every
check runs before the request reaches a replica, so a bad request never costs model time and never
takes a replica down.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feather_export.errors import FeatherError
from feather_export.serve.responses import error

MAX_STOP_STRINGS = 4                     # as OpenAI's API


class RequestError(FeatherError):
    """A refused request: HTTP ``status`` plus OpenAI's ``type``/``param``/``code`` fields."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return error(str(self), self.kind, self.code, self.param)


@dataclass(frozen=True)
class Limits:
    """What the server accepts; ``max_tokens``/``max_text_tokens`` come from the artifact."""
    model: str                           # the one served model name
    max_tokens: int                      # the artifact's --max-new-tokens
    max_text_tokens: int                 # the artifact's --max-text-tokens
    max_image_pixels: int                # width x height of the decoded image
    image_root: Path | None = None       # image paths are read only under here (None: no paths)


@dataclass(frozen=True)
class ChatRequest:
    model: str
    question: str
    image: np.ndarray = None             # uint8 HxWx3 (RGB), decoded and size-checked
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False          # stream_options.include_usage

    def generate_kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_tokens, temperature=self.temperature,
                    top_p=self.top_p, seed=self.seed, stop=self.stop)


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def parse_chat_request(data: dict, limits: Limits) -> ChatRequest:
    """Check a chat-completions body against ``limits``; decode its image. Raises RequestError."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required (a string)", param="model")
    if model != limits.model:
        raise RequestError(f"the model {model!r} does not exist; this server serves "
                           f"{limits.model!r} (GET /v1/models)", status=404, param="model",
                           code="model_not_found")
    n = data.get("n", 1)
    if n != 1:
        raise RequestError(f"'n' must be 1 (one answer per request), got {n!r}", param="n")
    question, image_url = _parse_messages(data.get("messages"))
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is None:                 # OpenAI: until the end of the answer
        max_tokens = limits.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"'max_tokens' must be a positive integer, got {max_tokens!r}",
                           param="max_tokens")
    if max_tokens > limits.max_tokens:
        raise RequestError(f"'max_tokens' is {max_tokens}; this model's artifact generates at most "
                           f"{limits.max_tokens} tokens (--max-new-tokens at build)",
                           param="max_tokens")
    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("'top_p' must be in (0, 1], got 0", param="top_p")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise RequestError(f"'seed' must be a non-negative integer, got {seed!r}", param="seed")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}", param="stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    image = load_request_image(image_url, limits)
    return ChatRequest(model=model, question=question, image=image, max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, seed=seed,
                       stop=_parse_stop(data.get("stop")), stream=stream,
                       include_usage=bool(options.get("include_usage", False)))


def _number(data: dict, key: str, default: float, low: float, high: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise RequestError(f"'{key}' must be a number in [{low:g}, {high:g}], got {value!r}",
                           param=key)
    return float(value)


def _parse_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' must be a non-empty string or a list of at most "
                           f"{MAX_STOP_STRINGS} non-empty strings, got {stop!r}", param="stop")
    return tuple(stops)


def _parse_messages(messages) -> tuple[str, str]:
    """One user message with its text and one image_url part -> (question, url)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
        raise RequestError(f"'messages' must hold exactly one user message (this model answers one "
                           f"question about one image); got roles {roles}", param="messages")
    content = messages[0].get("content")
    if isinstance(content, str):
        raise RequestError("the user message has no image: give 'content' as a list with a 'text' "
                           "part and one 'image_url' part", param="messages")
    if not isinstance(content, list):
        raise RequestError("the user message's 'content' must be a list of parts",
                           param="messages")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise RequestError("an 'image_url' part needs {'url': DATA_URL_OR_PATH}",
                                   param="messages")
            urls.append(url)
        else:
            raise RequestError(f"unsupported content part {part!r:.80}: use 'text' and "
                               "'image_url' parts", param="messages")
    if not urls:
        raise RequestError("the user message has no image: add one 'image_url' part (a base64 "
                           "data URL, or a path under the server's image root)", param="messages")
    if len(urls) > 1:
        raise RequestError(f"the user message has {len(urls)} images; this model takes one",
                           param="messages")
    question = "\n".join(texts).strip()
    if not question:
        raise RequestError("the user message has no text: add a 'text' part with the question",
                           param="messages")
    return question, urls[0]


def count_prompt_tokens(question: str, builder, num_image_tokens: int, max_text_tokens: int) -> int:
    """Tokens of the whole prompt (image tokens included); refuses a prompt over the artifact's
    text limit. ``builder``: feather_runtime.prompt.PromptBuilder."""
    try:
        ids = builder.build(question, num_image_tokens)
    except FeatherError as exc:
        raise RequestError(str(exc), param="messages") from None
    text_tokens = ids.shape[1] - num_image_tokens
    if text_tokens > max_text_tokens:
        raise RequestError(f"the prompt is too long: {text_tokens} text tokens; this model's "
                           f"artifact takes at most {max_text_tokens} (--max-text-tokens at build)",
                           param="messages", code="context_length_exceeded")
    return int(ids.shape[1])


def load_request_image(url: str, limits: Limits) -> np.ndarray:
    """A base64 data URL or a path under ``limits.image_root`` -> uint8 RGB HxWx3."""
    if url.startswith("data:"):
        return decode_image(_data_url_bytes(url), limits.max_image_pixels)
    if url.startswith(("http://", "https://")):
        raise RequestError("remote image URLs are not fetched by this server: send the image as a "
                           "base64 data URL (data:image/png;base64,...)", param="messages")
    path = resolve_image_path(url, limits.image_root)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RequestError(f"cannot read image {url!r}: {exc.strerror}", param="messages") from None
    return decode_image(data, limits.max_image_pixels)


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError("the image data URL must look like data:image/png;base64,<data>",
                           param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("the image data URL holds invalid base64", param="messages") from None


def resolve_image_path(url: str, root: Path | None) -> Path:
    """A file path (or file:// URL) that must lie under ``root`` once symlinks are resolved."""
    if root is None:
        raise RequestError("this server reads no image paths (start it with --image-root DIR); "
                           "send the image as a base64 data URL", status=403, param="messages")
    raw = url[len("file://"):] if url.startswith("file://") else url
    root = Path(os.path.realpath(root))
    path = Path(os.path.realpath(root / raw))      # an absolute raw path replaces root here
    if not path.is_relative_to(root):
        raise RequestError(f"the image path {url!r} is outside the server's image root",
                           status=403, param="messages")
    if not path.is_file():
        raise RequestError(f"no image file {url!r} under the server's image root",
                           param="messages")
    return path


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to uint8 RGB, refusing more than ``max_pixels`` before decoding them."""
    from PIL import Image, UnidentifiedImageError

    from feather_runtime.preprocess import load_image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise RequestError(f"the image is {width}x{height} = {width * height} pixels; this "
                                   f"server accepts at most {max_pixels} (--max-image-pixels)",
                                   status=413, param="messages")
            img.load()
            return np.asarray(load_image(img))
    except RequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError, FeatherError) as exc:
        raise RequestError(f"the image cannot be decoded ({type(exc).__name__}: {exc})"[:300],
                           param="messages") from None
