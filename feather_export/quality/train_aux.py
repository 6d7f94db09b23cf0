"""Auxiliary vision objectives for training tiny-shapes: a stand-in for CLIP pretraining.

Linear probes on the vision tower's *feature layer* (what the LLM sees) are trained with the task
and discarded afterwards; the saved model stays a plain LLaVA. From scratch on CPU, answers alone
teach the ViT slowly; these targets make each patch state say what it shows:

- per patch: the colour and the shape of the object covering it (or background), whether it holds
  an object's centre (one patch per object, whatever its size: what counting needs), and its own
  grid row and column (so positions stay readable after the ViT mixes content in);
- on the CLS state: which (colour, shape) pairs and which 3 x 3 cells are occupied. This gives the
  CLS token the object-summarising role CLIP's CLS has and FasterVLM's criterion presumes; without
  it the CLS query would get no gradient at all (its output feeds nothing), and FasterVLM's scores
  would be noise by construction rather than by method.
"""
from __future__ import annotations

import numpy as np

from feather_export.quality.synthetic import COLOURS, GRID_CELLS, SHAPES, Sample

SCENE_SIZE = len(COLOURS) * len(SHAPES) + GRID_CELLS * GRID_CELLS
COVER = 0.25                 # a patch shows an object when the object covers >= 25% of it
_COLOURS = list(COLOURS)


def scene_target(sample: Sample) -> np.ndarray:
    """Multi-hot float32 [SCENE_SIZE]: (colour, shape) pairs present, then the occupied cells."""
    pairs = np.zeros((len(COLOURS), len(SHAPES)), np.float32)
    cells = np.zeros(GRID_CELLS * GRID_CELLS, np.float32)
    for o in sample.scene.objects:
        pairs[_COLOURS.index(o.colour), SHAPES.index(o.shape)] = 1
        cells[o.row * GRID_CELLS + o.col] = 1
    return np.concatenate([pairs.reshape(-1), cells])


def object_centre(obj) -> tuple[float, float]:
    """A point inside the object: the box centre, or a triangle's centroid."""
    if obj.shape == "triangle":
        x0, y0, x1, y1 = obj.bbox()
        return obj.cx, (y0 + 2 * (y1 - 1)) / 3
    return obj.cx, obj.cy


def patch_targets(sample: Sample, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch of a ``grid`` x ``grid`` raster: colour class (0 = background, 1.. = COLOURS),
    shape class (0 = background, 1.. = SHAPES) and the object-centre flag."""
    scene = sample.scene
    labels = scene.label_map()
    if scene.image_size % grid:
        from PIL import Image

        side = grid * -(-scene.image_size // grid)
        labels = np.asarray(Image.fromarray(labels).resize((side, side), Image.Resampling.NEAREST))
    cell = labels.shape[0] // grid
    blocks = labels.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    colour = np.zeros(grid * grid, np.int64)
    shape = np.zeros(grid * grid, np.int64)
    centre = np.zeros(grid * grid, np.float32)
    cover = np.stack([(blocks == i + 1).mean(axis=1) for i in range(len(scene.objects))])
    best = cover.argmax(axis=0)
    shown = cover.max(axis=0) >= COVER
    scale = grid / scene.image_size
    for i, o in enumerate(scene.objects):
        mine = shown & (best == i)
        colour[mine] = 1 + _COLOURS.index(o.colour)
        shape[mine] = 1 + SHAPES.index(o.shape)
        x, y = object_centre(o)
        centre[int(y * scale) * grid + int(x * scale)] = 1
    return colour, shape, centre


def _patch_heads(width: int, grid: int):
    import torch

    return torch.nn.ModuleDict({
        "colour": torch.nn.Linear(width, 1 + len(COLOURS)),
        "shape": torch.nn.Linear(width, 1 + len(SHAPES)),
        "centre": torch.nn.Linear(width, 1),
        "row": torch.nn.Linear(width, grid),
        "col": torch.nn.Linear(width, grid),
    })


def make_heads(vision_width: int, text_width: int, grid: int):
    """The probes: scene (on CLS); colour, shape, centre, row, column on every patch, both at the
    vision feature layer and on the projector's output (the LLM's image embeddings)."""
    import torch

    return torch.nn.ModuleDict({
        "scene": torch.nn.Linear(vision_width, SCENE_SIZE),
        "vision": _patch_heads(vision_width, grid),
        "llm": _patch_heads(text_width, grid),
    })


def batch_targets(samples, grid: int) -> dict:
    """Stacked targets for the first sample of each row (the image's scene)."""
    import torch

    per = [patch_targets(s, grid) for s in samples]
    return {"scene": torch.from_numpy(np.stack([scene_target(s) for s in samples])),
            "colour": torch.from_numpy(np.stack([p[0] for p in per])),
            "shape": torch.from_numpy(np.stack([p[1] for p in per])),
            "centre": torch.from_numpy(np.stack([p[2] for p in per]))}


def _patch_losses(heads, patches, targets: dict) -> dict:
    import torch
    import torch.nn.functional as F

    grid = heads["row"].out_features
    coords = torch.arange(grid * grid, device=patches.device)
    rows = (coords // grid).expand(patches.shape[0], -1).reshape(-1)
    cols = (coords % grid).expand(patches.shape[0], -1).reshape(-1)
    on_object = targets["shape"] > 0
    n_pos = targets["centre"].sum().clamp(min=1)
    pos_weight = (targets["centre"].numel() - n_pos) / n_pos
    return {
        "colour": F.cross_entropy(heads["colour"](patches).flatten(0, 1), targets["colour"].flatten()),
        # averaged over the patches that show an object: over all patches, the easy background
        # would drown the hard part (the shape of an object seen from inside it)
        "shape": F.cross_entropy(heads["shape"](patches)[on_object], targets["shape"][on_object]),
        "centre": F.binary_cross_entropy_with_logits(
            heads["centre"](patches).squeeze(-1), targets["centre"], pos_weight=pos_weight.sqrt()),
        "row": F.cross_entropy(heads["row"](patches).flatten(0, 1), rows),
        "col": F.cross_entropy(heads["col"](patches).flatten(0, 1), cols),
    }


def aux_losses(heads, states, image_embeds, targets: dict) -> dict:
    """Probe losses on the feature-layer states [B, 1 + N, dv] (CLS first) and on the LLM's
    image embeddings [B, N, d] (None: skipped): ``scene``, ``vision.<probe>``, ``llm.<probe>``."""
    import torch.nn.functional as F

    losses = {"scene": F.binary_cross_entropy_with_logits(heads["scene"](states[:, 0]), targets["scene"])}
    for name, x in (("vision", states[:, 1:]), ("llm", image_embeds)):
        if x is None:
            continue
        for probe, loss in _patch_losses(heads[name], x, targets).items():
            losses[f"{name}.{probe}"] = loss
    return losses
