"""What the exporter and the pruning setup need to know about a model's shape."""
from __future__ import annotations

from dataclasses import dataclass

from feather_export.errors import FeatherError


@dataclass(frozen=True)
class ModelGeometry:
    """What the pruning setup needs to know about a model."""

    num_layers: int          # decoder layers L
    num_image_tokens: int    # N (image tokens in the LLM sequence, CLS dropped)
    grid_side: int           # N == grid_side ** 2

    def __post_init__(self) -> None:
        if self.grid_side ** 2 != self.num_image_tokens:
            raise FeatherError(
                f"image tokens ({self.num_image_tokens}) do not form a square grid; "
                "only square patch grids are supported")


def geometry_of(config) -> ModelGeometry:
    """The pruning geometry of a ``LlavaConfig`` (refuses layouts the exporter does not handle)."""
    vision = config.vision_config
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise FeatherError("only vision_feature_select_strategy='default' (CLS dropped) is supported")
    if not isinstance(config.vision_feature_layer, int):
        raise FeatherError("a list of vision_feature_layer values is not supported; use one layer")
    side = vision.image_size // vision.patch_size
    return ModelGeometry(config.text_config.num_hidden_layers, side * side, side)
