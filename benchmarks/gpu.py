#!/usr/bin/env python
"""GPU benchmark: real LLaVA-1.5 geometry (random weights), pruned vs none, next to the roofline.

Uses what the machine has, in this order (--engine picks one):
  1. trt: TensorRT (importable): exports fp16 artifacts of the shape model, builds their engines
     (feather_export.tensorrt.build, one timing cache shared by the artifacts) and runs
     `feather-export bench --backend tensorrt` on them (interleaved);
  2. ort: ONNX Runtime with the CUDA provider (onnxruntime-gpu): the same artifacts,
     `feather-export bench --backend onnxruntime-cuda`;
  3. torch: torch eager segments on CUDA (benchmarks/gpu_torch.py), same report format.

    python benchmarks/gpu.py                                   # 7B geometry, none vs FEATHER@144
    python benchmarks/gpu.py --engine torch --methods feather,fastv,fastervlm
    python benchmarks/gpu.py --model shape-llava-1.5-13b --engine torch

The roofline device is detected from nvidia-smi (H100, H200, A100, Jetson Orin); --device names it.
The last line printed is one JSON object with the headline figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shape-llava-1.5-7b",
                   help="a shape model (shape-llava-1.5-7b, shape-llava-1.5-13b, shape-llava-1b) "
                        "or a tiny model (tiny: a smoke test)")
    p.add_argument("--methods", default="feather", help="comma list: feather,fastv,fastervlm")
    p.add_argument("--budget", type=int, default=144)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gen-lengths", default="1,16,128,512")
    p.add_argument("--engine", default="auto", choices=["auto", "trt", "ort", "torch"])
    p.add_argument("--plugin", help="trt: libfeather_plugin.so (default: the ONNX function body)")
    p.add_argument("--device", help="roofline device key (default: detected from nvidia-smi)")
    p.add_argument("--torch-device", default="cuda", help="torch path: cuda (cpu: smoke test)")
    p.add_argument("--work", default="/tmp/feather-bench-gpu", help="ORT path: artifact dir")
    p.add_argument("--results", help="default benchmarks/results/gpu_<device>_<engine>")
    p.add_argument("--keep-artifacts", action="store_true")
    return p.parse_args(argv)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_engine(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import tensorrt  # noqa: F401
        return "trt"
    except ImportError:
        pass
    try:
        import onnxruntime as ort
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return "ort"
    except ImportError:
        pass
    return "torch"


def main(argv=None) -> int:
    args = parse_args(argv)
    from feather_runtime import FeatherError

    engine = pick_engine(args.engine)
    say(f"engine: {engine}")
    t0 = time.perf_counter()
    try:
        if engine in ("ort", "trt"):
            report, results = run_artifacts(args, engine)
        else:
            report, results = run_torch(args)
    except FeatherError as exc:
        print(f"gpu: error: {exc}", file=sys.stderr)
        return 2
    from feather_export.bench.run import headline_line

    (results / "COMMAND.txt").write_text(
        "# made by (from the repository root, venv active):\n"
        f"python benchmarks/gpu.py {shlex.join(argv if argv is not None else sys.argv[1:])}\n"
        f"# engine {engine}, device {report['device']['name']}, machine "
        f"{report['machine'].get('gpus')}, {report['created']}, "
        f"total {time.perf_counter() - t0:.0f} s\n")
    print(json.dumps(headline_line(report, str(results / "bench.json"))))
    return 0


def _results_dir(args, engine: str, device_key: str) -> Path:
    path = Path(args.results) if args.results else \
        REPO / "benchmarks" / "results" / f"gpu_{device_key}_{engine}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- ONNX Runtime CUDA -----------------------------------------------------------------------------

def run_artifacts(args, engine: str):
    """Export the artifacts, build engines for TensorRT, bench them with the engine's backend."""
    from feather_export.bench.run import gpu_names
    from feather_export.cli.bench import add_bench_parser
    from feather_export.export.artifact import ExportOptions, export
    from feather_export.bench.perf_model import device_for_gpu_name
    from feather_export.models.shapes import SHAPE_MODELS
    from feather_export.export.shapes import export_shape_artifacts
    from feather_runtime import FeatherError

    methods = [m for m in args.methods.split(",") if m]
    max_gen = max(int(g) for g in args.gen_lengths.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    jobs = [(work / "none", ExportOptions(method="none", dtype=args.dtype, max_text_tokens=64,
                                          max_new_tokens=max_gen))]
    jobs += [(work / f"{m}{args.budget}", ExportOptions(method=m, budget=args.budget,
                                                        dtype=args.dtype, max_text_tokens=64,
                                                        max_new_tokens=max_gen))
             for m in methods]
    if args.model in SHAPE_MODELS:
        need = (_params_b(args.model) * (2 if args.dtype != "fp32" else 4) * len(jobs)
                * (2 if engine == "trt" else 1))             # TensorRT plans hold the weights too
        free = shutil.disk_usage(work).free / GIB
        if free < need * 1.1 + 2:
            raise FeatherError(f"{work}: {free:.0f} GiB free, the artifacts need ~{need:.0f} GiB; "
                               "compare fewer --methods or use another --work")
        paths = export_shape_artifacts(args.model, jobs, progress=say)
    else:
        paths = [export(args.model, out, opts, progress=say) for out, opts in jobs]
    gc.collect()
    if engine == "trt":
        from feather_export.tensorrt.build import build_engines

        cache = work / "timing.cache"
        for path in paths:
            say(f"building TensorRT engines for {path}")
            build_engines(path, None, args.plugin, cache, progress=say)
    device_key = args.device or next(
        (d.key for d in map(device_for_gpu_name, gpu_names()) if d is not None), "gpu")
    results = _results_dir(args, engine, device_key)
    backend = "tensorrt" if engine == "trt" else "onnxruntime-cuda"
    bench_argv = ["bench", *map(str, paths), "--backend", backend,
                  "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                  "--gen-lengths", args.gen_lengths, "--json", str(results / "bench.json"),
                  "--plot", str(results), "--no-verify"]
    if args.device:
        bench_argv += ["--device", args.device]
    parser = argparse.ArgumentParser(prog="feather-export")
    add_bench_parser(parser.add_subparsers(dest="command"))
    bench_args = parser.parse_args(bench_argv)
    try:
        bench_args.func(bench_args)
    finally:
        if not args.keep_artifacts:
            shutil.rmtree(work, ignore_errors=True)
    return json.loads((results / "bench.json").read_text()), results


def _params_b(name: str) -> float:
    from feather_export.bench.perf_model import shape_from_config
    from feather_export.models.shapes import shape_llava_config

    shape = shape_from_config(shape_llava_config(name))
    llm = shape.llm
    return (llm.layers * llm.layer_params() + 2 * llm.vocab * llm.hidden
            + shape.vision.params()) / GIB


# ---- torch eager -------------------------------------------------------------------------------------

def run_torch(args):
    import numpy as np
    import torch

    from feather_export.bench.run import (BenchOptions, Target, build_report, describe_machine,
                                          parse_gen_lengths, resolve_device, target_label)
    from feather_export.bench.report import format_table, write_plots
    from feather_export.methods.config import PruneConfig
    from feather_export.models.tiny import TINY_MODELS, build_tiny_model
    from feather_export.models.geometry import geometry_of
    from feather_export.bench.perf_model import shape_from_config
    from feather_export.models.shapes import build_shape_model
    from feather_export.models.tokenizer import build_tiny_tokenizer
    from feather_runtime import FeatherError
    from feather_runtime.prompt import PromptBuilder
    from gpu_torch import TorchSegments

    if args.torch_device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatherError("torch has no CUDA device here; run on a GPU machine (or "
                           "--torch-device cpu for a smoke test)")
    gen_lengths = parse_gen_lengths(args.gen_lengths)
    options = BenchOptions(repeats=args.repeats, warmup=args.warmup, gen_lengths=gen_lengths,
                           device=args.device)
    backend_name = f"torch-eager-{args.torch_device}"
    device = resolve_device(args.device or ("cpu" if args.torch_device == "cpu" else None),
                            backend_name, say=say)
    say(f"building {args.model}")
    model = build_tiny_model(args.model) if args.model in TINY_MODELS else \
        build_shape_model(args.model, say)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = model.to(device=args.torch_device, dtype=dtype).eval()
    gc.collect()
    geo = geometry_of(model.config)
    shape = shape_from_config(model.config)
    prunes = [PruneConfig.create("none", geo)] + [
        PruneConfig.create(m, geo, budget=args.budget) for m in args.methods.split(",") if m]
    targets = [Target(target_label(p), p.method, p, shape, args.dtype, args.model) for p in prunes]
    runner = TorchSegments(model, args.torch_device)
    ids = PromptBuilder(build_tiny_tokenizer()).build(options.prompt, geo.num_image_tokens)
    size = model.config.vision_config.image_size
    pixels = np.random.default_rng(options.seed).standard_normal((1, 3, size, size),
                                                                 dtype=np.float32)
    max_gen = max(gen_lengths)
    samples, total = [], (options.warmup + options.repeats) * len(targets)
    run_no = 0
    for rep in range(-options.warmup, options.repeats):
        shift = rep % len(targets)
        order = list(range(len(targets)))[shift:] + list(range(len(targets)))[:shift]
        for pos, i in enumerate(order):
            run_no += 1
            timings, steps, tokens = runner.generate(targets[i].prune, pixels, ids, max_gen,
                                                     geo.grid_side)
            samples.append({"target": targets[i].label, "repeat": rep, "warmup": rep < 0,
                            "order": pos, "tokens": len(tokens), "timings": timings,
                            "steps": steps})
            say(f"[{run_no:>3}/{total}] {'warm-up' if rep < 0 else f'repeat {rep + 1}':<10} "
                f"{targets[i].label:<16} ttft {timings['ttft'] * 1e3:8.1f} ms  selection "
                f"{timings['selection'] * 1e3:6.2f} ms  decode "
                f"{timings['decode_tokens_per_s']:7.1f} tok/s")
    report = build_report(targets, samples, device, describe_machine(backend_name), options,
                          int(ids.shape[1]), backend_name)
    results = _results_dir(args, "torch", device.key)
    (results / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    try:
        write_plots(report, results)
    except FeatherError as exc:
        say(f"no plots: {exc}")
    print(format_table(report), flush=True)
    return report, results


if __name__ == "__main__":
    sys.exit(main())
