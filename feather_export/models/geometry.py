"""What the exporter and the pruning setup need to know about a model's shape."""
from __future__ import annotations

from dataclasses import dataclass

from feather_export.errors import FeatherError


@dataclass(frozen=True)
class ModelGeometry:
    """What the pruning setup needs to know about a model.

    The image tokens (indices 0..N-1 in sequence order) are ``raster_offset`` tokens that belong
    to no raster (the CLS token under strategy ``full`` on a CLIP tower), then the
    ``grid_side`` x ``grid_side`` patch raster in row-major order.
    """

    num_layers: int          # decoder layers L
    num_image_tokens: int    # N: image tokens in the LLM sequence (raster_offset + grid_side ** 2)
    grid_side: int           # side of the patch raster
    raster_offset: int = 0   # image index of the first raster token (1: CLS before the raster)

    def __post_init__(self) -> None:
        if self.raster_offset < 0 or self.grid_side ** 2 + self.raster_offset != self.num_image_tokens:
            raise FeatherError(
                f"image tokens ({self.num_image_tokens}) are not {self.raster_offset} non-raster "
                f"token(s) plus a square grid; only square patch grids are supported")

    @property
    def raster_tokens(self) -> int:
        return self.grid_side ** 2


def geometry_of(config) -> ModelGeometry:
    """The pruning geometry of a ``LlavaConfig`` (refuses layouts the exporter does not handle)."""
    from feather_export.models.family import check_config

    _, spec = check_config(config)
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return ModelGeometry(config.text_config.num_hidden_layers, spec.raster_offset + side * side,
                         side, spec.raster_offset)
