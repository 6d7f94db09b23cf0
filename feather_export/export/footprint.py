"""How many bytes an export writes, from tensor shapes alone, and the free-disk check.

The estimate counts every tensor the segments store, in the artifact's dtype: the vision tower up
to its deepest feature layer (not its post-norm or pooling head; stored once however many
LLaVA-NeXT crops run through it), the projector, LLaVA-NeXT's ``image_newline``, the embedding
table, every decoder layer, the final norm and lm_head (again when tied: it is its own
initializer), quantized linears at their code size plus scales. No weight is read.
"""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

from feather_export.errors import FeatherError

FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
CODE_BYTES = {"int8": 1.0, "int4": 0.5}
DISK_MARGIN = 1.02                  # 2 % over the estimate ...
DISK_SLACK = 64 << 20               # ... plus 64 MiB for graphs, tokenizer and manifest
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_DECODER_LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")


def estimated_bytes(w, options) -> int:
    from feather_export.models.family import vision_spec
    from feather_export.models.weights import EMBED, LM_HEAD, NEWLINE, PROJECTOR, TEXT

    et = FLOAT_BYTES[options.dtype]
    run_layers = vision_spec(w.config).run_layers
    tower = w.vision_prefix
    total = 0
    names = set(w.names()) | {LM_HEAD}
    for name in names:
        if not w.has(name):
            continue
        numel = math.prod(w.shape(name))
        if name.startswith(tower + "."):
            layer = _LAYER.search(name)
            if (layer and int(layer.group(1)) >= run_layers) or not (
                    ".embeddings." in name or ".encoder." in name or ".pre_layrnorm." in name):
                continue
            total += numel * (4 if ".layer_norm" in name or "layrnorm" in name else et)
        elif name.startswith(PROJECTOR + ".") or name in (EMBED, NEWLINE):
            total += numel * et
        elif name.startswith(TEXT + ".") or name == LM_HEAD:
            kind = (options.lm_head_weights if name == LM_HEAD
                    else options.weights if _DECODER_LINEAR.search(name) else "float")
            total += _quantized(numel, w.shape(name), kind, options.block_size, et)
    return int(total)


def _quantized(numel: int, shape, kind: str, block: int, et: int) -> float:
    if kind not in CODE_BYTES:
        return numel * et
    out_features, in_features = shape
    groups = 1 if kind == "int8" else -(-in_features // min(block, in_features))
    return numel * CODE_BYTES[kind] + out_features * groups * et


def check_free_disk(out: Path, needed: int) -> None:
    """Refuse before any weight is read when ``out``'s file system cannot hold ``needed`` bytes."""
    probe = out.parent if not out.exists() else out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = int(needed * DISK_MARGIN) + DISK_SLACK
    if free < want:
        raise FeatherError(f"--out {out}: the artifact needs about {want / 1e9:.2f} GB but only "
                           f"{free / 1e9:.2f} GB is free on that file system")
