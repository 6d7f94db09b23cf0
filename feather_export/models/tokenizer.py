"""A tiny, deterministic Llama-style tokenizer for the project's tiny test models.

Built in-process (no hub): a SentencePiece-like BPE with byte fallback, trained on a small
built-in English corpus, with ``<s>`` prepended by the post-processor as in LLaVA-1.5.
Any text round-trips: characters outside the trained alphabet fall back to ``<0xNN>`` bytes.
"""
from __future__ import annotations

import json
import pathlib

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

IMAGE_TOKEN = "<image>"
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
MODEL_MAX_LENGTH = 4096

# Ids fixed by construction (checked by tests): <unk>, <s>, </s>, 256 bytes, trained pieces,
# then <image> and <pad> appended as added special tokens, like llava-hf's Llama tokenizers.
TINY_VOCAB_SIZE = 500
IMAGE_TOKEN_ID = 498
PAD_TOKEN_ID = 499
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

_NUM_CORE = 3 + 256  # <unk>, <s>, </s> and the byte-fallback pieces
_NUM_TRAINED = TINY_VOCAB_SIZE - _NUM_CORE - 2  # minus <image> and <pad>
_SPACE = "\u2581"

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "pink", "brown"]
_SHAPES = ["square", "circle", "triangle", "rectangle", "star", "line", "dot", "cross"]
_POSITIONS = ["left", "right", "top", "bottom", "centre", "middle", "corner", "edge"]
_QUESTIONS = [
    "What colour is the {shape}?",
    "Where is the {colour} {shape}?",
    "Is there a {shape} in the image?",
    "How many {shape}s are there?",
    "Which shape is {colour}?",
    "Describe the image.",
    "What is in the {position} of the picture?",
]
_ANSWERS = [
    "The {shape} is {colour}.",
    "The {colour} {shape} is on the {position}.",
    "Yes, there is a {colour} {shape} at the {position}.",
    "There are {number} {shape}s.",
    "The image shows a {colour} {shape} near the {position} {edge}.",
]
_EXTRA = (
    "USER: ASSISTANT: yes no a an the of on in at and or with near above below next to it this that "
    "these those there here image picture photo shape shapes colour color size small large big tiny "
    "0 1 2 3 4 5 6 7 8 9 10 12 20 100 one two three four five six seven eight nine ten "
    ". , ? ! : ; ' \" ( ) - / + = % # @ & * [ ] { } < > _ "
    "Hello, world! Please answer briefly. I can see a simple drawing. Thank you."
)


def _corpus() -> list[str]:
    """The built-in training text: prompts and answers over colours, shapes and positions."""
    lines = [_EXTRA]
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            position = _POSITIONS[(i + j) % len(_POSITIONS)]
            fields = {
                "colour": colour, "shape": shape, "position": position,
                "number": str((i * len(_SHAPES) + j) % 13), "edge": _POSITIONS[(i * 3 + j) % len(_POSITIONS)],
            }
            question = _QUESTIONS[(i + 2 * j) % len(_QUESTIONS)].format(**fields)
            answer = _ANSWERS[(2 * i + j) % len(_ANSWERS)].format(**fields)
            lines.append(f"USER: {question} ASSISTANT: {answer}")
    return lines


def _metaspace() -> pre_tokenizers.Metaspace:
    return pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first", split=True)


def _train_pieces(corpus: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Train BPE on the corpus; return its pieces (in id order) and merges."""
    scratch = Tokenizer(models.BPE())
    scratch.pre_tokenizer = _metaspace()
    trainer = trainers.BpeTrainer(vocab_size=_NUM_TRAINED, min_frequency=1, show_progress=False)
    scratch.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(scratch.to_str())["model"]
    pieces = sorted(state["vocab"], key=state["vocab"].__getitem__)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return pieces, merges


def build_bpe_tokenizer(corpus: list[str]) -> Tokenizer:
    """The project's tokenizer recipe trained on ``corpus``: fixed special ids, byte fallback,
    ``<s>`` prepended, vocab ``TINY_VOCAB_SIZE``; the same result on every run."""
    pieces, merges = _train_pieces(corpus)
    core = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {tok: i for i, tok in enumerate(core + pieces)}
    if len(vocab) != TINY_VOCAB_SIZE - 2:
        raise RuntimeError(f"the tokenizer trained {len(vocab)} base pieces, expected {TINY_VOCAB_SIZE - 2}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = _metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    return tok


def build_tiny_tokenizer() -> Tokenizer:
    """Build the tiny tokenizer; the same result on every run."""
    return build_bpe_tokenizer(_corpus())


def save_tiny_tokenizer(out_dir: pathlib.Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    save_tokenizer_files(build_tiny_tokenizer(), out_dir)


def save_tokenizer_files(tok: Tokenizer, out_dir) -> None:
    """Write ``tok`` as tokenizer.json plus the tokenizer_config.json and special_tokens_map.json
    that transformers' ``PreTrainedTokenizerFast`` (and feather_runtime) read."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "image_token": IMAGE_TOKEN,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
