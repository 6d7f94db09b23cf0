"""A seeded synthetic grounding task: simple shapes on a plain background, short exact answers.

Each scene holds 1-3 objects (square / circle / triangle; red / green / blue / yellow; small / large),
each inside its own cell of a 3 x 3 grid over the whole image, so every object has one unambiguous
region ("top left" ... "bottom right") and row band ("top" / "middle" / "bottom"). Questions:

- ``colour``: "What colour is the circle?" -> "red"          (asked only of a shape present once)
- ``count``:  "How many squares are there?" -> "0" .. "3"
- ``where``:  "Where is the red square?" -> "top left"        (colour + shape is unique per scene)

Sample ``i`` of a split is a pure function of ``(seed, split, i)``. Splits are disjoint by
construction: a scene belongs to the split its content hash assigns it to (``split_of``), and each
split's stream redraws scenes until the hash agrees. No torch here; Pillow + numpy only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from feather_export.errors import FeatherError

IMAGE_SIZE = 224                     # 224 px / patch 14 -> a 16 x 16 token grid
GRID_CELLS = 3                       # 3 x 3 regions
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (215, 35, 35), "green": (40, 165, 65), "blue": (35, 90, 220), "yellow": (230, 195, 30)}
SIZES = {"small": (30, 38), "large": (44, 58)}    # side / diameter in px, inclusive range
QUESTION_TYPES = ("colour", "count", "where")
MAX_OBJECTS = 3
MAX_COUNT = MAX_OBJECTS
SPLITS = ("train", "val", "test")
# share of the scene space (by content hash, in 1/100ths) that each split owns
_SPLIT_SHARE = {"test": range(0, 10), "val": range(10, 20), "train": range(20, 100)}
_COLOUR_JITTER = 20                  # +- per RGB channel
_BACKGROUNDS = ((255, 255, 255), (236, 235, 228), (225, 228, 232), (240, 236, 220))
_BACKGROUND_JITTER = 8
_SAME_SHAPE_P = 0.3                  # scenes whose objects all share one shape
_COUNT_PRESENT_P = 0.7               # count questions about a shape in the scene
_MARGIN = 3                          # px between an object and its cell border


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str                        # "small" | "large"
    size_px: int
    row: int                         # 0..2, top to bottom
    col: int                         # 0..2, left to right
    cx: int                          # centre, pixels
    cy: int
    rgb: tuple[int, int, int]

    @property
    def band(self) -> str:
        """Row band: top / middle / bottom."""
        return ROWS[self.row]

    @property
    def region(self) -> str:
        """The ``where`` answer: '<row> <column>', e.g. 'top left'."""
        return f"{ROWS[self.row]} {COLS[self.col]}"

    def bbox(self) -> tuple[int, int, int, int]:
        half = self.size_px // 2
        return self.cx - half, self.cy - half, self.cx - half + self.size_px, self.cy - half + self.size_px


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]
    image_size: int = IMAGE_SIZE

    def key(self) -> str:
        """Canonical text of the scene's content (what the split hash is taken over)."""
        parts = [f"{o.shape},{o.colour},{o.size_px},{o.cx},{o.cy},{o.rgb}" for o in self.objects]
        return f"{self.image_size}|{self.background}|" + ";".join(sorted(parts))

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def render(self):
        """The scene as an RGB PIL image of ``image_size`` x ``image_size``."""
        from PIL import Image

        image = Image.new("RGB", (self.image_size, self.image_size), self.background)
        self._draw(image, [o.rgb for o in self.objects])
        return image

    def label_map(self) -> np.ndarray:
        """uint8 [H, W]: 0 for background, i + 1 where object i is drawn (same pixels as render)."""
        from PIL import Image

        image = Image.new("L", (self.image_size, self.image_size), 0)
        self._draw(image, list(range(1, len(self.objects) + 1)))
        return np.asarray(image)

    def _draw(self, image, fills) -> None:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(image)
        for o, fill in zip(self.objects, fills):
            x0, y0, x1, y1 = o.bbox()
            if o.shape == "square":
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
            elif o.shape == "circle":
                draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
            else:
                draw.polygon([(o.cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


@dataclass(frozen=True)
class Sample:
    split: str
    index: int
    scene: Scene
    qtype: str                       # colour | count | where
    question: str
    answer: str
    target: int | None               # index of the object asked about (None for count)

    @property
    def band(self) -> str | None:
        """Row band of the object the question is about (None for count questions)."""
        return None if self.target is None else self.scene.objects[self.target].band

    def image(self):
        return self.scene.render()

    def to_dict(self) -> dict:
        return {"split": self.split, "index": self.index, "qtype": self.qtype,
                "question": self.question, "answer": self.answer, "band": self.band,
                "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size,
                             "region": o.region, "band": o.band, "cx": o.cx, "cy": o.cy}
                            for o in self.scene.objects]}


def split_of(scene: Scene) -> str:
    """The split a scene belongs to, from a hash of its content (disjoint by construction)."""
    bucket = int.from_bytes(hashlib.sha256(scene.key().encode()).digest()[:8], "big") % 100
    return next(name for name, share in _SPLIT_SHARE.items() if bucket in share)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FeatherError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _rng(seed: int, split: str, index: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index), int(attempt)])


def _draw_object(rng: np.random.Generator, cell: int, used: set[tuple[str, str]],
                 shape: str | None) -> ShapeObject:
    row, col = divmod(cell, GRID_CELLS)
    fixed = shape
    while True:
        shape = fixed or SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        if (colour, shape) not in used:      # colour + shape names one object in a scene
            break
    size = ("small", "large")[rng.integers(2)]
    lo, hi = SIZES[size]
    size_px = int(rng.integers(lo, hi + 1))
    cell_px = IMAGE_SIZE / GRID_CELLS
    half = size_px / 2
    x_lo, x_hi = col * cell_px + half + _MARGIN, (col + 1) * cell_px - half - _MARGIN
    y_lo, y_hi = row * cell_px + half + _MARGIN, (row + 1) * cell_px - half - _MARGIN
    cx = int(rng.integers(int(np.ceil(x_lo)), int(np.floor(x_hi)) + 1))
    cy = int(rng.integers(int(np.ceil(y_lo)), int(np.floor(y_hi)) + 1))
    base = np.array(COLOURS[colour])
    rgb = tuple(int(v) for v in np.clip(base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255))
    return ShapeObject(shape, colour, size, size_px, row, col, cx, cy, rgb)


def _draw_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(GRID_CELLS * GRID_CELLS, size=n, replace=False)
    # some scenes repeat one shape, so that every count up to MAX_COUNT is common enough
    same = SHAPES[rng.integers(len(SHAPES))] if rng.random() < _SAME_SHAPE_P else None
    used: set[tuple[str, str]] = set()
    objects = []
    for cell in cells:
        obj = _draw_object(rng, int(cell), used, same)
        used.add((obj.colour, obj.shape))
        objects.append(obj)
    base = np.array(_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))])
    jitter = rng.integers(-_BACKGROUND_JITTER, _BACKGROUND_JITTER + 1, 3)
    background = tuple(int(v) for v in np.clip(base + jitter, 0, 255))
    return Scene(tuple(objects), background)


def _draw_question(rng: np.random.Generator, scene: Scene,
                   weights: Sequence[float] | None = None) -> tuple[str, str, str, int | None]:
    qtype = QUESTION_TYPES[rng.choice(len(QUESTION_TYPES), p=weights) if weights is not None
                           else rng.integers(len(QUESTION_TYPES))]
    if qtype == "colour":
        unique = [i for i, o in enumerate(scene.objects) if scene.count(o.shape) == 1]
        if not unique:                       # every shape repeats: ask where instead
            qtype = "where"
        else:
            target = unique[rng.integers(len(unique))]
            obj = scene.objects[target]
            return qtype, f"What colour is the {obj.shape}?", obj.colour, target
    if qtype == "count":
        present = sorted({o.shape for o in scene.objects})
        pool = present if rng.random() < _COUNT_PRESENT_P else SHAPES
        shape = pool[rng.integers(len(pool))]
        return qtype, f"How many {shape}s are there?", str(scene.count(shape)), None
    target = int(rng.integers(len(scene.objects)))
    obj = scene.objects[target]
    return "where", f"Where is the {obj.colour} {obj.shape}?", obj.region, target


def make_sample(split: str, index: int, seed: int = 0) -> Sample:
    """Sample ``index`` of ``split``: the same on every call, machine and run."""
    _check_split(split)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise FeatherError(f"sample index must be a non-negative integer, got {index!r}")
    for attempt in range(10_000):
        rng = _rng(seed, split, index, attempt)
        scene = _draw_scene(rng)
        if split_of(scene) == split:
            qtype, question, answer, target = _draw_question(rng, scene)
            return Sample(split, int(index), scene, qtype, question, answer, target)
    raise RuntimeError("no scene found for the split")   # unreachable: every split owns >= 10%


def make_conversation(split: str, index: int, seed: int = 0, turns: int = 3,
                      weights: Sequence[float] | None = None) -> list[Sample]:
    """Sample ``index`` followed by up to ``turns - 1`` more distinct questions about the same scene
    (for multi-turn training: one image, several supervised answers). ``weights``: probabilities
    of the question types (``QUESTION_TYPES`` order) for the extra turns; default uniform."""
    first = make_sample(split, index, seed)
    out, asked = [first], {first.question}
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index), 1_000_003])
    for _ in range(8 * turns):
        if len(out) >= turns:
            break
        qtype, question, answer, target = _draw_question(rng, first.scene, weights)
        if question not in asked:
            asked.add(question)
            out.append(Sample(split, first.index, first.scene, qtype, question, answer, target))
    return out


def make_samples(split: str, n: int, seed: int = 0, start: int = 0) -> list[Sample]:
    """Samples ``start .. start + n - 1`` of ``split``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise FeatherError(f"the number of samples must be a non-negative integer, got {n!r}")
    return [make_sample(split, start + i, seed) for i in range(n)]


def answer_vocabulary() -> dict[str, tuple[str, ...]]:
    """Every possible answer per question type."""
    return {"colour": tuple(COLOURS),
            "count": tuple(str(i) for i in range(MAX_COUNT + 1)),
            "where": tuple(f"{r} {c}" for r in ROWS for c in COLS)}


def corpus_lines() -> list[str]:
    """Every question/answer template the task can produce (for the tokenizer's training text)."""
    lines = []
    for shape in SHAPES:
        for colour in COLOURS:
            lines.append(f"USER: What colour is the {shape}? ASSISTANT: {colour}")
            for region in answer_vocabulary()["where"]:
                lines.append(f"USER: Where is the {colour} {shape}? ASSISTANT: {region}")
        for count in answer_vocabulary()["count"]:
            lines.append(f"USER: How many {shape}s are there? ASSISTANT: {count}")
    return lines
