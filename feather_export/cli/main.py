"""``feather-export``: the command line. Parses strings at the edge, calls the library, prints.

User errors (``FeatherError``) are printed as one line and exit with status 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from feather_export.errors import FeatherError

DEFAULT_MODEL = "tiny-shapes"   # the trained built-in checkpoint (feather_export/assets/tiny-shapes)
EXIT_USER_ERROR = 2


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="feather", choices=["none", "feather", "fastv", "fastervlm", "btp"],
                   help="pruning method")
    p.add_argument("--budget", type=int, help="image tokens kept by the first stage "
                   "(default: a quarter of the image tokens, 144 on LLaVA-1.5; btp: its schedule's "
                   "first count)")
    p.add_argument("--schedule", help="LAYER:COUNT,... e.g. 8:144,16:13, overrides the method's "
                   "layers and counts; btp: a last count of 0 drops every image token (default: "
                   "the method's schedule for this model)")
    p.add_argument("--btp-lambda", help="BTP attention weights per stage, e.g. 0.3,0.9,1.0; stages "
                   "beyond the list reuse its last weight (default: 0.3,0.9,1.0)")
    p.add_argument("--stride", type=int, help="FEATHER grid stride; 0 disables the grid (default: "
                   "the smallest s >= 3 with |grid| <= budget/2)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="activations and float weights (bf16: TensorRT engines only; the runtime "
                        "runs fp32 and fp16 artifacts)")
    p.add_argument("--weights", default="float", choices=["float", "int8", "int4"],
                   help="decoder linear weights: float (the --dtype), int8 per output channel or "
                        "int4 per block, symmetric, weight-only (opset 21) (default: float)")
    p.add_argument("--block-size", type=int, default=128,
                   help="int4 block along the input width, a power of two >= 16, capped at the "
                        "width (default: 128)")
    p.add_argument("--lm-head-weights", default="float", choices=["float", "int8", "int4"],
                   help="lm_head weights, quantized like --weights when int8/int4 (default: float)")
    p.add_argument("--max-text-tokens", type=int, default=512,
                   help="longest prompt text the artifact accepts (sizes the KV caches)")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="most tokens one generation may produce (sizes the KV caches)")
    p.add_argument("--trt-plugin-only", action="store_true",
                   help="drop the selection op's ONNX function body (TensorRT must load the plugin)")
    p.add_argument("--resolution", metavar="HxW",
                   help="LLaVA-NeXT only: the image_grid_pinpoints entry the artifact is exported "
                        "for; every image is letterboxed to it (default: the largest square one, "
                        "672x672 on llava-v1.6)")
    p.add_argument("--out", required=True, help="artifact directory to write")


def _export_options(args):
    from feather_export.export.artifact import ExportOptions

    return ExportOptions(method=args.method, budget=args.budget, schedule=args.schedule,
                         stride=args.stride, btp_lambda=args.btp_lambda, dtype=args.dtype,
                         max_text_tokens=args.max_text_tokens, max_new_tokens=args.max_new_tokens,
                         trt_plugin_only=args.trt_plugin_only, weights=args.weights,
                         block_size=args.block_size, lm_head_weights=args.lm_head_weights,
                         resolution=args.resolution)


def cmd_make_tiny(args) -> int:
    from feather_export.models.tiny import make_tiny

    print(make_tiny(args.name, args.out))
    return 0


def cmd_export(args) -> int:
    from feather_export.export.artifact import export

    out = export(args.model, args.out, _export_options(args))      # progress: a bar on a TTY
    print(f"wrote {out}: {_summary(out)}")
    return 0


def cmd_build(args) -> int:
    from feather_export.export.artifact import export

    engine_flags = [f for f, v in (("--precision", args.precision), ("--plugin", args.plugin),
                                   ("--timing-cache", args.timing_cache),
                                   ("--workspace", args.workspace),
                                   ("--reuse-engines", args.reuse_engines)) if v]
    if args.backend != "tensorrt" and engine_flags:
        raise FeatherError(f"{', '.join(engine_flags)} only apply to --backend tensorrt")
    if args.backend == "tensorrt":
        _require_tensorrt()
    out = export(args.model, args.out, _export_options(args))      # progress: a bar on a TTY
    if args.backend == "tensorrt":
        _build_engines(out, args)
        print(f"built {out}: {_summary(out)}, with TensorRT engines in {out}/engines")
    else:
        print(f"built {out}: {_summary(out)}, for ONNX Runtime (no TensorRT engines: TensorRT is "
              "not installed here; use --backend tensorrt on a machine with TensorRT)")
    return 0


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _summary(out) -> str:
    """One line's worth about an artifact: segments, method, budget, dtype."""
    from feather_runtime.manifest import load_manifest

    m = load_manifest(out, verify=False)
    keeps = [str(stage["keep"]) for stage in m["prune"]["stages"]]
    kept = (f" keeping {' -> '.join(keeps)} of {m['model']['num_image_tokens']} image tokens"
            if keeps else "")
    return f"{len(m.segments)} segments, {m['prune']['method']}{kept}, {m['dtype']}"


def cmd_build_engines(args) -> int:
    _require_tensorrt()
    _build_engines(args.artifact, args)
    print(f"built TensorRT engines in {args.artifact}/engines")
    return 0


def _build_engines(artifact, args) -> None:
    from feather_export.tensorrt.build import build_engines

    build_engines(artifact, args.precision, args.plugin, args.timing_cache, progress=_progress,
                  workspace_mib=args.workspace, reuse_from=args.reuse_engines or ())


def _require_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise FeatherError("--backend tensorrt needs TensorRT (pip install 'feather-export[trt]' on "
                           "an NVIDIA machine, or JetPack on Jetson); it is not installed here") from None


def _engine_args(p: argparse.ArgumentParser, title: str) -> None:
    g = p.add_argument_group(title)
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="engine precision (default: the artifact's --dtype, strongly typed; fp16/bf16 "
                        "on an fp32 artifact lets TensorRT 10.x pick reduced-precision tactics; "
                        "TensorRT 11 builds the artifact's dtype only)")
    g.add_argument("--plugin", help="libfeather_plugin.so (needed with --trt-plugin-only; default: "
                   "none, the selection runs as the op's ONNX function body)")
    g.add_argument("--timing-cache", help="tactic timing cache file, its directories created "
                   "(default: OUT/engines/timing.cache)")
    g.add_argument("--workspace", type=int, metavar="MIB",
                   help="builder workspace limit in MiB (default: TensorRT's, the device memory)")
    g.add_argument("--reuse-engines", action="append", metavar="ARTIFACT",
                   help="reuse engines with the same key from another artifact (repeatable; "
                        "default: none)")


def cmd_run(args) -> int:
    from feather_runtime import Pipeline

    if args.overlay:
        _check_overlay_path(args.overlay)
    pipe = Pipeline.load(args.artifact, backend=args.backend)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or (),
                  ignore_eos=args.ignore_eos)
    if args.json or args.overlay:
        res = pipe.generate(image=args.image, prompt=args.prompt, **kwargs)
    if args.overlay:
        from feather_export.quality.overlay import draw_pipeline_overlay

        written = draw_pipeline_overlay(pipe, args.image, res, args.overlay,
                                        title=f"{pipe.method}: {args.prompt} -> {res.text!r}")
        print(f"wrote {written}", file=sys.stderr)
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "kept": res.kept,
                          "timings": res.timings}))
        return 0
    if args.overlay:
        print(res.text)
        return 0
    for piece in pipe.stream(image=args.image, prompt=args.prompt, **kwargs):
        print(piece, end="", flush=True)
    print()
    return 0


def _check_overlay_path(path: str) -> None:
    """Refuse an overlay target that cannot be written, before any model work."""
    from pathlib import Path

    target = Path(path)
    if target.suffix.lower() != ".png":
        raise FeatherError(f"--overlay {path}: the overlay is a PNG; give a path ending in .png")
    if not target.parent.is_dir():
        raise FeatherError(f"--overlay {path}: the directory {target.parent} does not exist")
    if target.is_dir():
        raise FeatherError(f"--overlay {path} is a directory")


def cmd_check(args) -> int:
    from feather_export.tensorrt.lint import check_artifact, format_findings

    findings = check_artifact(args.artifact)
    print(format_findings(findings))
    return 1 if any(f.severity == "error" for f in findings) else 0


def cmd_validate(args) -> int:
    from feather_export.export.validate import validate_artifact

    weights = None
    if args.model:             # read lazily, layer by layer, like the export itself
        from feather_export.models.checkpoint import open_weights
        weights, _ = open_weights(args.model)
    checks = validate_artifact(args.artifact, weights=weights,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def cmd_reference(args) -> int:
    from feather_runtime.preprocess import ImagePreprocessor, load_image
    from feather_runtime.prompt import PromptBuilder

    from feather_export.models.checkpoint import check_checkpoint_dir, load_checkpoint
    from feather_export.methods.reference import reference_generate

    path = check_checkpoint_dir(args.model)
    model = load_checkpoint(path)
    pixels = ImagePreprocessor.from_dir(path)(load_image(args.image))
    builder = PromptBuilder.from_dir(path)
    ids = builder.build(args.prompt, model.config.image_seq_length)
    res = reference_generate(model, pixels, ids, method=args.method, budget=args.budget,
                             schedule=args.schedule, stride=args.stride,
                             btp_lambda=args.btp_lambda, max_new_tokens=args.max_new_tokens)
    print(json.dumps({"text": builder.decode(res.token_ids), "token_ids": res.token_ids,
                      "kept": res.kept}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from feather_export import __version__

    parser = Parser(prog="feather-export", description=(
        "Export LLaVA checkpoints into pruned ONNX segments (FEATHER, FastV, FasterVLM, BTP) and run them."))
    parser.add_argument("--version", action="version", version=f"feather-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("build", help="export + engines for a fixed budget (the main job)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, or a built-in name: tiny-shapes (trained), tiny, tiny-gqa, "
                        f"tiny-mistral, tiny-qwen2-siglip, tiny-llama-siglip (random weights), "
                        f"shape-llava-1b, shape-llava-1.5-7b, shape-llava-1.5-13b, "
                        f"shape-llava-interleave-qwen-0.5b (random weights, real shapes) "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="onnxruntime: the ONNX artifact only; tensorrt: also build TensorRT engines "
                        "on this machine")
    _prune_args(p)
    _engine_args(p, "TensorRT engines (only with --backend tensorrt)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("build-engines", help="TensorRT engines for an existing artifact (build them "
                       "on the device that runs them, e.g. a Jetson)")
    p.add_argument("artifact", help="artifact directory (from build or export)")
    _engine_args(p, "TensorRT engines")
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("export", help="write the ONNX segments and manifest")
    p.add_argument("--model", required=True, help="checkpoint directory or tiny model name")
    _prune_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="answer a question about an image with a built artifact")
    p.add_argument("artifact", help="artifact directory (from build or export)")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help="the question about the image")
    p.add_argument("--max-new-tokens", type=int, help="most tokens to generate (default: 64, or the "
                   "artifact's --max-new-tokens if smaller)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate exactly --max-new-tokens tokens, past end-of-sequence")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens with this total probability")
    p.add_argument("--seed", type=int, help="sampling seed (default: random; greedy ignores it)")
    p.add_argument("--stop", action="append",
                   help="stop string, not included in the answer (repeatable; default: none)")
    p.add_argument("--backend", help="onnxruntime, onnxruntime-cpu, onnxruntime-cuda, openvino, "
                   "openvino-bf16, openvino-f32, auto (the fastest here), tensorrt "
                   "(default: onnxruntime, on CUDA when onnxruntime-gpu is installed)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--overlay", metavar="PNG", help="also draw the kept image patches of every pruning "
                   "stage over the input image into this PNG (default: none)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="TensorRT 10.3 compatibility lint of an artifact")
    p.add_argument("artifact", help="artifact directory")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("validate", help="each segment in ONNX Runtime vs the PyTorch modules")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--model", help="the source checkpoint (default: the one in the manifest)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("make-tiny", help="write a tiny LLaVA checkpoint directory")
    p.add_argument("name", help="tiny | tiny-gqa | tiny-mistral | tiny-qwen2-siglip | tiny-llama-siglip | "
                   "tiny-clip-full")
    p.add_argument("out", help="checkpoint directory to write (absent or empty)")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("reference", help="run the PyTorch reference on a checkpoint directory")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the question about the image")
    p.add_argument("--method", default="feather", choices=["none", "feather", "fastv", "fastervlm", "btp"],
                   help="pruning method")
    p.add_argument("--budget", type=int, help="image tokens kept by the first stage (default: a "
                   "quarter of the image tokens)")
    p.add_argument("--schedule", help="LAYER:COUNT,... (default: the method's schedule)")
    p.add_argument("--stride", type=int, help="FEATHER grid stride; 0 disables the grid (default: "
                   "the smallest s >= 3 with |grid| <= budget/2)")
    p.add_argument("--btp-lambda", help="BTP attention weights per stage (default: 0.3,0.9,1.0)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate")
    p.set_defaults(func=cmd_reference)

    from feather_export.cli.bench import add_bench_parser
    from feather_export.cli.calibrate import add_calibrate_parser
    from feather_export.cli.eval import add_eval_parser
    from feather_export.cli.serve import add_serve_parser

    add_bench_parser(sub)
    add_eval_parser(sub)
    add_calibrate_parser(sub)
    add_serve_parser(sub)
    return parser


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = (action.option_strings and default is not None and default is not False
                 and default != argparse.SUPPRESS)
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FeatherError as exc:
        print(f"feather-export: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("feather-export: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:             # e.g. `feather-export run ... | head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
