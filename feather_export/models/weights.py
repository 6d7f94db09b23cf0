"""Weight sources: a LLaVA's tensors by name, one at a time, without building the model.

The exporter and ``validate`` read weights through a source instead of a loaded torch model, so
no step holds the whole model (docs/design.md §2, "Export at real scale"):

- ``CheckpointWeights``: a checkpoint directory's safetensors (one file or a sharded index),
  read with positioned file reads, one tensor per call: nothing is memory-mapped, so resident
  memory holds the tensor being converted and nothing else.
- ``ShapeWeights``: a shape-only model's deterministic random tensors, each generated from a
  seed derived from its own name (so any tensor can be produced alone, in any order).
- ``ModelWeights``: an already built torch model (tiny models, tests); ``TensorWeights``: any
  tensors by name.

Names are the parameter names of transformers' ``LlavaForConditionalGeneration`` (``model.
language_model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``); checkpoints saved with
the older layout (``language_model.model.*``, ``vision_tower.*``) are renamed as transformers
renames them on load. ``get`` returns the tensor in its stored dtype.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import numpy as np

from feather_export.errors import FeatherError

# transformers' renames of the older llava-hf layout (its conversion mapping for "llava")
LEGACY_RENAMES = (
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\."), "model.language_model."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^image_newline$"), "model.image_newline"),
)
TEXT = "model.language_model"
PROJECTOR = "model.multi_modal_projector"
EMBED = f"{TEXT}.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
NEWLINE = "model.image_newline"        # LLaVA-NeXT: the token after each stitched raster row

# safetensors dtype -> (numpy dtype read from the file, torch dtype it is viewed as)
_SAFETENSORS_DTYPES = {"F32": ("float32", "float32"), "F16": ("float16", "float16"),
                       "BF16": ("uint16", "bfloat16"), "F64": ("float64", "float64"),
                       "I64": ("int64", "int64"), "I32": ("int32", "int32"),
                       "I8": ("int8", "int8"), "U8": ("uint8", "uint8"), "BOOL": ("bool", "bool")}


def canonical_name(key: str) -> str:
    for pattern, replacement in LEGACY_RENAMES:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    return key


class Weights:
    """The interface every source implements: ``config``, ``shape``, ``get``, ``has``, ``names``,
    and ``eos_token_ids`` (the generation config's, [] when generation never stops on EOS)."""

    config = None
    eos_token_ids: list[int] = []

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _read(self, name: str):
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def get(self, name: str):
        """The tensor ``name`` (a torch tensor in its stored dtype)."""
        resolved = self._resolve(name)
        if resolved is None:
            raise FeatherError(f"the checkpoint has no weight {name!r}; is it a LLaVA checkpoint "
                               "of the family its config names?")
        return self._read(resolved)

    def _resolve(self, name: str) -> str | None:
        known = self._known()
        if name in known:
            return name
        if name == LM_HEAD and EMBED in known:       # tied embeddings: lm_head is the table
            return EMBED
        return None

    def _known(self) -> set:
        if not hasattr(self, "_known_names"):
            self._known_names = set(self.names())
        return self._known_names

    @property
    def vision_prefix(self) -> str:
        """Where the tower's ``embeddings``/``encoder`` live: CLIP nests them in ``vision_model``."""
        nested = "model.vision_tower.vision_model"
        return nested if self.has(f"{nested}.embeddings.patch_embedding.weight") \
            else "model.vision_tower"


class TensorWeights(Weights):
    """Tensors already in memory, by name (no copy)."""

    def __init__(self, tensors: dict, config=None):
        self._params = dict(tensors)
        self.config = config

    def names(self) -> list[str]:
        return list(self._params)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._params[self._resolve(name)].shape)

    def _read(self, name: str):
        return self._params[name].detach()


class ModelWeights(TensorWeights):
    """The parameters of a built ``LlavaForConditionalGeneration``."""

    def __init__(self, model):
        super().__init__(model.state_dict(keep_vars=True), model.config)
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = [int(e) for e in (eos if isinstance(eos, list)
                                               else [] if eos is None else [eos])]


class CheckpointWeights(Weights):
    """A checkpoint directory's safetensors, read tensor by tensor (headers parsed up front)."""

    def __init__(self, path: str | os.PathLike, config):
        self.path = Path(path)
        self.config = config
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FeatherError(f"{self.path} has no *.safetensors weights")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                mapping = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise FeatherError(f"{index} is not a safetensors index: {exc}") from None
            files = sorted({self.path / f for f in mapping.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FeatherError(f"{index} names shards that are missing: {', '.join(missing)}")
        for file in files:
            for key, entry in _read_header(file).items():
                self._entries[canonical_name(key)] = (file, *entry)
        self.eos_token_ids = _eos_of(self.path, config)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[self._resolve(name)][2]

    def _read(self, name: str):
        import torch

        file, dtype, shape, begin, end = self._entries[name]
        np_dtype, torch_dtype = _SAFETENSORS_DTYPES[dtype]
        count = (end - begin) // np.dtype(np_dtype).itemsize
        with open(file, "rb") as f:
            array = np.fromfile(f, dtype=np_dtype, count=count, offset=begin)
        if array.size != count:
            raise FeatherError(f"{file} is truncated: {name} ends past the end of the file")
        tensor = torch.from_numpy(array.reshape(shape))
        return tensor.view(getattr(torch, torch_dtype)) if torch_dtype == "bfloat16" else tensor


def _read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """{key: (dtype, shape, absolute begin, absolute end)} from a safetensors file's header."""
    try:
        with open(file, "rb") as f:
            (length,) = np.frombuffer(f.read(8), dtype="<u8")
            header = json.loads(f.read(int(length)))
        size = file.stat().st_size
    except (OSError, ValueError) as exc:
        raise FeatherError(f"{file} is not a safetensors file: {exc}") from None
    base = 8 + int(length)
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            raise FeatherError(f"{file}: tensor {key} has dtype {dtype}, which the exporter does "
                               f"not read ({', '.join(_SAFETENSORS_DTYPES)})")
        begin, end = (base + int(o) for o in info["data_offsets"])
        if end > size:
            raise FeatherError(f"{file} is truncated: {key} ends past the end of the file")
        entries[key] = (dtype, tuple(int(d) for d in info["shape"]), begin, end)
    return entries


def _eos_of(path: Path, config) -> list[int]:
    """EOS ids as ``from_pretrained`` would set them: generation_config.json, else the config."""
    eos = None
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except ValueError:
            raise FeatherError(f"{gen} is not valid JSON") from None
    if eos is None:
        eos = getattr(config.text_config, "eos_token_id", None)
    return [int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos])]


class ShapeWeights(Weights):
    """A shape model's weights: N(0, std) matrices, embeddings and ``image_newline``, unit norms,
    zero biases, each tensor from its own seed (the model seed and a CRC of its name), generated
    on request."""

    def __init__(self, name: str, config, seed: int, std: float):
        import torch

        from feather_export.models.family import llava_class

        self.config = config
        self.seed, self.std = seed, std
        with torch.device("meta"):               # names and shapes only: no memory
            skeleton = llava_class(config)(config)
        self._shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
        self.eos_token_ids = []

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._resolve(name)]

    def _read(self, name: str):
        import torch

        shape = self._shapes[name]
        if len(shape) >= 2 or name.endswith(("class_embedding", "image_newline")):
            rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
            values = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
            values *= np.float32(self.std)
            return torch.from_numpy(values.reshape(shape))
        fill = 1.0 if name.endswith(".weight") else 0.0          # norms; biases
        return torch.full(shape, fill, dtype=torch.float32)


def fill_model(model, weights: Weights) -> None:
    """Copy every parameter of ``model`` from ``weights`` (one tensor at a time)."""
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if weights.has(name):
                tensor.copy_(weights.get(name))
