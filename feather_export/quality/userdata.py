"""A user's own evaluation data: one JSON object per line of a ``.jsonl`` file.

    {"image": "photos/cat.jpg", "question": "What animal is this?", "answers": ["cat", "a cat"]}

``image`` is a path (relative paths are taken from the file's directory); ``answers`` is a list of
one or more reference answers (``"answer": "cat"`` is accepted for one). Every line is checked, and
every image opened, before any model work; an error names the line. ``feather-export eval --data``
and ``feather-export calibrate --data`` read this format.

Scoring: both the prediction and the answers are normalised (lower case, surrounding whitespace and
a trailing full stop removed, inner whitespace collapsed). *exact*: the normalised prediction equals
one answer; *contains*: one normalised answer occurs in the normalised prediction.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from feather_export.errors import FeatherError


@dataclass(frozen=True)
class DataItem:
    """One line of the file: an image path, a question and its reference answers."""

    line: int
    image_path: Path
    question: str
    answers: tuple[str, ...]

    def image(self):
        from feather_runtime.preprocess import load_image

        return load_image(self.image_path)


def load_data(path: str | Path) -> list[DataItem]:
    """Read and check a ``.jsonl`` evaluation file; every image is opened once (then closed)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FeatherError(f"--data {path}: no such file (a .jsonl file, one JSON object per line)")
    items = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        where = f"--data {path}, line {number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FeatherError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise FeatherError(f"{where}: expected an object with image, question, answers")
        items.append(_item(obj, number, path.parent, where))
    if not items:
        raise FeatherError(f"--data {path} holds no items; write one JSON object per line with "
                           "image, question and answers")
    for item in items:
        try:
            with Image.open(item.image_path) as im:
                im.verify()
        except (OSError, SyntaxError) as exc:
            raise FeatherError(f"--data {path}, line {item.line}: cannot read image "
                               f"{item.image_path} ({exc})") from None
    return items


def _item(obj: dict, number: int, root: Path, where: str) -> DataItem:
    image, question = obj.get("image"), obj.get("question")
    answers = obj.get("answers", [obj["answer"]] if "answer" in obj else None)
    if not isinstance(image, str) or not image:
        raise FeatherError(f"{where}: 'image' must be a path string")
    if not isinstance(question, str) or not question.strip():
        raise FeatherError(f"{where}: 'question' must be a non-empty string")
    if isinstance(answers, str):
        answers = [answers]
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise FeatherError(f"{where}: 'answers' must be a non-empty list of non-empty strings "
                           "(or 'answer': a string)")
    image_path = Path(image) if Path(image).is_absolute() else root / image
    if not image_path.is_file():
        raise FeatherError(f"{where}: image {image_path} does not exist")
    return DataItem(number, image_path, question, tuple(answers))


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def exact_match(prediction: str, answers) -> bool:
    got = normalise(prediction)
    return any(got == normalise(a) for a in answers)


def contains_match(prediction: str, answers) -> bool:
    got = normalise(prediction)
    return any(normalise(a) in got for a in answers)
