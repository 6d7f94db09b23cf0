"""Export a LLaVA checkpoint into an artifact directory of ONNX segments (docs/design.md §2-§3).

Everything is written into a temporary sibling directory and moved into place at the end, with the
manifest written last, so a failed or interrupted export leaves nothing that looks complete.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from feather_runtime.manifest import (FORMAT, FORMAT_VERSION, MANIFEST_NAME, Segment,
                                      sha256_file, write_manifest)

from feather_export.methods.config import PruneConfig
from feather_export.errors import FeatherError
from feather_export.onnx.graph import DTYPES, OPSET, QUANT_OPSET, SCALE_TYPES
from feather_export.onnx.quantize import (DEFAULT_BLOCK_SIZE, QMAX, WeightQuant,
                                          check_block_size)

WEIGHT_CHOICES = ("float", *QMAX)

# segments with fewer weight bytes are one .onnx file; larger ones keep external data, which the
# lint never loads (a 263 MB inline embed table cost `check` 1.4 GB of parsing)
INLINE_LIMIT = 64 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPE_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


@dataclass(frozen=True)
class ExportOptions:
    method: str = "feather"
    budget: int | None = None
    schedule: str | None = None
    stride: int | None = None
    btp_lambda: str | None = None
    dtype: str = "fp32"
    max_text_tokens: int = 512
    max_new_tokens: int = 512
    trt_plugin_only: bool = False       # drop the function body so TensorRT must use the plugin
    weights: str = "float"              # decoder linear weights: float (the dtype), int8, int4
    block_size: int = DEFAULT_BLOCK_SIZE    # int4 block along the input width (capped at it)
    lm_head_weights: str = "float"
    resolution: str | None = None       # LLaVA-NeXT pinpoint "HxW" (None: the largest square one)

    def decoder_quant(self) -> WeightQuant | None:
        return None if self.weights == "float" else WeightQuant(self.weights, self.block_size)

    def lm_head_quant(self) -> WeightQuant | None:
        return (None if self.lm_head_weights == "float"
                else WeightQuant(self.lm_head_weights, self.block_size))


@dataclass(frozen=True)
class SegmentPlan:
    name: str
    kind: str
    layers: tuple[int, int] | None = None
    stage: int | None = None
    score_layer: int | None = None
    score_criterion: str | None = None


def plan_segments(num_layers: int, cfg: PruneConfig) -> list[SegmentPlan]:
    """Segments in prefill order: vision, [select_0,] embed, decoder spans with select_K between."""
    plan = [SegmentPlan("vision", "vision")]
    if cfg.method == "fastervlm":
        plan.append(SegmentPlan("select_0", "select", stage=0))
    plan.append(SegmentPlan("embed", "embed"))
    bounds = [0, *cfg.prune_layers, num_layers]
    decoder_stages = [i for i, s in enumerate(cfg.stages) if s.criterion != "fastervlm"]
    for span, (a, b) in enumerate(zip(bounds, bounds[1:])):
        has_select = b != num_layers
        stage = cfg.stages[decoder_stages[span]] if has_select else None
        scored = stage is not None and stage.keep > 0      # a 0-count stage drops without scores
        plan.append(SegmentPlan(f"decoder_{a}_{b}", "decoder", (a, b),
                                score_layer=b - 1 if scored else None,
                                score_criterion=stage.criterion if scored else None))
        if has_select:
            plan.append(SegmentPlan(f"select_{b}", "select", stage=decoder_stages[span]))
    return plan


def check_export(options: ExportOptions, geo, out: Path, config=None) -> PruneConfig:
    """Refuse bad options and output directories before any weight is loaded (``config``: the
    model's ``LlavaConfig``, checked against the artifact's longest sequence)."""
    from feather_export.models.family import check_config

    if options.dtype not in DTYPES:
        raise FeatherError(f"--dtype {options.dtype!r} is not one of {', '.join(DTYPES)}")
    if options.max_text_tokens < 1 or options.max_new_tokens < 1:
        raise FeatherError("--max-text-tokens and --max-new-tokens must be at least 1")
    _check_weights(options)
    if config is not None:
        check_config(config, max_sequence=geo.num_image_tokens + options.max_text_tokens
                     + options.max_new_tokens, resolution=options.resolution)
    _check_output_dir(out)
    return PruneConfig.create(options.method, geo, budget=options.budget,
                              schedule=options.schedule, stride=options.stride,
                              btp_lambda=options.btp_lambda)


def export(model_spec: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions,
           progress: Callable[[str], None] | None = None) -> Path:
    """Export ``model_spec`` (a built-in model name or a checkpoint directory) into ``out_dir``.

    Everything refusable is refused before any weight is read: options, the config (the model
    family's checks), the chat template, the output directory, and the free disk space against
    the artifact's estimated size. Weights are then streamed one tensor at a time.
    ``progress``: where progress lines go (None: standard error, a bar on a terminal).
    """
    from feather_export.export.footprint import check_free_disk, estimated_bytes
    from feather_export.models.chat import prompt_template
    from feather_export.models.checkpoint import (checkpoint_path, is_builtin, load_config,
                                                  open_weights)
    from feather_export.models.geometry import geometry_of

    out = Path(out_dir)
    config = load_config(model_spec)
    cfg = check_export(options, geometry_of(config, options.resolution), out, config)
    prompt_template(None if is_builtin(model_spec) else checkpoint_path(model_spec),
                    str(model_spec))
    weights, source = open_weights(model_spec, config)
    check_free_disk(out, estimated_bytes(weights, options))
    return export_model(weights, str(model_spec), source, out, options, cfg, progress)


def export_model(w, model_id: str, source: Path | None, out: Path, options: ExportOptions,
                 cfg: PruneConfig, progress: Callable[[str], None] | None = None) -> Path:
    """Write the artifact of the weight source ``w`` (``models.weights``; ``cfg`` from
    ``check_export``), streaming each segment's weights into its external-data file.

    ``source`` is the checkpoint directory (tokenizer and preprocessor are copied from it), or
    None for built-in models (the tiny tokenizer and the tower's preprocessor config are written).
    The manifest stores the rendered chat template (``models.chat``).
    """
    from feather_export.export.footprint import estimated_bytes
    from feather_export.export.progress import ExportProgress
    from feather_export.models.chat import prompt_template
    from feather_export.models.geometry import geometry_of

    geo = geometry_of(w.config, options.resolution)
    et = DTYPES[options.dtype]
    plan = plan_segments(geo.num_layers, cfg)
    report = ExportProgress(estimated_bytes(w, options), progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "onnx").mkdir()
        segments, opset = [], OPSET
        for i, seg in enumerate(plan, 1):
            segment, seg_opset = _export_segment(w, seg, cfg, geo, et, options, tmp,
                                                 report, (i, len(plan), out.name))
            segments.append(segment)
            opset = max(opset, seg_opset)
        files = _copy_inputs(w.config, source, tmp)
        manifest = _manifest(w, model_id, source, cfg, options, geo, segments, files, opset)
        manifest["prompt"] = prompt_template(source, model_id).to_dict()
        write_manifest(tmp, manifest)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_segment(w, seg: SegmentPlan, cfg: PruneConfig, geo, et: int, options: ExportOptions,
                    root: Path, report, position) -> tuple[Segment, int]:
    """Build one segment with its weights streamed into ``onnx/<name>.onnx.data``; a segment
    whose weights stay under ``INLINE_LIMIT`` is folded back into one ``.onnx`` file."""
    import onnx

    from feather_export.onnx.initializers import InitializerStore

    index, count, label = position
    rel = f"onnx/{seg.name}.onnx"
    data_rel = f"{rel}.data"
    store = InitializerStore(root / data_rel)
    layers = (seg.layers[1] - seg.layers[0] if seg.kind == "decoder"
              else _vision_layers(w) if seg.kind == "vision" else 0)
    report.segment(index, count, label, seg.name, layers, store)
    try:
        onnx_model = _build(w, seg, cfg, geo, et, options, store, report.layer)
    finally:
        data_sha = store.close()
    report.end_segment()
    data_files = ()
    if store.tensor_bytes < INLINE_LIMIT:
        store.inline_into(onnx_model)
    else:
        data_files = ({"file": data_rel, "sha256": data_sha},)
    onnx.save_model(onnx_model, root / rel)
    segment = Segment(seg.name, seg.kind, rel, sha256_file(root / rel),
                      _value_infos(onnx_model.graph.input), _value_infos(onnx_model.graph.output),
                      seg.layers, seg.stage, data_files)
    return segment, onnx_model.opset_import[0].version


def _vision_layers(w) -> int:
    from feather_export.models.family import vision_spec

    return vision_spec(w.config).run_layers


def _check_weights(options: ExportOptions) -> None:
    for flag, value in (("--weights", options.weights), ("--lm-head-weights", options.lm_head_weights)):
        if value not in WEIGHT_CHOICES:
            raise FeatherError(f"{flag} {value!r} is not one of {', '.join(WEIGHT_CHOICES)}")
    quantized = options.weights != "float" or options.lm_head_weights != "float"
    if quantized and DTYPES[options.dtype] not in SCALE_TYPES:
        raise FeatherError(f"--weights/--lm-head-weights int8|int4 need --dtype fp32 or fp16 "
                           f"(ONNX Runtime's CPU DequantizeLinear has no {options.dtype} output)")
    if "int4" in (options.weights, options.lm_head_weights):
        check_block_size(options.block_size)
    elif options.block_size != DEFAULT_BLOCK_SIZE:
        raise FeatherError("--block-size only applies to int4 weights (--weights int4 or "
                           "--lm-head-weights int4)")


def _quantization(options: ExportOptions) -> dict:
    """The manifest's ``quantization`` record (docs/design.md §6)."""
    if options.weights == "float" and options.lm_head_weights == "float":
        return {"weights": "float", "lm_head": "float"}
    return {
        "weights": options.weights, "lm_head": options.lm_head_weights,
        "block_size": options.block_size if "int4" in (options.weights,
                                                       options.lm_head_weights) else None,
        "scheme": "symmetric (zero point 0), round to nearest even; int8 per output channel "
                  "(-127..127), int4 per block along the input width (-7..7)",
        "scale_dtype": options.dtype,
        "float": "embeddings, norms, vision tower, projector"
                 + ("" if options.weights != "float" else ", decoder linears")
                 + ("" if options.lm_head_weights != "float" else ", lm_head"),
        "opset": QUANT_OPSET,
    }


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FeatherError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise FeatherError(f"--out {out} exists, is not empty and is not a feather-export artifact; "
                           "choose a new directory (an existing artifact would be replaced)")


def _build(w, seg: SegmentPlan, cfg: PruneConfig, geo, et: int, options: ExportOptions,
           store=None, on_layer=None):
    from feather_export.onnx.decoder import build_decoder_span, build_embed
    from feather_export.onnx.select import build_select
    from feather_export.onnx.vision import build_vision
    from feather_export.onnx.vision_next import build_next_vision

    if seg.kind == "vision":
        if geo.crop_side:                      # LLaVA-NeXT: crops, stitching, image_newline
            return build_next_vision(w, geo, et, store, on_layer)
        return build_vision(w, et, store, on_layer)
    if seg.kind == "embed":
        return build_embed(w, et, store)
    if seg.kind == "decoder":
        a, b = seg.layers
        final = b == w.config.text_config.num_hidden_layers
        return build_decoder_span(w, a, b, et, final=final, score_layer=seg.score_layer,
                                  score_criterion=seg.score_criterion,
                                  quant=options.decoder_quant(),
                                  lm_head_quant=options.lm_head_quant(), store=store,
                                  on_layer=on_layer)
    onnx_model = build_select(w, cfg.stages[seg.stage], geo, et)
    if options.trt_plugin_only:
        del onnx_model.functions[:]
    return onnx_model


def _value_infos(values) -> tuple[dict, ...]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": DTYPE_NAMES.get(t.elem_type, "?")})
    return tuple(out)


def _copy_inputs(config, source: Path | None, tmp: Path) -> list[dict]:
    """Tokenizer and preprocessor config, so the artifact runs with nothing else.

    Built-in models (``source`` None) get the tiny tokenizer and their tower's preprocessor config.
    """
    from feather_runtime.preprocess import write_preprocessor_config

    from feather_export.models.family import vision_spec
    from feather_export.models.tokenizer import save_tiny_tokenizer

    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    if source is None:
        save_tiny_tokenizer(tok_dir)
        write_preprocessor_config(tmp, config.vision_config.image_size,
                                  vision_spec(config).processors[0],
                                  pinpoints=getattr(config, "image_grid_pinpoints", None) or ())
    else:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tok_dir / name)
        shutil.copy2(source / "preprocessor_config.json", tmp / "preprocessor_config.json")
    files = sorted([*tok_dir.iterdir(), tmp / "preprocessor_config.json"])
    return [{"file": str(f.relative_to(tmp)), "sha256": sha256_file(f)} for f in files]


def _anyres(config, geo) -> dict:
    """The manifest's LLaVA-NeXT block: what the runtime's letterbox and overlays need."""
    from feather_export.models.anyres import anyres_plan

    return {**anyres_plan(config, geo.image_size).to_dict(), "rasters": geo.to_dict()["rasters"]}


def _manifest(w, model_id: str, source, cfg: PruneConfig, options: ExportOptions, geo,
              segments: list[Segment], files: list[dict], opset: int) -> dict:
    import onnx
    import torch
    import transformers

    from feather_export import __version__
    from feather_export.onnx.decoder import attn_geometry
    from feather_export.models.checkpoint import BUILTIN_CHECKPOINTS

    text = w.config.text_config
    heads, kv_heads, head_dim = attn_geometry(text)
    eos = w.eos_token_ids
    config_json = w.config.to_json_string(use_diff=False)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "id": model_id if source is None or model_id in BUILTIN_CHECKPOINTS
                  else str(Path(source).resolve()),
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
            "num_layers": geo.num_layers, "num_image_tokens": geo.num_image_tokens,
            "grid_side": geo.grid_side, "image_size": w.config.vision_config.image_size,
            "image_token_id": w.config.image_token_index, "hidden_size": text.hidden_size,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "intermediate_size": text.intermediate_size, "vocab_size": text.vocab_size,
            "eos_token_ids": [int(e) for e in eos],
            "image_tokens": geo.to_dict(),
            **({"anyres": _anyres(w.config, geo)} if geo.crop_side else {}),
        },
        "prune": cfg.to_dict(),
        "dtype": options.dtype,
        "opset": opset,
        "quantization": _quantization(options),
        "max_text_tokens": options.max_text_tokens,
        "max_new_tokens": options.max_new_tokens,
        "trt_plugin_only": options.trt_plugin_only,
        "segments": [s.to_dict() for s in segments],
        "files": files,
        "tools": {"feather_export": __version__, "onnx": onnx.__version__,
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "python": sys.version.split()[0]},
    }


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty, or a previous artifact) with ``tmp`` in two renames."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
