"""The tokenizer of the trained ``tiny-shapes`` model: the tiny tokenizer's recipe, a task corpus.

Same construction as ``tiny_tokenizer`` (deterministic SentencePiece-like BPE with byte fallback,
``<s>`` prepended, vocab 500 with ``<image>`` = 498 and ``<pad>`` = 499), trained on the synthetic
task's questions and answers plus general text, so every task word and answer is one piece
("red", "top", "left", "3") and answers are 1-2 tokens. Any other text still round-trips via bytes.
"""
from __future__ import annotations

_TASK_REPEAT = 4                                     # weight of the task text against the rest
_GENERAL = (
    "USER: ASSISTANT: yes no a an the of on in at and or with near above below next to it this that "
    "there here image picture photo shape shapes colour color size small large big object objects "
    "what which where how many is are left right top bottom middle centre center corner side "
    "0 1 2 3 4 5 6 7 8 9 10 one two three four five zero none "
    "red green blue yellow orange purple black white grey pink brown "
    "square squares circle circles triangle triangles "
    ". , ? ! : ; ' \" ( ) - / + = % # @ & * [ ] { } < > _ "
    "Hello, world! Please answer briefly. I can see a simple drawing. Describe the image. Thank you."
)


def _corpus() -> list[str]:
    from feather_export.quality.synthetic import corpus_lines

    return [_GENERAL] + corpus_lines() * _TASK_REPEAT


def build_shapes_tokenizer():
    """Build the tokenizer; the same result on every run."""
    from feather_export.models.tokenizer import build_bpe_tokenizer

    return build_bpe_tokenizer(_corpus())


def save_shapes_tokenizer(out_dir) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    from feather_export.models.tokenizer import save_tokenizer_files

    save_tokenizer_files(build_shapes_tokenizer(), out_dir)
