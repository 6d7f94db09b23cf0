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
    p.add_argument("--method", default="feather", help="none | feather | fastv | fastervlm")
    p.add_argument("--budget", type=int, help="image tokens kept by the first stage "
                   "(default: a quarter of the image tokens, 144 on LLaVA-1.5)")
    p.add_argument("--schedule", help="LAYER:COUNT,... e.g. 8:144,16:13 (overrides layers/counts)")
    p.add_argument("--stride", type=int, help="FEATHER grid stride (default: smallest s>=3 with "
                   "|grid| <= budget/2; 0 disables the grid)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--max-text-tokens", type=int, default=512, help="prompt text bound")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generation bound")
    p.add_argument("--trt-plugin-only", action="store_true",
                   help="drop the selection op's ONNX function body (TensorRT must load the plugin)")
    p.add_argument("--out", required=True, help="artifact directory to write")


def _export_options(args):
    from feather_export.export.artifact import ExportOptions

    return ExportOptions(method=args.method, budget=args.budget, schedule=args.schedule,
                         stride=args.stride, dtype=args.dtype, max_text_tokens=args.max_text_tokens,
                         max_new_tokens=args.max_new_tokens, trt_plugin_only=args.trt_plugin_only)


def cmd_make_tiny(args) -> int:
    from feather_export.models.tiny import make_tiny

    print(make_tiny(args.name, args.out))
    return 0


def cmd_export(args) -> int:
    from feather_export.export.artifact import export

    export(args.model, args.out, _export_options(args))
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
    out = export(args.model, args.out, _export_options(args))
    if args.backend == "tensorrt":
        _build_engines(out, args)
    else:
        print(f"built {out} for ONNX Runtime (no TensorRT engines: TensorRT is not installed; "
              "use --backend tensorrt on a machine with TensorRT)")
    return 0


def cmd_build_engines(args) -> int:
    _require_tensorrt()
    _build_engines(args.artifact, args)
    return 0


def _build_engines(artifact, args) -> None:
    from feather_export.tensorrt.build import build_engines

    build_engines(artifact, args.precision, args.plugin, args.timing_cache,
                  progress=lambda m: print(m, file=sys.stderr, flush=True),
                  workspace_mib=args.workspace, reuse_from=args.reuse_engines or ())
    print(f"built TensorRT engines in {artifact}/engines")


def _require_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise FeatherError("--backend tensorrt needs TensorRT (pip install 'feather-export[trt]' on "
                           "an NVIDIA machine, or JetPack on Jetson); it is not installed here") from None


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="engine precision (default: the artifact's --dtype, strongly typed; fp16/bf16 "
                        "on an fp32 artifact lets TensorRT pick reduced-precision tactics)")
    p.add_argument("--plugin", help="libfeather_plugin.so (needed with --trt-plugin-only)")
    p.add_argument("--timing-cache", help="tactic timing cache (default: OUT/engines/timing.cache)")
    p.add_argument("--workspace", type=int, metavar="MIB", help="builder workspace limit in MiB")
    p.add_argument("--reuse-engines", action="append", metavar="ARTIFACT",
                   help="reuse engines with the same key from another artifact (repeatable)")


def cmd_run(args) -> int:
    from feather_runtime import Pipeline

    if args.overlay:
        _check_overlay_path(args.overlay)
    pipe = Pipeline.load(args.artifact, backend=args.backend)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or ())
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

    model = None
    if args.model:
        from feather_export.models.checkpoint import resolve_model
        model, _ = resolve_model(args.model)
    checks = validate_artifact(args.artifact, model=model,
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
                             max_new_tokens=args.max_new_tokens)
    print(json.dumps({"text": builder.decode(res.token_ids), "token_ids": res.token_ids,
                      "kept": res.kept}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from feather_export import __version__

    parser = argparse.ArgumentParser(prog="feather-export", description=(
        "Export LLaVA checkpoints into pruned ONNX segments (FEATHER, FastV, FasterVLM) and run them."))
    parser.add_argument("--version", action="version", version=f"feather-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="export + engines for a fixed budget (the main job)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, or a built-in name: tiny-shapes (trained), tiny, tiny-gqa "
                        f"(random weights), shape-llava-1b, shape-llava-1.5-7b, shape-llava-1.5-13b "
                        f"(random weights, real shapes) (default: {DEFAULT_MODEL})")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    _prune_args(p)
    _engine_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("build-engines", help="TensorRT engines for an existing artifact (build them "
                       "on the device that runs them, e.g. a Jetson)")
    p.add_argument("artifact")
    _engine_args(p)
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("export", help="write the ONNX segments and manifest")
    p.add_argument("--model", required=True, help="checkpoint directory or tiny model name")
    _prune_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="answer a question about an image with a built artifact")
    p.add_argument("artifact")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--backend", help="onnxruntime (default), onnxruntime-cpu, onnxruntime-cuda, "
                   "tensorrt")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--overlay", metavar="PNG", help="also draw the kept image patches of every pruning "
                   "stage over the input image into this PNG")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="TensorRT 10.3 compatibility lint of an artifact")
    p.add_argument("artifact")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("validate", help="each segment in ONNX Runtime vs the PyTorch modules")
    p.add_argument("artifact")
    p.add_argument("--model", help="the source checkpoint (default: the one in the manifest)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("make-tiny", help="write a tiny LLaVA checkpoint directory")
    p.add_argument("name", help="tiny | tiny-gqa")
    p.add_argument("out")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("reference", help="run the PyTorch reference on a checkpoint directory")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--method", default="feather")
    p.add_argument("--budget", type=int)
    p.add_argument("--schedule")
    p.add_argument("--stride", type=int)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_reference)

    from feather_export.cli.bench import add_bench_parser
    from feather_export.cli.eval import add_eval_parser
    from feather_export.cli.serve import add_serve_parser

    add_bench_parser(sub)
    add_eval_parser(sub)
    add_serve_parser(sub)
    return parser


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
