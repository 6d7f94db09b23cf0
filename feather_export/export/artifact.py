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
from feather_export.onnx.graph import DTYPES, OPSET

EXTERNAL_DATA_THRESHOLD = 1_800_000_000     # protobuf's limit is 2 GB
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


def check_export(options: ExportOptions, geo, out: Path) -> PruneConfig:
    """Refuse bad options and output directories before any weight is loaded."""
    if options.dtype not in DTYPES:
        raise FeatherError(f"--dtype {options.dtype!r} is not one of {', '.join(DTYPES)}")
    if options.max_text_tokens < 1 or options.max_new_tokens < 1:
        raise FeatherError("--max-text-tokens and --max-new-tokens must be at least 1")
    _check_output_dir(out)
    return PruneConfig.create(options.method, geo, budget=options.budget,
                              schedule=options.schedule, stride=options.stride,
                              btp_lambda=options.btp_lambda)


def export(model_spec: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions,
           progress: Callable[[str], None] | None = None) -> Path:
    """Export ``model_spec`` (a built-in model name or a checkpoint directory) into ``out_dir``."""
    from feather_export.models.geometry import geometry_of
    from feather_export.models.checkpoint import load_config, resolve_model

    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out_dir)
    cfg = check_export(options, geometry_of(load_config(model_spec)), out)
    say(f"loading model {model_spec}")
    model, source = resolve_model(model_spec)
    return export_model(model, str(model_spec), source, out, options, cfg, say)


def export_model(model, model_id: str, source: Path | None, out: Path, options: ExportOptions,
                 cfg: PruneConfig, say: Callable[[str], None]) -> Path:
    """Write the artifact of an already loaded model (``cfg`` from ``check_export``).

    ``source`` is the checkpoint directory (tokenizer and preprocessor are copied from it), or
    None for built-in models (the tiny tokenizer and a CLIP preprocessor config are written).
    """
    from feather_export.models.geometry import geometry_of

    geo = geometry_of(model.config)
    et = DTYPES[options.dtype]
    plan = plan_segments(geo.num_layers, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "onnx").mkdir()
        segments = []
        for i, seg in enumerate(plan, 1):
            say(f"[{out.name} {i}/{len(plan)}] exporting {seg.name}")
            onnx_model = _build(model, seg, cfg, geo.grid_side, et, options.trt_plugin_only)
            segments.append(_save_segment(tmp, seg, onnx_model))
            del onnx_model                       # large models: free each graph once saved
        files = _copy_inputs(model.config.vision_config.image_size, source, tmp)
        manifest = _manifest(model, model_id, source, cfg, options, geo, segments, files)
        write_manifest(tmp, manifest)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FeatherError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise FeatherError(f"--out {out} exists, is not empty and is not a feather-export artifact; "
                           "choose a new directory (an existing artifact would be replaced)")


def _build(model, seg: SegmentPlan, cfg: PruneConfig, side: int, et: int, plugin_only: bool):
    from feather_export.onnx.decoder import build_decoder_span, build_embed
    from feather_export.onnx.select import build_select
    from feather_export.onnx.vision import build_vision

    if seg.kind == "vision":
        return build_vision(model, et)
    if seg.kind == "embed":
        return build_embed(model, et)
    if seg.kind == "decoder":
        a, b = seg.layers
        final = b == model.config.text_config.num_hidden_layers
        return build_decoder_span(model, a, b, et, final=final, score_layer=seg.score_layer,
                                  score_criterion=seg.score_criterion)
    onnx_model = build_select(model, cfg.stages[seg.stage], side, et)
    if plugin_only:
        del onnx_model.functions[:]
    return onnx_model


def _value_infos(values) -> tuple[dict, ...]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": DTYPE_NAMES.get(t.elem_type, "?")})
    return tuple(out)


def _save_segment(root: Path, seg: SegmentPlan, onnx_model) -> Segment:
    import onnx

    rel = f"onnx/{seg.name}.onnx"
    size = sum(len(t.raw_data) for t in onnx_model.graph.initializer)
    data_files = ()
    if size > EXTERNAL_DATA_THRESHOLD:
        data_rel = f"onnx/{seg.name}.onnx.data"
        onnx.save_model(onnx_model, root / rel, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{seg.name}.onnx.data",
                        size_threshold=1024)
        data_files = ({"file": data_rel, "sha256": sha256_file(root / data_rel)},)
    else:
        onnx.save_model(onnx_model, root / rel)
    return Segment(seg.name, seg.kind, rel, sha256_file(root / rel),
                   _value_infos(onnx_model.graph.input), _value_infos(onnx_model.graph.output),
                   seg.layers, seg.stage, data_files)


def _copy_inputs(image_size: int, source: Path | None, tmp: Path) -> list[dict]:
    """Tokenizer and preprocessor config, so the artifact runs with nothing else.

    Built-in models (``source`` None) get the tiny tokenizer and a CLIP preprocessor config.
    """
    from feather_runtime.preprocess import write_preprocessor_config

    from feather_export.models.tokenizer import save_tiny_tokenizer

    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    if source is None:
        save_tiny_tokenizer(tok_dir)
        write_preprocessor_config(tmp, image_size)
    else:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tok_dir / name)
        shutil.copy2(source / "preprocessor_config.json", tmp / "preprocessor_config.json")
    files = sorted([*tok_dir.iterdir(), tmp / "preprocessor_config.json"])
    return [{"file": str(f.relative_to(tmp)), "sha256": sha256_file(f)} for f in files]


def _manifest(model, model_id: str, source, cfg: PruneConfig, options: ExportOptions, geo,
              segments: list[Segment], files: list[dict]) -> dict:
    import onnx
    import torch
    import transformers

    from feather_export import __version__
    from feather_export.onnx.decoder import attn_geometry
    from feather_export.models.checkpoint import BUILTIN_CHECKPOINTS

    text = model.config.text_config
    heads, kv_heads, head_dim = attn_geometry(text)
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    config_json = model.config.to_json_string(use_diff=False)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "id": model_id if source is None or model_id in BUILTIN_CHECKPOINTS
                  else str(Path(source).resolve()),
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
            "num_layers": geo.num_layers, "num_image_tokens": geo.num_image_tokens,
            "grid_side": geo.grid_side, "image_size": model.config.vision_config.image_size,
            "image_token_id": model.config.image_token_index, "hidden_size": text.hidden_size,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "intermediate_size": text.intermediate_size, "vocab_size": text.vocab_size,
            "eos_token_ids": [int(e) for e in eos],
        },
        "prune": cfg.to_dict(),
        "dtype": options.dtype,
        "opset": OPSET,
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
