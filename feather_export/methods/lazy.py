"""A LLaVA for the PyTorch reference whose decoder layers are materialised one at a time.

``LazyLlava(w)`` builds transformers' ``LlavaForConditionalGeneration`` (LLaVA-NeXT:
``LlavaNextForConditionalGeneration``) on the meta device and makes real only what is small next
to the decoder: the vision tower, the projector, ``image_newline`` (NeXT), the embedding table,
the final norm, lm_head and the rotary tables. ``layer(i)`` loads decoder layer i from the
weight source ``w`` for the duration of a ``with`` block and returns it to the meta device
afterwards, so checking a 7B artifact holds about one fp32 layer besides those parts
(``export.validate``). The modules are transformers' own, so the reference computes exactly
what transformers computes.
"""
from __future__ import annotations

from contextlib import contextmanager


class LazyLlava:
    def __init__(self, w):
        import torch
        from transformers import AutoModel
        from transformers.initialization import no_init_weights

        from feather_export.models.family import llava_class
        from feather_export.models.weights import NEWLINE

        self.weights = w
        with torch.device("meta"):
            self.model = llava_class(w.config)(w.config)
        inner = self.model.model
        lm = inner.language_model
        with no_init_weights():      # real modules whose buffers (position ids) are computed here
            inner.vision_tower = AutoModel.from_config(w.config.vision_config)
        self._fill(inner.vision_tower, _prefix_of(self.model, inner.vision_tower, w))
        for module in (inner.multi_modal_projector, lm.embed_tokens, lm.norm, self.model.lm_head):
            self._materialize(module, _prefix_of(self.model, module, w))
        if hasattr(inner, "image_newline"):         # LLaVA-NeXT: a bare parameter of the model
            inner.image_newline = torch.nn.Parameter(
                w.get(NEWLINE).float(), requires_grad=False)
        lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
        self.model.generation_config.eos_token_id = list(w.eos_token_ids) or None
        self.model.eval()

    @property
    def config(self):
        return self.model.config

    @contextmanager
    def layer(self, i: int):
        """Decoder layer ``i``, loaded for the ``with`` block."""
        layer = self.model.model.language_model.layers[i]
        self._materialize(layer, f"model.language_model.layers.{i}")
        try:
            yield layer
        finally:
            layer.to("meta")

    def _materialize(self, module, prefix: str) -> None:
        module.to_empty(device="cpu")
        self._fill(module, prefix)

    def _fill(self, module, prefix: str) -> None:
        import torch

        with torch.no_grad():
            for name, tensor in module.state_dict(keep_vars=True).items():
                tensor.copy_(self.weights.get(f"{prefix}.{name}"))


def _prefix_of(model, module, w) -> str:
    """The weight-name prefix of ``module`` inside ``model`` (the vision tower: where the weight
    source keeps it, ``vision_model`` nested or not)."""
    if module is model.model.vision_tower:
        nested = w.vision_prefix.endswith(".vision_model")
        return "model.vision_tower" if not nested or hasattr(module, "vision_model") \
            else w.vision_prefix
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise KeyError("module not in model")
