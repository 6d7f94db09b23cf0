"""``feather-export validate``: each ONNX segment (ONNX Runtime) against the PyTorch modules.

Inputs are random, at sequence/past lengths the segments were never built around (the exporter
traces nothing, so any length is new): sequence 7 with past 5 for decoder spans (the past in a
static-cache buffer of capacity 9 whose last 4 rows are large garbage, so the mask is checked), a
13-token prompt for embed, a 9-token text tail around the image block for selections (whose score query/keys come
from the PyTorch layer on a random layer input, so the scores are checked end to end).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from feather_export.errors import FeatherError

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}   # max abs error / max(1, max |reference|)
# Quantized artifacts are compared against the model with the same quantize-dequantized weights,
# so only the kernels differ: ONNX Runtime's MatMulNBits (accuracy level 4) also quantizes the
# activations to int8 per block inside the GEMM, which dominates the error.
QUANT_TOLERANCE = {"int8": 3e-2, "int4": 3e-2}
MIN_KEPT_OVERLAP = {"fp32": 1.0, "fp16": 0.9, "bf16": 0.9}
LAYERWISE_BYTES = 1 << 30      # decoder spans with more weight bytes run one layer at a time


@dataclass(frozen=True)
class OutputCheck:
    segment: str
    output: str
    max_abs: float
    max_rel: float          # max abs error / max(1, max |reference|)
    tolerance: float
    ok: bool

    def line(self) -> str:
        flag = "ok  " if self.ok else "FAIL"
        return (f"{flag} {self.segment:<14} {self.output:<24} max_abs={self.max_abs:.3e} "
                f"max_rel={self.max_rel:.3e} tol={self.tolerance:.0e}")


def validate_artifact(out_dir, model=None, backend: str | None = "onnxruntime-cpu",
                      seed: int = 0, progress=None, weights=None,
                      layerwise: bool = False) -> list[OutputCheck]:
    """Run every segment both ways; returns one check per output (kept indices included).

    The reference is transformers' own modules with the checkpoint's weights (``weights``: a
    ``models.weights`` source; else ``model``, a loaded torch model; else the manifest's model),
    loaded span by span: decoder layers one at a time (``methods.lazy``). Decoder spans whose
    weights exceed ``LAYERWISE_BYTES`` (or all, with ``layerwise``) run in ONNX Runtime as
    one-layer pieces cut from their own graph (``run_layerwise``), so a 7B artifact is checked
    in a few GB.
    """
    import torch
    from feather_runtime.backends import get_backend
    from feather_runtime.manifest import load_manifest

    from feather_export.methods.lazy import LazyLlava
    from feather_export.models.checkpoint import open_weights
    from feather_export.models.weights import ModelWeights

    manifest = load_manifest(out_dir)
    if weights is None:
        weights = (ModelWeights(model) if model is not None
                   else open_weights(manifest["model"]["id"])[0])
    config_json = weights.config.to_json_string(use_diff=False)
    if hashlib.sha256(config_json.encode()).hexdigest() != manifest["model"]["config_sha256"]:
        raise FeatherError(f"the model given does not match the one {out_dir} was exported from "
                           "(config hash differs); pass --model with the original checkpoint")
    dtype = manifest["dtype"]
    quant = manifest.data.get("quantization") or {}
    tol = max([TOLERANCE[dtype], *(QUANT_TOLERANCE[quant[k]] for k in ("weights", "lm_head")
                                   if quant.get(k) in QUANT_TOLERANCE)])
    if tol > TOLERANCE[dtype]:
        weights = DequantizedWeights(weights, quant)
    get_backend(backend).close()          # an unknown or unavailable backend fails here, first
    rng = np.random.default_rng(seed)
    checks: list[OutputCheck] = []
    with torch.no_grad():
        reference = LazyLlava(weights)
        for seg in manifest.segments:
            if progress:
                progress(f"validating {seg.name}")
            feeds, expected = _cases(reference, manifest, seg, rng, dtype)
            if seg.kind == "decoder" and (layerwise or _weight_bytes(manifest.root, seg)
                                          > LAYERWISE_BYTES):
                got = run_layerwise(manifest.root, seg, feeds)
            else:              # one backend per segment: closing it frees the session
                runner_backend = get_backend(backend)
                got = runner_backend.load(manifest.root, seg).run(feeds)
                runner_backend.close()
            seg_tol = tol if seg.kind == "decoder" else TOLERANCE[dtype]
            for name, ref in expected.items():
                checks.append(_compare(seg.name, name, got[name], ref, dtype, seg_tol))
    return checks


def _weight_bytes(root, seg) -> int:
    return sum((root / f["file"]).stat().st_size for f in seg.data_files)


def run_layerwise(root, seg, feeds: dict) -> dict:
    """Run decoder span ``seg`` as one-layer pieces cut from its graph at the named layer outputs
    (``onnx.decoder.layer_output_name``) with ``onnx.utils.Extractor``, each in its own ONNX
    Runtime CPU session over the segment's external-data file, chaining the hidden states: the same graph and weights, one layer loaded at a
    time. Returns every output of the segment."""
    import onnx
    import onnxruntime as ort
    from onnx.utils import Extractor

    from feather_export.onnx.decoder import layer_output_name

    a, b = seg.layers
    outputs = [o["name"] for o in seg.outputs]
    path = root / seg.file
    extractor = Extractor(onnx.load(str(path), load_external_data=False))
    hidden_info = next(v for v in extractor.graph.input if v.name == "inputs_embeds")
    for i in range(a, b):      # shape inference may not reach every layer: declare the cuts
        info = onnx.ValueInfoProto()
        info.CopyFrom(hidden_info)
        info.name = layer_output_name(i)
        extractor.value_infos.setdefault(info.name, info)
    options = ort.SessionOptions()
    # pieces are loaded from bytes; their external data is the segment's own file
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(path.parent))
    got: dict = {}
    hidden = "inputs_embeds"
    for i in range(a, b):
        own = [n for n in outputs if n.startswith((f"present.{i}.", f"score_query.{i}",
                                                   f"score_keys.{i}"))]
        last = [n for n in outputs if n in ("logits", "hidden_states")] if i == b - 1 \
            else [layer_output_name(i)]
        inputs = list(dict.fromkeys(["inputs_embeds", hidden, "position_ids", "past_length",
                                     f"past_key_values.{a}.key", f"past_key_values.{i}.key",
                                     f"past_key_values.{i}.value"]))
        piece = extractor.extract_model(inputs, own + last).SerializeToString()
        session = ort.InferenceSession(piece, options, providers=["CPUExecutionProvider"])
        names = [x.name for x in session.get_inputs()]
        values = session.run(own + last, {n: feeds[n] if n in feeds else got[n] for n in names})
        got.update(zip(own + last, values))
        hidden = layer_output_name(i)
        del session, piece
    return {n: got[n] for n in outputs}


class DequantizedWeights:
    """A weight source whose decoder linears and lm_head, where the artifact stores them
    quantized, read as their quantize-dequantized values: the reference the graph must equal."""

    _LINEAR = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|"
                         r"mlp\.(gate|up|down)_proj)\.weight$")

    def __init__(self, weights, quant: dict):
        self.inner, self.quant = weights, quant

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get(self, name: str):
        import torch

        from feather_export.onnx.quantize import quantize

        tensor = self.inner.get(name)
        kind = (self.quant.get("lm_head") if name == "lm_head.weight"
                else self.quant.get("weights") if self._LINEAR.match(name) else None)
        if kind not in QUANT_TOLERANCE:
            return tensor
        w = tensor.detach().float().t().numpy()
        dq = quantize(w, kind, self.quant.get("block_size") or 128).dequantize()
        return torch.from_numpy(dq).t()


def _np_dtype(dtype: str):
    if dtype == "bf16":
        raise FeatherError("ONNX Runtime's CPU provider cannot run bf16 graphs; validate bf16 "
                           "artifacts on a GPU backend or export fp16/fp32")
    return np.float16 if dtype == "fp16" else np.float32


def _compare(segment, name, got, ref, dtype, tol=None) -> OutputCheck:
    got, ref = np.asarray(got), np.asarray(ref)
    if name == "kept":
        overlap = (len(set(got.tolist()) & set(ref.tolist())) / len(ref) if len(ref)
                   else float(len(got) == 0))          # a 0-count stage keeps nothing
        need = MIN_KEPT_OVERLAP[dtype]
        return OutputCheck(segment, name, 1 - overlap, 1 - overlap, 1 - need, overlap >= need)
    if got.shape != ref.shape:
        return OutputCheck(segment, f"{name} shape {got.shape}!={ref.shape}", np.inf, np.inf,
                           0, False)
    err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    rel = err / max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    tol = TOLERANCE[dtype] if tol is None else tol
    return OutputCheck(segment, name, err, rel, tol, rel <= tol)


def _cases(model, manifest, seg, rng, dtype):
    if seg.kind == "vision":
        return _vision_case(model, manifest, rng)
    if seg.kind == "embed":
        return _embed_case(model, manifest, rng)
    if seg.kind == "decoder":
        return _decoder_case(model, manifest, seg, rng, _np_dtype(dtype))
    return _select_case(model, manifest, seg, rng, _np_dtype(dtype))


def _vision_case(model, manifest, rng):
    import torch
    from feather_runtime.preprocess import pixel_shape

    from feather_export.methods.reference import vision_features
    from feather_export.models.geometry import geometry_from_manifest

    pixels = rng.standard_normal(pixel_shape(manifest["model"])).astype(np.float32)
    with model.vision() as llava:
        features, scores = vision_features(llava, torch.from_numpy(pixels),
                                           geometry_from_manifest(manifest["model"]))
    return {"pixel_values": pixels}, {"image_features": features.numpy(), "cls_scores": scores.numpy()}


def _embed_case(model, manifest, rng):
    import torch

    ids = rng.integers(0, manifest["model"]["vocab_size"], size=(1, 13), dtype=np.int64)
    with model.parts("model.language_model.embed_tokens") as table:
        return {"input_ids": ids}, {"inputs_embeds": table(torch.from_numpy(ids)).numpy()}


def _decoder_case(model, manifest, seg, rng, np_dtype, seq=7, past=5):
    import torch
    from transformers import DynamicCache

    from feather_export.methods.reference import lm_logits, run_layer
    from feather_export.methods.scoring import score_inputs

    m = manifest["model"]
    lm = model.model.model.language_model
    a, b = seg.layers
    # the static cache: a buffer of capacity past + 4 whose rows beyond past_length are garbage
    # (large random values) that the graph must mask out; the reference sees the valid rows only
    kv_shape = (1, m["num_key_value_heads"], past + 4, m["head_dim"])
    hidden = rng.standard_normal((1, seq, m["hidden_size"])).astype(np_dtype)
    positions = np.arange(past + 3, past + 3 + seq, dtype=np.int64)[None]   # a gap, as after pruning
    feeds = {"inputs_embeds": hidden, "position_ids": positions,
             "past_length": np.asarray(past, np.int64)}
    cache = DynamicCache()
    for i in range(a, b):
        k, v = (rng.standard_normal(kv_shape).astype(np_dtype) for _ in range(2))
        for t in (k, v):
            t[:, :, past:] = (rng.standard_normal(t[:, :, past:].shape) * 100).astype(np_dtype)
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
        cache.update(*(torch.from_numpy(t[:, :, :past].astype(np.float32)) for t in (k, v)), i)
    mask = torch.full((seq, past + seq), torch.finfo(torch.float32).min).triu(past + 1)[None, None]
    h, pos = torch.from_numpy(hidden.astype(np.float32)), torch.from_numpy(positions)
    expected = {}
    outputs = {o["name"] for o in seg.outputs}
    for i in range(a, b):
        with model.layer(i) as layer:
            if f"score_query.{i}" in outputs:
                criterion = "feather" if f"score_keys.{i}" in outputs else "fastv"
                query, keys = score_inputs(layer, lm.rotary_emb, h, pos, criterion)
                expected[f"score_query.{i}"] = query.numpy()
                if criterion == "feather":
                    expected[f"score_keys.{i}"] = keys.numpy()
            h = run_layer(layer, lm.rotary_emb, h, pos, cache, mask)
        expected[f"present.{i}.key"] = cache.layers[i].keys[:, :, past:].numpy()      # heads-first
        expected[f"present.{i}.value"] = cache.layers[i].values[:, :, past:].numpy()
    if b == m["num_layers"]:
        with model.parts("model.language_model.norm", "lm_head"):
            expected["logits"] = lm_logits(model.model, h[:, -1:]).numpy()[None, None]
    else:
        expected["hidden_states"] = h.numpy()
    return feeds, expected


def _select_case(model, manifest, seg, rng, np_dtype, text_after=9, start=3):
    import torch

    from feather_export.methods.config import Stage
    from feather_export.methods.reference import select_stage
    from feather_export.models.geometry import geometry_from_manifest

    m = manifest["model"]
    geo = geometry_from_manifest(m)
    stage = Stage(**manifest["prune"]["stages"][seg.stage])
    n, d = stage.num_in, m["hidden_size"]
    if stage.criterion == "fastervlm":
        scores = rng.dirichlet(np.ones(n)).astype(np.float32)
        features = rng.standard_normal((1, n, d)).astype(np_dtype)
        kept = select_stage(stage, torch.from_numpy(scores), geo)
        return ({"cls_scores": scores, "image_features": features},
                {"kept": kept, "pruned_image_features": features[:, kept]})
    lm = model.model.model.language_model
    seq = start + n + text_after
    layer_input = rng.standard_normal((1, seq, d)).astype(np_dtype)
    hidden = rng.standard_normal((1, seq, d)).astype(np_dtype)
    positions = np.sort(rng.choice(seq + 40, size=seq, replace=False)).astype(np.int64)[None]
    with model.layer(stage.layer - 1) as prev:
        return _span_select_case(stage, prev, lm.rotary_emb, geo, layer_input, hidden, positions,
                                 start, np_dtype)


def _span_select_case(stage, prev, rotary, geo, layer_input, hidden, positions, start, np_dtype):
    import torch

    from feather_export.methods.reference import gather_sequence, select_stage
    from feather_export.methods.scoring import (btp_logits, fastv_scores, feather_scores,
                                                score_inputs)
    from feather_export.onnx.select import score_input_names

    n = stage.num_in
    x, pos = torch.from_numpy(layer_input.astype(np.float32)), torch.from_numpy(positions)
    features = hidden[0, start:start + n].astype(np.float32)
    feeds = {"hidden_states": hidden, "position_ids": positions,
             "image_start": np.asarray(start, np.int64)}
    expected = {}
    if stage.criterion == "feather":
        scores = feather_scores(prev, x, start, n)
    elif stage.criterion == "btp":
        scores = btp_logits(prev, rotary, x, pos, start, n)
    else:
        scores = fastv_scores(prev, rotary, x, pos, start, n)
    kept = select_stage(stage, scores, geo, features)
    if stage.keep > 0:               # a 0-count BTP stage drops every image row without scores
        query, keys = score_inputs(prev, rotary, x, pos, stage.criterion)
        query_name, keys_name = score_input_names(stage)
        feeds.update({query_name: query.numpy().astype(np_dtype),
                      keys_name: keys.numpy().astype(np_dtype)})
        expected["scores"] = scores.numpy()
    return feeds, {**expected, "kept": kept,
                   "pruned_hidden_states": gather_sequence(torch.from_numpy(hidden), start, n,
                                                            kept).numpy(),
                   "pruned_position_ids": gather_sequence(pos, start, n, kept).numpy()}
