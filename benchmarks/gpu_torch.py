"""Torch eager segments on a GPU: the fallback of benchmarks/gpu.py where ONNX Runtime has no CUDA
provider (and TensorRT engines are not built yet).

The prefill runs the same segments as an exported artifact (vision up to the feature layer,
embed + merge, decoder spans, selection between them) with transformers' own modules, each timed
as wall time with a device synchronisation at its end, like the runtime's per-segment timings.
Selection follows docs/design.md §4 (FEATHER: last-token query vs image keys without RoPE; FastV: with
RoPE over the causal row; FasterVLM: CLS attention in the feature layer) from the query and keys
layer K-1 computed in the span (forward hooks, as the exported spans output them), TopK on the
device (ties are not forced to the lower index: timing only). Decode uses transformers' DynamicCache
(which grows by concatenation: its copy cost shows in the decode-scaling check).
Samples have the format of feather_export.bench.run, so the report, table and plots are shared.
"""
from __future__ import annotations

import time

import numpy as np


class TorchSegments:
    def __init__(self, model, device: str):
        import torch

        self.torch = torch
        self.model, self.device = model, torch.device(device)
        self.lm = model.model.language_model
        vt = model.model.vision_tower
        self.clip = getattr(vt, "vision_model", vt)
        num = model.config.vision_config.num_hidden_layers
        self.layers_run = model.config.vision_feature_layer % (num + 1)
        self.dtype = next(model.parameters()).dtype

    # -- helpers ---------------------------------------------------------------------------------
    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _timed(self, timings, name, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self._sync()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return out

    def _vision(self, pixels, want_cls: bool):
        torch = self.torch
        clip = self.clip
        x = clip.embeddings(pixels.to(self.dtype))
        x = clip.pre_layrnorm(x)
        layer_in = x
        for layer in clip.encoder.layers[:self.layers_run]:
            layer_in = x
            out = layer(x, None, None) if _takes_causal_mask(layer) else layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        features = self.model.model.multi_modal_projector(x[:, 1:])
        scores = None
        if want_cls:
            last = clip.encoder.layers[self.layers_run - 1]
            attn = last.self_attn
            h = last.layer_norm1(layer_in)[0]
            heads = attn.num_heads
            q = attn.q_proj(h[:1]).reshape(1, heads, -1).transpose(0, 1)
            k = attn.k_proj(h).reshape(h.shape[0], heads, -1).transpose(0, 1)
            probs = torch.softmax((q @ k.transpose(1, 2)).float() * q.shape[-1] ** -0.5, -1)
            scores = probs.mean(0)[0, 1:]
        return features, scores

    def _scores(self, stage, stash, positions, start, num_image):
        """Last-token attention from the query and keys layer K-1 computed in the span (captured by
        hooks on its q_proj/k_proj: nothing is recomputed), fp32 softmax, mean over heads."""
        torch = self.torch
        cfg = self.lm.config
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        q = stash["q"][0, -1:].reshape(1, heads, -1).transpose(0, 1)             # [H, 1, hd]
        k_all = stash["k"][0]
        if stage.criterion == "feather":                 # before RoPE, image keys only
            k = k_all[start:start + num_image].reshape(num_image, kv_heads, -1).transpose(0, 1)
        else:                                            # FastV: RoPE, the whole causal row
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            k = k_all.reshape(k_all.shape[0], kv_heads, -1).transpose(0, 1)
            cos, sin = self.lm.rotary_emb(k_all, positions)
            q, _ = apply_rotary_pos_emb(q, q, cos[0, -1:], sin[0, -1:], unsqueeze_dim=0)
            _, k = apply_rotary_pos_emb(k, k, cos[0], sin[0], unsqueeze_dim=0)
        k = torch.repeat_interleave(k, heads // kv_heads, dim=0)
        probs = torch.softmax((q @ k.transpose(1, 2)).float() * q.shape[-1] ** -0.5, -1)
        scores = probs.mean(0)[0]
        return scores if stage.criterion == "feather" else scores[start:start + num_image]

    def _keep(self, stage, scores, side):
        torch = self.torch
        from feather_export.methods.selection import grid_mask

        forced = torch.as_tensor(grid_mask(stage.num_in, side, stage.grid_stride, stage.raster_offset),
                                 device=scores.device)
        ranked = torch.where(forced, torch.full_like(scores, float("inf")), scores)
        return torch.sort(torch.topk(ranked, stage.keep).indices).values

    @staticmethod
    def _gather(t, start, num_image, kept):
        torch = __import__("torch")
        idx = torch.cat([torch.arange(start, device=t.device), start + kept,
                         torch.arange(start + num_image, t.shape[1], device=t.device)])
        return t[:, idx]

    def _span(self, a, b, hidden, positions, cache):
        from feather_export.methods.reference import run_layer

        for layer in self.lm.layers[a:b]:
            hidden = run_layer(layer, self.lm.rotary_emb, hidden, positions, cache, None)
        return hidden

    # -- one generation --------------------------------------------------------------------------
    def generate(self, prune, pixels, ids, max_new_tokens: int, side: int):
        """(timings, steps, token ids) for one request, segments named as the exporter names them."""
        torch = self.torch
        from transformers import DynamicCache

        from feather_export.export.artifact import plan_segments

        timings: dict = {}
        stages = list(prune.stages)
        n = self.model.config.image_seq_length
        ids_t = torch.as_tensor(ids, device=self.device)
        start = int(np.flatnonzero(ids[0] == self.model.config.image_token_index)[0])
        with torch.inference_mode():
            t0 = time.perf_counter()
            plan = plan_segments(len(self.lm.layers), prune)
            cache = DynamicCache()
            num_image, hidden, positions = n, None, None
            features = None
            stash: dict = {}
            for seg in plan:
                if seg.kind == "vision":
                    features, cls = self._timed(timings, "vision", self._vision,
                                                torch.as_tensor(pixels, device=self.device),
                                                prune.method == "fastervlm")
                elif seg.kind == "select" and stages[seg.stage].criterion == "fastervlm":
                    st = stages[seg.stage]
                    kept = self._timed(timings, seg.name, self._keep, st, cls, side)
                    features, num_image = features[:, kept], st.keep
                elif seg.kind == "embed":
                    def embed():
                        e = self.lm.embed_tokens(ids_t)
                        return torch.cat([e[:, :start], features.to(e.dtype),
                                          e[:, start + n:]], dim=1)
                    hidden = self._timed(timings, "embed", embed)
                    positions = torch.arange(hidden.shape[1], device=self.device)[None]
                elif seg.kind == "decoder":
                    a, b = seg.layers

                    def span(a=a, b=b, score=seg.score_layer):
                        if score is None:
                            return self._span(a, b, hidden, positions, cache)
                        attn = self.lm.layers[score].self_attn
                        hooks = [attn.q_proj.register_forward_hook(_stash_into(stash, "q")),
                                 attn.k_proj.register_forward_hook(_stash_into(stash, "k"))]
                        try:
                            return self._span(a, b, hidden, positions, cache)
                        finally:
                            for hook in hooks:
                                hook.remove()
                    hidden = self._timed(timings, seg.name, span)
                else:
                    st = stages[seg.stage]

                    def select(st=st):
                        scores = self._scores(st, stash, positions, start, num_image)
                        kept = self._keep(st, scores, side)
                        return (self._gather(hidden, start, num_image, kept),
                                self._gather(positions, start, num_image, kept))
                    hidden, positions = self._timed(timings, seg.name, select)
                    num_image = st.keep
            logits = self.model.lm_head(self.lm.norm(hidden[:, -1:]))[0, -1]
            token = int(torch.argmax(logits))
            self._sync()
            timings["ttft"] = time.perf_counter() - t0
            timings["selection"] = sum(v for k, v in timings.items() if k.startswith("select_"))
            tokens, steps = [token], []
            next_pos = int(positions[0, -1]) + 1
            prompt_len = ids.shape[1]
            t1 = prev = time.perf_counter()
            for k in range(max_new_tokens - 1):
                h = self.lm.embed_tokens(torch.tensor([[token]], device=self.device))
                pos = torch.tensor([[next_pos]], device=self.device)
                h = self._span(0, len(self.lm.layers), h, pos, cache)
                token = int(torch.argmax(self.model.lm_head(self.lm.norm(h))[0, -1]))
                now = time.perf_counter()
                steps.append({"k": k, "past": prompt_len + k, "spans": {}, "seconds": now - prev,
                              "segments": {}})
                prev, next_pos = now, next_pos + 1
                tokens.append(token)
            timings["decode"] = time.perf_counter() - t1
            timings["decode_tokens_per_s"] = (len(steps) / timings["decode"]
                                              if steps and timings["decode"] else 0.0)
        return timings, steps, tokens


def _stash_into(stash: dict, key: str):
    def hook(module, inputs, output):
        stash[key] = output
    return hook


def _takes_causal_mask(layer) -> bool:
    import inspect

    return "causal_attention_mask" in inspect.signature(layer.forward).parameters
