"""A LLaVA for the PyTorch reference whose decoder layers are materialised one at a time.

``LazyLlava(w)`` builds transformers' ``LlavaForConditionalGeneration`` (LLaVA-NeXT:
``LlavaNextForConditionalGeneration``) on the meta device (only the rotary tables are real).
``vision()``, ``parts(name, ...)`` and ``layer(i)`` load the vision tower + projector (+ NeXT's
``image_newline``), any submodule (``lm_head``, the embeddings) or decoder layer i from the weight
source ``w`` for the duration of a ``with`` block and return them to the meta device afterwards,
so checking a 7B artifact holds one fp32 part at a time (``export.validate``). The modules are transformers' own, so the reference computes exactly
what transformers computes.
"""
from __future__ import annotations

from contextlib import contextmanager


class LazyLlava:
    def __init__(self, w):
        import torch

        from feather_export.models.family import llava_class

        self.weights = w
        with torch.device("meta"):
            self.model = llava_class(w.config)(w.config)
        lm = self.model.model.language_model
        lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)        # small: made real once
        self.model.generation_config.eos_token_id = list(w.eos_token_ids) or None
        self.model.eval()

    @contextmanager
    def vision(self):
        """The vision tower and projector (and NeXT's ``image_newline``), real for the ``with``
        block; yields the model."""
        import torch
        from transformers import AutoModel
        from transformers.initialization import no_init_weights

        from feather_export.models.weights import NEWLINE

        inner = self.model.model
        meta_tower = inner.vision_tower
        meta_newline = getattr(inner, "image_newline", None)
        with no_init_weights():      # a real tower computes its buffers (position ids) here
            inner.vision_tower = AutoModel.from_config(self.weights.config.vision_config)
        try:
            self._fill(inner.vision_tower, _tower_prefix(inner.vision_tower, self.weights))
            if meta_newline is not None:        # LLaVA-NeXT: a bare parameter of the model
                inner.image_newline = torch.nn.Parameter(self.weights.get(NEWLINE).float(),
                                                         requires_grad=False)
            with self.parts("model.multi_modal_projector"):
                yield self.model
        finally:
            inner.vision_tower = meta_tower
            if meta_newline is not None:
                inner.image_newline = meta_newline

    @contextmanager
    def parts(self, *names: str):
        """Submodules ``names`` (e.g. ``lm_head``), loaded for the ``with`` block."""
        modules = [self.model.get_submodule(name) for name in names]
        try:
            for name, module in zip(names, modules):
                module.to_empty(device="cpu")
                self._fill(module, name)
            yield modules[0] if len(modules) == 1 else modules
        finally:
            for module in modules:
                module.to("meta")

    def layer(self, i: int):
        """Decoder layer ``i``, loaded for the ``with`` block."""
        return self.parts(f"model.language_model.layers.{i}")

    def _fill(self, module, prefix: str) -> None:
        import torch

        with torch.no_grad():
            for name, tensor in module.state_dict(keep_vars=True).items():
                tensor.copy_(self.weights.get(f"{prefix}.{name}"))


def _tower_prefix(tower, w) -> str:
    """Where the weight source keeps the tower's weights: CLIP's module nests them in
    ``vision_model`` as checkpoints do; a SigLIP module does not, while checkpoints may."""
    if hasattr(tower, "vision_model") or not w.vision_prefix.endswith(".vision_model"):
        return "model.vision_tower"
    return w.vision_prefix
