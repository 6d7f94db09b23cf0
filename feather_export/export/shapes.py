"""Export shape-only models: build the random-weight model once, write several artifacts from it."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from feather_export.models.shapes import build_shape_model, shape_llava_config, shape_spec


def export_shape_artifacts(name: str, jobs: Sequence[tuple[str | os.PathLike, object]],
                           progress: Callable[[str], None] | None = None, model=None) -> list[Path]:
    """Export ``jobs`` = [(out_dir, ExportOptions), ...] from one in-process shape model.

    Same artifact layout and atomic write as ``feather_export.export.artifact.export``; the manifest's model
    id is the shape name. ``model`` may be passed to reuse one already built.
    """
    from feather_export.export.artifact import check_export, export_model
    from feather_export.models.geometry import geometry_of

    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    geo = geometry_of(shape_llava_config(name))
    # refuse bad options for every job before building weights
    plans = [(Path(out), options, check_export(options, geo, Path(out))) for out, options in jobs]
    if model is None:
        say(f"building {name}: {shape_spec(name).description}")
        model = build_shape_model(name, say)
    return [export_model(model, name, None, out, options, cfg, say) for out, options, cfg in plans]
