"""The pruning setup: one frozen, validated object parsed from CLI-style strings (docs/design.md §4).

``PruneConfig.create(method, geometry, budget=..., schedule="8:144,16:13", stride=...)`` resolves the
user's options against the model's geometry into concrete stages, or raises ``FeatherError`` saying
what to change. Nothing here imports torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from feather_export.errors import FeatherError
from feather_export.models.geometry import ModelGeometry

METHODS = ("none", "feather", "fastv", "fastervlm", "btp")
FASTV_DEFAULT_LAYER = 2
FEATHER_STAGE2_FRACTION = 0.09
MIN_GRID_STRIDE = 3
# BTP defaults, scaled from the LLaVA-1.5-7B reference (L = 32, N = 576; docs/design.md §4)
BTP_REFERENCE_LAYERS = (3, 6, 14, 22)
BTP_REFERENCE_NUM_LAYERS = 32
BTP_COUNT_FRACTIONS = (Fraction(1, 2), Fraction(1, 4), Fraction(1, 12))   # then 0
BTP_DEFAULT_LAMBDA = (Decimal("0.3"), Decimal("0.9"), Decimal("1.0"))
BTP_RHO = (Decimal("3.7"), Decimal("1.5"), Decimal("1.2"))               # stages 1, 2, >= 3


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
    criterion: str           # "feather" | "fastv" | "fastervlm" | "btp"
    grid_stride: int = 0     # > 0: the uniform grid is kept unconditionally (FEATHER stage 1)
    # BTP only: m = |A| = floor(lambda x keep), the candidate pool floor(rho x m) (capped at
    # num_in) the attention set is taken from, |F| of the spatial seed (stage 1), lambda as given
    attention_count: int = 0
    candidate_count: int = 0
    seed_count: int = 0
    weight: str = ""
    # image index of the first raster token in this stage's input: places FEATHER's grid and
    # BTP's seed (1 when a CLS image token precedes the raster). Set on the first stage only,
    # whose input is every image token; later stages index ranks in a pruned set.
    raster_offset: int = 0
    # FasterVLM on crops (LLaVA-NeXT): patches kept per crop; ``keep`` then also counts the
    # tokens in no raster (newlines), which are always kept
    per_crop: int = 0


def grid_size(side: int, stride: int) -> int:
    """|G| for a side x side raster and a stride (0 = no grid)."""
    return math.ceil(side / stride) ** 2 if stride > 0 else 0


def default_grid_stride(side: int, budget: int) -> int:
    """The smallest stride s >= 3 with |G| <= budget / 2 (docs/design.md §4); 0 if none exists."""
    for stride in range(MIN_GRID_STRIDE, side + 1):
        if 2 * grid_size(side, stride) <= budget:
            return stride
    return 0


def geometry_grid_stride(geo: ModelGeometry, budget: int) -> int:
    """The smallest stride s >= 3 whose grid (every raster's, united) has |G| <= budget / 2; 0 if
    none exists. One square raster: ``default_grid_stride``."""
    for stride in range(MIN_GRID_STRIDE, geo.max_side + 1):
        if 2 * geo.grid_count(stride) <= budget:
            return stride
    return 0


def feather_stage2_keep(budget: int) -> int:
    """Default B2 = max(1, round(0.09 * B1)), rounding halves up."""
    return max(1, math.floor(FEATHER_STAGE2_FRACTION * budget + 0.5))


def round_half_up(x) -> int:
    """round() with halves up, exact on Fractions and Decimals."""
    return math.floor(Fraction(x) + Fraction(1, 2))


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
               stride: int | None = None,
               btp_lambda: str | tuple | None = None) -> "PruneConfig":
        """Validate the user's options against the model and resolve the stages."""
        method = (method or "").lower()
        if method not in METHODS:
            raise FeatherError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(schedule, str):
            schedule = parse_schedule(schedule)
        if stride is not None and method != "feather":
            raise FeatherError(f"--stride only applies to --method feather, not {method}")
        if btp_lambda is not None and method != "btp":
            raise FeatherError(f"--btp-lambda only applies to --method btp, not {method}")
        if method == "btp":
            if len(geometry.rasters) > 1:
                raise FeatherError(
                    "--method btp is not supported on this model: its spatial seed is defined on "
                    f"one raster and the image tokens form {len(geometry.rasters)} (LLaVA-NeXT's "
                    "base and stitched rasters); use feather, fastv or fastervlm")
            stages = _btp_stages(geometry, budget, schedule, btp_lambda)
            _check_stages(method, stages, geometry)
            return cls(method, _place_raster(stages, geometry))
        if method == "none":
            if budget is not None or schedule:
                raise FeatherError("--method none keeps every token; drop --budget/--schedule")
            return cls("none", ())
        if budget is None and not schedule:
            budget = (default_crop_budget(geometry) if method == "fastervlm" and geometry.crop_side
                      else geometry.num_image_tokens // 4)
        if schedule and budget is not None and schedule[0][1] != budget:
            raise FeatherError(
                f"--budget {budget} disagrees with the first --schedule count {schedule[0][1]}; "
                "give one or make them equal")
        builder = {"feather": _feather_stages, "fastv": _fastv_stages,
                   "fastervlm": _fastervlm_stages}[method]
        stages = builder(geometry, budget, schedule, stride)
        _check_stages(method, stages, geometry)
        return cls(method, _place_raster(stages, geometry))


def _place_raster(stages: tuple[Stage, ...], geo: ModelGeometry) -> tuple[Stage, ...]:
    """The first stage sees every image token: record where the raster starts among them."""
    if not stages or not geo.raster_offset:
        return stages
    return (replace(stages[0], raster_offset=geo.raster_offset), *stages[1:])


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
        stride = geometry_grid_stride(geo, b1)
        if stride == 0:
            raise FeatherError(
                f"budget {b1} is too small for FEATHER's uniform grid (it needs |grid| <= budget/2); "
                "use a larger --budget or --stride 0 to disable the grid")
    elif stride < 0:
        raise FeatherError(f"--stride must be >= 0 (0 disables the grid), got {stride}")
    elif geo.grid_count(stride) > b1:
        raise FeatherError(
            f"--stride {stride} forces a grid of {geo.grid_count(stride)} tokens, more than "
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
    crops = geo.crops()
    if not crops:
        return (Stage(0, budget, geo.num_image_tokens, "fastervlm"),)
    per_patch = len(crops[0])
    if budget % len(crops) or not 1 <= budget // len(crops) <= per_patch:
        raise FeatherError(
            f"--method fastervlm keeps budget / crops patches per crop: --budget {budget} must be a "
            f"multiple of the {len(crops)} crops (base image + {len(crops) - 1}) between "
            f"{len(crops)} and {len(crops) * per_patch}, e.g. {default_crop_budget(geo)}")
    newlines = len(geo.free_indices())
    return (Stage(0, budget + newlines, geo.num_image_tokens, "fastervlm",
                  per_crop=budget // len(crops)),)


def default_crop_budget(geo: ModelGeometry) -> int:
    """FasterVLM's default on crops: a quarter of each crop's patches, in every crop."""
    crops = geo.crops()
    return max(1, len(crops[0]) // 4) * len(crops)


def btp_default_layers(num_layers: int, num_image_tokens: int) -> tuple[int, ...]:
    """Ks = round(L x {3, 6, 14, 22} / 32), each at least 1 and above the previous one; refused
    (with a schedule that fits suggested) when the last passes L-1."""
    layers, previous = [], 0
    for ref in BTP_REFERENCE_LAYERS:
        k = max(1, previous + 1, round_half_up(Fraction(num_layers * ref, BTP_REFERENCE_NUM_LAYERS)))
        layers.append(k)
        previous = k
    if layers[-1] > num_layers - 1:
        counts = btp_fitting_counts(num_image_tokens, max(1, min(len(layers), num_layers - 1)))
        example = ",".join(f"{i + 1}:{c}" for i, c in enumerate(counts))
        raise FeatherError(
            f"BTP's default schedule (layers {', '.join(map(str, layers))}, scaled from LLaVA-1.5-7B's "
            f"3, 6, 14, 22 of 32) does not fit a {num_layers}-layer decoder (prune layers must be "
            f"1..{num_layers - 1}); give a --schedule, e.g. --schedule {example}")
    return tuple(layers)


def btp_default_counts(num_image_tokens: int) -> tuple[int, ...]:
    """Bs = round(N x {1/2, 1/4, 1/12}), then 0."""
    return (*(round_half_up(num_image_tokens * f) for f in BTP_COUNT_FRACTIONS), 0)


def btp_fitting_counts(num_image_tokens: int, stages: int) -> tuple[int, ...]:
    """Counts for a schedule of ``stages`` (1..4) stages: the default counts with the final 0 kept
    (fewer stages drop the later non-zero counts); one stage keeps round(N/2)."""
    counts = btp_default_counts(num_image_tokens)
    return counts[:1] if stages == 1 else (*counts[:stages - 1], 0)


def parse_btp_lambda(text: str | tuple) -> tuple[Decimal, ...]:
    """``"0.3,0.9,1.0"`` -> exact decimals in [0, 1]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            value = Decimal(str(item).strip())
        except InvalidOperation:
            value = None
        if value is None or not value.is_finite() or not 0 <= value <= 1:
            raise FeatherError(f"--btp-lambda item {str(item).strip()!r} is not a number between 0 "
                               "and 1; write e.g. --btp-lambda 0.3,0.9,1.0")
        out.append(value)
    if not out:
        raise FeatherError("--btp-lambda is empty; write e.g. --btp-lambda 0.3,0.9,1.0")
    return tuple(out)


def btp_stage_fields(stage_index: int, keep: int, num_in: int, weight: Decimal) -> dict:
    """m = floor(lambda x B), the pool floor(rho x m) capped at n, |F| = round(B1/2) at stage 1
    (floors on exact decimals)."""
    if keep == 0:
        return {}
    m = math.floor(weight * keep)
    rho = BTP_RHO[min(stage_index, len(BTP_RHO) - 1)]
    return {"attention_count": m, "candidate_count": min(num_in, math.floor(rho * m)),
            "seed_count": round_half_up(Fraction(keep, 2)) if stage_index == 0 else 0,
            "weight": str(weight)}


def _btp_stages(geo: ModelGeometry, budget, schedule, btp_lambda) -> tuple[Stage, ...]:
    if schedule:
        pairs = schedule
    else:
        pairs = tuple(zip(btp_default_layers(geo.num_layers, geo.num_image_tokens),
                          btp_default_counts(geo.num_image_tokens)))
    if budget is not None and budget != pairs[0][1]:
        raise FeatherError(
            f"--budget {budget} disagrees with BTP's first-stage count {pairs[0][1]} "
            f"({'--schedule' if schedule else 'default: N/2'}); BTP's counts come from its schedule: "
            "drop --budget or give --schedule LAYER:COUNT,... starting with that count")
    weights = parse_btp_lambda(btp_lambda) if btp_lambda is not None else BTP_DEFAULT_LAMBDA
    stages, num_in = [], geo.num_image_tokens
    for i, (layer, keep) in enumerate(pairs):
        if keep == 0 and i != len(pairs) - 1:
            raise FeatherError(f"BTP stage {i + 1} keeps 0 tokens; only the last stage may keep 0")
        if not 0 <= keep <= num_in or (keep == num_in and num_in > 0 and i > 0):
            raise FeatherError(f"BTP counts must decrease (B1 > B2 > ... >= 0, B1 <= "
                               f"{geo.num_image_tokens}); stage {i + 1} keeps {keep} of {num_in}")
        weight = weights[min(i, len(weights) - 1)]
        stages.append(Stage(layer, keep, num_in, "btp", **btp_stage_fields(i, keep, num_in, weight)))
        num_in = keep
    return tuple(stages)


def _check_count(keep: int, available: int, what: str, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= keep <= available:
        raise FeatherError(f"{what} keeps {keep} tokens; it must be between {low} and {available}")


def _check_stages(method: str, stages: tuple[Stage, ...], geo: ModelGeometry) -> None:
    previous_layer = 0
    for i, stage in enumerate(stages):
        _check_count(stage.keep, stage.num_in, f"{method} stage {i + 1}",
                     allow_zero=method == "btp" and i == len(stages) - 1)
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
