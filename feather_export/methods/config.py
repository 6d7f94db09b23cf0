"""The pruning setup: one frozen, validated object parsed from CLI-style strings (docs/design.md §4).

``PruneConfig.create(method, geometry, budget=..., schedule="8:144,16:13", stride=...)`` resolves the
user's options against the model's geometry into concrete stages, or raises ``FeatherError`` saying
what to change. Nothing here imports torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from feather_export.errors import FeatherError
from feather_export.models.geometry import ModelGeometry

METHODS = ("none", "feather", "fastv", "fastervlm")
FASTV_DEFAULT_LAYER = 2
FEATHER_STAGE2_FRACTION = 0.09
MIN_GRID_STRIDE = 3


@dataclass(frozen=True)
class Stage:
    """One prune point.

    ``layer`` is the decoder layer whose *input* is pruned (scores come from layer ``layer - 1``);
    FasterVLM prunes before the LLM and uses ``layer == 0`` with ``criterion == "fastervlm"``.
    ``keep`` tokens survive out of ``num_in`` current image tokens.
    """

    layer: int
    keep: int
    num_in: int
    criterion: str           # "feather" | "fastv" | "fastervlm"
    grid_stride: int = 0     # > 0: the uniform grid is kept unconditionally (FEATHER stage 1)


def grid_size(side: int, stride: int) -> int:
    """|G| for a side x side raster and a stride (0 = no grid)."""
    return math.ceil(side / stride) ** 2 if stride > 0 else 0


def default_grid_stride(side: int, budget: int) -> int:
    """The smallest stride s >= 3 with |G| <= budget / 2 (docs/design.md §4); 0 if none exists."""
    for stride in range(MIN_GRID_STRIDE, side + 1):
        if 2 * grid_size(side, stride) <= budget:
            return stride
    return 0


def feather_stage2_keep(budget: int) -> int:
    """Default B2 = max(1, round(0.09 * B1)), rounding halves up."""
    return max(1, math.floor(FEATHER_STAGE2_FRACTION * budget + 0.5))


def parse_schedule(text: str) -> tuple[tuple[int, int], ...]:
    """Parse ``"8:144,16:13"`` into ((8, 144), (16, 13))."""
    pairs = []
    for part in text.split(","):
        part = part.strip()
        layer, sep, keep = part.partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(layer), int(keep)))
        except ValueError:
            raise FeatherError(
                f"--schedule item {part!r} is not LAYER:COUNT; write e.g. --schedule 8:144,16:13"
            ) from None
    return tuple(pairs)


@dataclass(frozen=True)
class PruneConfig:
    """A resolved pruning setup: the method and its concrete stages."""

    method: str
    stages: tuple[Stage, ...]

    @property
    def budget(self) -> int | None:
        """Image tokens kept by the first stage (None for ``none``)."""
        return self.stages[0].keep if self.stages else None

    @property
    def prune_layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.stages if s.criterion != "fastervlm")

    def to_dict(self) -> dict:
        return {"method": self.method, "stages": [asdict(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        return cls(method=data["method"], stages=tuple(Stage(**s) for s in data["stages"]))

    @classmethod
    def create(cls, method: str, geometry: ModelGeometry, *, budget: int | None = None,
               schedule: str | tuple[tuple[int, int], ...] | None = None,
               stride: int | None = None) -> "PruneConfig":
        """Validate the user's options against the model and resolve the stages."""
        method = (method or "").lower()
        if method == "btp":
            raise FeatherError("--method btp is specified in docs/design.md §4 but not implemented yet; "
                               f"choose one of {', '.join(METHODS)}")
        if method not in METHODS:
            raise FeatherError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(schedule, str):
            schedule = parse_schedule(schedule)
        if stride is not None and method != "feather":
            raise FeatherError(f"--stride only applies to --method feather, not {method}")
        if method == "none":
            if budget is not None or schedule:
                raise FeatherError("--method none keeps every token; drop --budget/--schedule")
            return cls("none", ())
        if budget is None and not schedule:
            budget = geometry.num_image_tokens // 4
        if schedule and budget is not None and schedule[0][1] != budget:
            raise FeatherError(
                f"--budget {budget} disagrees with the first --schedule count {schedule[0][1]}; "
                "give one or make them equal")
        builder = {"feather": _feather_stages, "fastv": _fastv_stages,
                   "fastervlm": _fastervlm_stages}[method]
        stages = builder(geometry, budget, schedule, stride)
        _check_stages(method, stages, geometry)
        return cls(method, stages)


def _feather_stages(geo: ModelGeometry, budget, schedule, stride) -> tuple[Stage, ...]:
    if schedule:
        pairs = schedule
    else:
        k1 = max(1, geo.num_layers // 4)
        k2 = max(k1 + 1, geo.num_layers // 2)
        pairs = ((k1, budget), (k2, feather_stage2_keep(budget)))
    b1 = pairs[0][1]
    _check_count(b1, geo.num_image_tokens, "FEATHER stage 1")
    if stride is None:
        stride = default_grid_stride(geo.grid_side, b1)
        if stride == 0:
            raise FeatherError(
                f"budget {b1} is too small for FEATHER's uniform grid (it needs |grid| <= budget/2); "
                "use a larger --budget or --stride 0 to disable the grid")
    elif stride < 0:
        raise FeatherError(f"--stride must be >= 0 (0 disables the grid), got {stride}")
    elif grid_size(geo.grid_side, stride) > b1:
        raise FeatherError(
            f"--stride {stride} forces a grid of {grid_size(geo.grid_side, stride)} tokens, more than "
            f"the budget {b1}; use a larger --stride or --budget")
    stages, num_in = [], geo.num_image_tokens
    for i, (layer, keep) in enumerate(pairs):
        stages.append(Stage(layer, keep, num_in, "feather", stride if i == 0 else 0))
        num_in = keep
    return tuple(stages)


def _fastv_stages(geo: ModelGeometry, budget, schedule, stride) -> tuple[Stage, ...]:
    if schedule and len(schedule) != 1:
        raise FeatherError("--method fastv has one stage; write --schedule LAYER:COUNT")
    layer, keep = schedule[0] if schedule else (FASTV_DEFAULT_LAYER, budget)
    return (Stage(layer, keep, geo.num_image_tokens, "fastv"),)


def _fastervlm_stages(geo: ModelGeometry, budget, schedule, stride) -> tuple[Stage, ...]:
    if schedule:
        raise FeatherError("--method fastervlm prunes before the LLM; give --budget, not --schedule")
    return (Stage(0, budget, geo.num_image_tokens, "fastervlm"),)


def _check_count(keep: int, available: int, what: str) -> None:
    if not 1 <= keep <= available:
        raise FeatherError(f"{what} keeps {keep} tokens; it must be between 1 and {available}")


def _check_stages(method: str, stages: tuple[Stage, ...], geo: ModelGeometry) -> None:
    previous_layer = 0
    for i, stage in enumerate(stages):
        _check_count(stage.keep, stage.num_in, f"{method} stage {i + 1}")
        if method == "fastervlm":
            continue
        if not 1 <= stage.layer < geo.num_layers:
            raise FeatherError(
                f"{method} stage {i + 1} prunes at layer {stage.layer}; the model has "
                f"{geo.num_layers} decoder layers, so use a layer between 1 and {geo.num_layers - 1}")
        if stage.layer <= previous_layer:
            raise FeatherError(
                f"--schedule layers must increase strictly; got {stage.layer} after {previous_layer}")
        previous_layer = stage.layer
