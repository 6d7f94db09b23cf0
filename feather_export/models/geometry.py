"""What the exporter and the pruning setup need to know about a model's shape.

The image tokens of a model are described declaratively by their **rasters** (docs/design.md §3.1):
each raster is a rows x cols patch grid placed at ``start`` in the image-token sequence, rows
``pitch`` tokens apart (``pitch == cols + 1`` when a newline token ends each row, as in
LLaVA-NeXT's stitched raster). Tokens in no raster (newlines) are never forced and, for per-crop
selection, always kept. LLaVA-1.5 has one square raster at 0; LLaVA-NeXT has the base raster
followed by the stitched raster of its crops (``models.anyres`` builds that plan).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from feather_export.errors import FeatherError


@dataclass(frozen=True)
class Raster:
    """A rows x cols patch grid at ``start`` in the image-token sequence, rows ``pitch`` apart."""

    start: int
    rows: int
    cols: int
    pitch: int

    @property
    def end(self) -> int:
        """One past the sequence index of its last token (a trailing newline included)."""
        return self.start + (self.rows - 1) * self.pitch + max(self.cols, self.pitch)

    def indices(self) -> np.ndarray:
        """Sequence indices of its patches, row-major."""
        r, c = np.divmod(np.arange(self.rows * self.cols), self.cols)
        return (self.start + r * self.pitch + c).astype(np.int64)

    def grid(self, stride: int) -> np.ndarray:
        """Sequence indices of the patches whose row and column are multiples of ``stride``."""
        if stride <= 0:
            return np.zeros(0, np.int64)
        rows, cols = np.arange(0, self.rows, stride), np.arange(0, self.cols, stride)
        return (self.start + rows[:, None] * self.pitch + cols[None, :]).reshape(-1).astype(np.int64)

    def blocks(self, side: int) -> list[np.ndarray]:
        """The side x side blocks (crops) of the raster, row-major; each block's sequence indices in
        its own row-major order (which is ascending)."""
        out = []
        for br in range(self.rows // side):
            for bc in range(self.cols // side):
                r, c = np.divmod(np.arange(side * side), side)
                out.append((self.start + (br * side + r) * self.pitch + bc * side + c).astype(np.int64))
        return out


@dataclass(frozen=True)
class ModelGeometry:
    """What the pruning setup needs to know about a model.

    The image tokens (indices 0..N-1 in sequence order) are described by ``rasters``. Empty
    ``rasters`` means ``raster_offset`` tokens that belong to no raster (the CLS token under
    strategy ``full`` on a CLIP tower), then the ``grid_side`` x ``grid_side`` patch raster.
    ``crop_side`` > 0: the image is a batch of crops of crop_side x crop_side patches (the base
    image first, then each raster block in row-major order), and FasterVLM selects per crop.
    """

    num_layers: int          # decoder layers L
    num_image_tokens: int    # N: image tokens in the LLM sequence
    grid_side: int           # side of the (first, base) patch raster
    raster_offset: int = 0   # image index of the first raster token (1: CLS before the raster)
    rasters: tuple[Raster, ...] = field(default=())
    crop_side: int = 0
    image_size: tuple[int, int] | None = None   # (H, W) of the image the crops come from (NeXT)

    def __post_init__(self) -> None:
        if not self.rasters:
            if self.raster_offset < 0 or self.grid_side ** 2 + self.raster_offset != self.num_image_tokens:
                raise FeatherError(
                    f"image tokens ({self.num_image_tokens}) are not {self.raster_offset} non-raster "
                    f"token(s) plus a square grid; only square patch grids are supported")
            side = self.grid_side
            object.__setattr__(self, "rasters", (Raster(self.raster_offset, side, side, side),))
        covered = np.concatenate([r.indices() for r in self.rasters])
        if (len(np.unique(covered)) != len(covered) or covered.min() < 0
                or covered.max() >= self.num_image_tokens):
            raise FeatherError("the image rasters overlap or fall outside the image tokens")

    @property
    def raster_tokens(self) -> int:
        return self.grid_side ** 2

    @property
    def single_raster(self) -> bool:
        """One square raster after ``raster_offset`` non-raster tokens holding every other image
        token (what the op's grid attributes describe)."""
        r = self.rasters[0]
        return (len(self.rasters) == 1 and r.start == self.raster_offset
                and r.rows == r.cols == r.pitch
                and r.start + r.rows * r.cols == self.num_image_tokens)

    def grid_indices(self, stride: int) -> np.ndarray:
        """The forced grid: every raster's stride grid, united (sorted sequence indices)."""
        if stride <= 0:
            return np.zeros(0, np.int64)
        return np.sort(np.concatenate([r.grid(stride) for r in self.rasters]))

    def grid_count(self, stride: int) -> int:
        return len(self.grid_indices(stride))

    def grid_mask(self, stride: int) -> np.ndarray:
        mask = np.zeros(self.num_image_tokens, bool)
        mask[self.grid_indices(stride)] = True
        return mask

    @property
    def max_side(self) -> int:
        return max(max(r.rows, r.cols) for r in self.rasters)

    def free_indices(self) -> np.ndarray:
        """Image tokens in no raster (LLaVA-NeXT's newlines, a leading CLS), ascending."""
        mask = np.ones(self.num_image_tokens, bool)
        for r in self.rasters:
            mask[r.indices()] = False
        return np.flatnonzero(mask).astype(np.int64)

    def crops(self) -> list[np.ndarray]:
        """Per crop (the vision batch order), its tokens' sequence indices; [] without crops."""
        if self.crop_side <= 0:
            return []
        return [block for r in self.rasters for block in r.blocks(self.crop_side)]

    def to_dict(self) -> dict:
        """The manifest's description of the image tokens."""
        return {"rasters": [[r.start, r.rows, r.cols, r.pitch] for r in self.rasters],
                "crop_side": self.crop_side,
                "image_size": list(self.image_size) if self.image_size else None}


def geometry_from_manifest(model: dict) -> ModelGeometry:
    """The geometry an artifact's manifest (its ``model`` block) records."""
    tokens = model.get("image_tokens") or {}
    rasters = tuple(Raster(*r) for r in tokens.get("rasters", ()))
    size = tokens.get("image_size")
    return ModelGeometry(model["num_layers"], model["num_image_tokens"], model["grid_side"],
                         model["num_image_tokens"] - model["grid_side"] ** 2 if not rasters else 0,
                         rasters=rasters, crop_side=tokens.get("crop_side", 0),
                         image_size=tuple(size) if size else None)


def geometry_of(config, resolution=None) -> ModelGeometry:
    """The pruning geometry of a ``LlavaConfig`` / ``LlavaNextConfig`` (refuses layouts the exporter
    does not handle); ``resolution``: LLaVA-NeXT's pinpoint (default the largest square one)."""
    from feather_export.models.family import check_config, model_kind

    _, spec = check_config(config, resolution=resolution)
    if model_kind(config).anyres:
        from feather_export.models.anyres import anyres_plan

        return anyres_plan(config, resolution).geometry()
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return ModelGeometry(config.text_config.num_hidden_layers, spec.raster_offset + side * side,
                         side, spec.raster_offset)
