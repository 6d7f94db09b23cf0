"""Kept-token overlays: which image patches each pruning stage kept, drawn over the image.

``draw_overlay(image, kept_per_stage, grid_side, out_png)`` writes one PNG with a panel per stage
(the input image first); dropped patches are dimmed, kept ones outlined. Image tokens that are no
patch (the CLS under strategy ``full``: ``raster_offset`` tokens before the raster) are reported in
the panel's label instead. Pillow + numpy only, so the runtime side (``feather-export run
--overlay``) needs nothing else.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from feather_runtime.errors import FeatherError

PANEL = 336                        # px per panel side
_DIM = 0.25                        # brightness of dropped patches
_KEPT_OUTLINE = (255, 40, 200)
_LABEL_H = 18


def square_view(image, size: int | None = None):
    """The image as the CLIP preprocessor frames it: shortest edge resized, centre crop, RGB."""
    from PIL import Image

    from feather_runtime.preprocess import load_image

    pil = load_image(image)
    short = min(pil.size)
    size = size or short
    scale = size / short
    width, height = max(size, round(pil.width * scale)), max(size, round(pil.height * scale))
    pil = pil.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return pil.crop((left, top, left + size, top + size))


def view_from_pixels(pixel_values: np.ndarray, mean: Sequence[float], std: Sequence[float]):
    """Undo rescale + normalization of preprocessed pixels [1, 3, H, W]: exactly what the model saw."""
    from PIL import Image

    px = np.asarray(pixel_values, dtype=np.float32).reshape(3, *np.shape(pixel_values)[-2:])
    rgb = px * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return Image.fromarray(np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def _is_count(value, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low


def _check(kept_per_stage, grid_side: int, raster_offset: int) -> list[np.ndarray]:
    if not _is_count(grid_side, 1):
        raise FeatherError(f"grid_side must be a positive integer, got {grid_side!r}")
    if not _is_count(raster_offset, 0):
        raise FeatherError(f"raster_offset must be a non-negative integer, got {raster_offset!r}")
    n = int(raster_offset) + int(grid_side) ** 2
    where = (f"the {grid_side} x {grid_side} grid" if not raster_offset else
             f"the {n} image tokens ({raster_offset} before the {grid_side} x {grid_side} grid)")
    stages = []
    for i, kept in enumerate(kept_per_stage or ()):
        arr = np.asarray(kept, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise FeatherError(f"stage {i + 1} keeps index {int(arr.max() if arr.max() >= n else arr.min())}, "
                               f"outside {where} (0..{n - 1})")
        stages.append(arr)
    return stages


def _stage_label(i: int, kept: np.ndarray, total: int, raster_offset: int) -> str:
    label = f"stage {i + 1}: {kept.size}/{total} kept"
    if raster_offset == 1:
        label += ", CLS " + ("kept" if (kept == 0).any() else "dropped")
    elif raster_offset > 1:
        label += f", {int((kept < raster_offset).sum())}/{raster_offset} non-patch kept"
    return label


def _panel(view, kept: np.ndarray | None, grid_side: int, label: str, cols: int | None = None):
    """One panel: ``view`` with a grid_side (rows) x cols raster; ``kept`` row-major in it."""
    from PIL import Image, ImageDraw

    rows_n, cols_n = grid_side, cols or grid_side
    width = round(PANEL * cols_n / rows_n)
    base = view.resize((width, PANEL), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (width, PANEL + _LABEL_H), (255, 255, 255))
    cell = PANEL / rows_n
    if kept is not None:
        mask = np.zeros(rows_n * cols_n, bool)
        mask[kept] = True
        pixels = np.asarray(base, dtype=np.float32)
        rows = np.minimum((np.arange(PANEL) / cell).astype(int), rows_n - 1)
        cols_px = np.minimum((np.arange(width) / cell).astype(int), cols_n - 1)
        keep_px = mask.reshape(rows_n, cols_n)[rows][:, cols_px]
        pixels[~keep_px] *= _DIM
        base = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(base)
        for index in kept:
            r, c = divmod(int(index), cols_n)
            draw.rectangle((round(c * cell), round(r * cell), round((c + 1) * cell) - 1,
                            round((r + 1) * cell) - 1), outline=_KEPT_OUTLINE)
    canvas.paste(base, (0, _LABEL_H))
    ImageDraw.Draw(canvas).text((4, 3), label, fill=(0, 0, 0))
    return canvas


def draw_overlay(image, kept_per_stage, grid_side: int, out_png: str | os.PathLike,
                 title: str | None = None, image_size: int | None = None,
                 raster_offset: int = 0) -> Path:
    """Write ``out_png``: the (square, preprocessed-framing) image, then one panel per stage.

    ``kept_per_stage``: original image-token indices kept by each stage, as ``Result.kept`` /
    ``ReferenceResult.kept`` give them; empty for no pruning. Index i is the patch i -
    ``raster_offset`` of the row-major ``grid_side`` grid; the ``raster_offset`` tokens before it
    (the CLS under strategy ``full``) are named in the panel's label, not drawn.
    ``image``: a path, PIL image or uint8 array; non-square images are framed like the CLIP
    preprocessor (shortest edge, centre crop) at ``image_size`` (default: the short side).
    """
    from PIL import Image

    stages = _check(kept_per_stage, grid_side, raster_offset)
    view = square_view(image, image_size)
    total = raster_offset + grid_side * grid_side
    panels = [_panel(view, None, grid_side, "input")]
    for i, kept in enumerate(stages):
        patches = kept[kept >= raster_offset] - raster_offset
        panels.append(_panel(view, patches, grid_side, _stage_label(i, kept, total, raster_offset)))
    head = _LABEL_H if title else 0
    sheet = Image.new("RGB", (PANEL * len(panels) + 4 * (len(panels) - 1), PANEL + _LABEL_H + head),
                      (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (PANEL + 4), head))
    return _save_sheet(sheet, title, out_png)


def _save_sheet(sheet, title: str | None, out_png) -> Path:
    """Write the panel sheet (with its title line) as a PNG."""
    from PIL import ImageDraw

    if title:
        ImageDraw.Draw(sheet).text((4, 3), title, fill=(0, 0, 0))
    out = Path(out_png)
    if out.parent and not out.parent.exists():
        raise FeatherError(f"cannot write {out}: the directory {out.parent} does not exist")
    sheet.save(out, format="PNG")
    return out


def raster_local(kept, raster) -> np.ndarray:
    """The kept sequence indices that fall on ``raster`` ([start, rows, cols, pitch]), as row-major
    indices into it (newlines and other rasters dropped)."""
    start, rows, cols, pitch = (int(v) for v in raster)
    offset = np.asarray(kept, np.int64) - start
    on = (offset >= 0) & (offset < rows * pitch) & (offset % pitch < cols)
    return (offset[on] // pitch) * cols + offset[on] % pitch


def draw_raster_overlay(views, kept_per_stage, rasters, out_png: str | os.PathLike,
                        title: str | None = None) -> Path:
    """Several rasters (LLaVA-NeXT: the base image and the high-resolution stitched view): one row
    of panels per raster, ``views[i]`` (a PIL image) under raster ``rasters[i]`` = [start, rows,
    cols, pitch]; the input first, then each stage's kept patches on that raster."""
    from PIL import Image

    names = ("base image", "high-resolution view")
    rows_of_panels = []
    for i, (view, raster) in enumerate(zip(views, rasters)):
        _, rows, cols, _ = (int(v) for v in raster)
        name = names[i] if i < len(names) else f"raster {i + 1}"
        panels = [_panel(view, None, rows, f"{name} ({rows}x{cols})", cols)]
        for s, kept in enumerate(kept_per_stage or ()):
            local = raster_local(kept, raster)
            panels.append(_panel(view, local, rows, f"stage {s + 1}: {local.size}/{rows * cols} kept",
                                 cols))
        rows_of_panels.append(panels)
    head = _LABEL_H if title else 0
    width = max(sum(p.width for p in row) + 4 * (len(row) - 1) for row in rows_of_panels)
    sheet = Image.new("RGB", (width, (PANEL + _LABEL_H + 4) * len(rows_of_panels) + head),
                      (255, 255, 255))
    for r, row in enumerate(rows_of_panels):
        x = 0
        for panel in row:
            sheet.paste(panel, (x, head + r * (PANEL + _LABEL_H + 4)))
            x += panel.width + 4
    return _save_sheet(sheet, title, out_png)


def draw_pipeline_overlay(pipe, image, result, out_png: str | os.PathLike, title: str | None = None) -> Path:
    """``draw_overlay`` for a ``feather_runtime.Pipeline`` result, on exactly the pixels the model
    saw (LLaVA-NeXT: the base crop and the letterboxed high-resolution image)."""
    pre = pipe.preprocessor
    anyres = pipe.manifest["model"].get("anyres")
    if anyres:
        crop = pre.crop
        pixels = pre(image)[0]                                    # [crops, 3, h, w]
        mean = crop.image_mean if crop.do_normalize else (0, 0, 0)
        std = crop.image_std if crop.do_normalize else (1, 1, 1)
        gh, gw = anyres["grid"]
        tiles = [np.asarray(view_from_pixels(p, mean, std)) for p in pixels[1:]]
        stitched = np.concatenate([np.concatenate(tiles[r * gw:(r + 1) * gw], axis=1)
                                   for r in range(gh)], axis=0)
        from PIL import Image

        views = [view_from_pixels(pixels[0], mean, std), Image.fromarray(stitched)]
        return draw_raster_overlay(views, result.kept, anyres["rasters"], out_png, title=title)
    if not pre.do_rescale:
        raise FeatherError("overlays need a preprocessor that rescales to 0..1 (do_rescale=true)")
    pixels = pre(image)
    view = view_from_pixels(pixels, pre.image_mean if pre.do_normalize else (0, 0, 0),
                            pre.image_std if pre.do_normalize else (1, 1, 1))
    model = pipe.manifest["model"]
    offset = model["num_image_tokens"] - model["grid_side"] ** 2      # image tokens before the raster
    return draw_overlay(view, result.kept, model["grid_side"], out_png, title=title,
                        raster_offset=offset)
