"""LLaVA-NeXT (anyres) with static shapes: the token plan of one grid pinpoint (docs/design.md §3).

An artifact is exported for **one** pinpoint ``H x W`` of the checkpoint's ``image_grid_pinpoints``
(``--resolution HxW``; default the largest square one). The runtime letterboxes every image to that
pinpoint's aspect ratio and size, so transformers' own preprocessing selects the same pinpoint,
unpadding removes nothing and the image-token count is static:

    base raster (s x s, s = vision image_size / patch_size)
    + the gh x gw crops stitched into a (s gh) x (s gw) raster, each row followed by one newline

N = s^2 + (s gh)(s gw) + s gh; for llava-v1.6 (s = 24) at 672x672: 576 + 2304 + 48 = 2928.
Nothing here imports torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from feather_export.errors import FeatherError
from feather_export.models.geometry import ModelGeometry, Raster


def _get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def select_best_resolution(original_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """transformers' ``select_best_resolution`` ((height, width) in and out): the pinpoint with the
    largest effective resolution, then the least waste; the first one on a tie."""
    height, width = original_size
    best, best_effective, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    return best


def parse_resolution(text: str) -> tuple[int, int]:
    """``"672x672"`` -> (672, 672) (height x width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match:
        raise FeatherError(f"--resolution {text!r} is not HxW; write e.g. --resolution 672x672")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class AnyresPlan:
    """The static token plan of one pinpoint (height, width)."""

    pinpoint: tuple[int, int]     # (height, width) in pixels
    crop_size: int                # the vision tower's input side (pixels)
    side: int                     # patches per crop side
    num_layers: int               # decoder layers

    @property
    def grid(self) -> tuple[int, int]:
        """(gh, gw): crops down and across."""
        return self.pinpoint[0] // self.crop_size, self.pinpoint[1] // self.crop_size

    @property
    def num_crops(self) -> int:
        """Vision batch: the base image + gh x gw crops."""
        gh, gw = self.grid
        return 1 + gh * gw

    @property
    def stitched(self) -> tuple[int, int]:
        gh, gw = self.grid
        return self.side * gh, self.side * gw

    @property
    def num_newlines(self) -> int:
        return self.stitched[0]

    @property
    def num_image_tokens(self) -> int:
        rows, cols = self.stitched
        return self.side ** 2 + rows * cols + rows

    def geometry(self) -> ModelGeometry:
        rows, cols = self.stitched
        base = Raster(0, self.side, self.side, self.side)
        return ModelGeometry(self.num_layers, self.num_image_tokens, self.side,
                             rasters=(base, Raster(self.side ** 2, rows, cols, cols + 1)),
                             crop_side=self.side, image_size=self.pinpoint)

    def to_dict(self) -> dict:
        """The manifest's ``anyres`` block (what the runtime's letterbox needs)."""
        return {"pinpoint": list(self.pinpoint), "crop_size": self.crop_size,
                "num_crops": self.num_crops, "grid": list(self.grid),
                "num_image_tokens": self.num_image_tokens}


def pinpoints_of(config) -> list[tuple[int, int]]:
    raw = _get(config, "image_grid_pinpoints")
    if not isinstance(raw, (list, tuple)) or not raw:
        raise FeatherError("image_grid_pinpoints must be a non-empty list of [height, width]")
    out = []
    for item in raw:
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in item)):
            raise FeatherError(f"image_grid_pinpoints item {item!r} is not [height, width]")
        out.append((int(item[0]), int(item[1])))
    return out


def default_pinpoint(pinpoints) -> tuple[int, int]:
    """The largest square pinpoint (672x672 for llava-v1.6); refused when there is none."""
    squares = [p for p in pinpoints if p[0] == p[1]]
    if not squares:
        listed = ", ".join(f"{h}x{w}" for h, w in pinpoints)
        raise FeatherError(f"image_grid_pinpoints has no square pinpoint; choose one with "
                           f"--resolution ({listed})")
    return max(squares)


def anyres_plan(config, resolution: str | tuple[int, int] | None = None) -> AnyresPlan:
    """The token plan of a ``LlavaNextConfig`` (or its config.json dict) for one pinpoint; refuses
    a resolution that is not one of its pinpoints or that the static plan cannot reproduce."""
    pinpoints = pinpoints_of(config)
    vision = _get(config, "vision_config") or {}
    crop, patch = _get(vision, "image_size", 336), _get(vision, "patch_size", 14)
    text = _get(config, "text_config") or {}
    listed = ", ".join(f"{h}x{w}" for h, w in pinpoints)
    if resolution is None:
        pinpoint = default_pinpoint(pinpoints)
    else:
        pinpoint = parse_resolution(resolution) if isinstance(resolution, str) else tuple(resolution)
        if pinpoint not in pinpoints:
            raise FeatherError(f"--resolution {pinpoint[0]}x{pinpoint[1]} is not one of the "
                               f"checkpoint's image_grid_pinpoints ({listed})")
    if crop % patch:
        raise FeatherError(f"vision image_size {crop} is not a multiple of patch_size {patch}")
    if pinpoint[0] % crop or pinpoint[1] % crop:
        raise FeatherError(f"pinpoint {pinpoint[0]}x{pinpoint[1]} is not a whole number of "
                           f"{crop}-pixel crops; the static plan needs whole crops")
    if select_best_resolution(pinpoint, pinpoints) != pinpoint:
        raise FeatherError(f"pinpoint {pinpoint[0]}x{pinpoint[1]}: transformers would process an "
                           "image of that size at another pinpoint; choose another --resolution")
    return AnyresPlan(pinpoint, crop, crop // patch, _get(text, "num_hidden_layers", 32))


def pinpoint_table(config) -> list[dict]:
    """Token counts of every pinpoint of a NeXT config (for the README and ``--help``)."""
    rows = []
    for pinpoint in pinpoints_of(config):
        plan = anyres_plan(config, pinpoint)
        rows.append({"resolution": f"{pinpoint[0]}x{pinpoint[1]}", "crops": plan.num_crops,
                     "stitched": f"{plan.stitched[0]}x{plan.stitched[1]}",
                     "newlines": plan.num_newlines, "num_image_tokens": plan.num_image_tokens})
    return rows
