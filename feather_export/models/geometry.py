"""What the exporter and the pruning setup need to know about a model's shape."""
from __future__ import annotations

from dataclasses import dataclass

from feather_export.errors import FeatherError


@dataclass(frozen=True)
class ModelGeometry:
    """What the pruning setup needs to know about a model."""

    num_layers: int          # decoder layers L
    num_image_tokens: int    # N (image tokens in the LLM sequence: the raster, no CLS)
    grid_side: int           # N == grid_side ** 2

    def __post_init__(self) -> None:
        if self.grid_side ** 2 != self.num_image_tokens:
            raise FeatherError(
                f"image tokens ({self.num_image_tokens}) do not form a square grid; "
                "only square patch grids are supported")


def geometry_of(config) -> ModelGeometry:
    """The pruning geometry of a ``LlavaConfig`` (refuses layouts the exporter does not handle)."""
    from feather_export.models.family import check_config

    check_config(config)
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return ModelGeometry(config.text_config.num_hidden_layers, side * side, side)
