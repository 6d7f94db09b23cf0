"""Export shape-only models: several artifacts from one shape model's streamed weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from feather_export.models.shapes import shape_llava_config, shape_weights


def export_shape_artifacts(name: str, jobs: Sequence[tuple[str | os.PathLike, object]],
                           progress: Callable[[str], None] | None = None) -> list[Path]:
    """Export ``jobs`` = [(out_dir, ExportOptions), ...] of the shape model ``name``.

    Same artifact layout and atomic write as ``feather_export.export.artifact.export``; the
    manifest's model id is the shape name. Each job streams the weights, generated per tensor.
    """
    from feather_export.export.artifact import check_export, export_model
    from feather_export.models.geometry import geometry_of

    from feather_export.export.footprint import check_free_disk, estimated_bytes

    config = shape_llava_config(name)
    # refuse bad options for every job before any weight is generated
    plans = [(Path(out), options,
              check_export(options, geometry_of(config, options.resolution), Path(out), config))
             for out, options in jobs]
    weights = shape_weights(name)
    for out, options, _ in plans:
        check_free_disk(out, estimated_bytes(weights, options))
    return [export_model(weights, name, None, out, options, cfg, progress)
            for out, options, cfg in plans]
