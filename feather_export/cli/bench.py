"""``feather-export bench``: the command-line edge of ``feather_export.bench.run``.

Progress goes to stderr while running; the table goes to stdout; the last line printed is one
JSON object with the headline figures. ``add_bench_parser(subparsers)`` registers the command.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="latency of pruned vs unpruned artifacts next to the FLOPs/roofline model",
        description="Benchmark artifacts of one model, backend and precision side by side "
                    "(interleaved, after warm-up). Give the `none` artifact too for speed-ups.")
    p.add_argument("artifacts", nargs="+", metavar="OUT",
                   help="artifact directories (one of them exported with --method none)")
    p.add_argument("--json", metavar="FILE",
                   help="write the full report (every sample) here (default: not written)")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots here (needs matplotlib: "
                   "pip install 'feather-export[bench]'; default: no plots)")
    p.add_argument("--repeats", type=int, default=5, help="measured runs per artifact (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per artifact (default 1)")
    p.add_argument("--gen-lengths", default="1,16,64",
                   help="generation lengths to report decode tokens/s at; every run generates "
                        "the largest (default 1,16,64)")
    p.add_argument("--backend", help="onnxruntime, onnxruntime-cpu, onnxruntime-cuda, openvino, "
                   "openvino-bf16, openvino-f32, auto (the fastest here: OpenVINO bf16 on a CPU with bf16 units) (default: "
                   "onnxruntime, on CUDA when onnxruntime-gpu is installed)")
    p.add_argument("--device", help="roofline device: cpu (measured here; the default on CPU) "
                   "or h100-sxm, h200, a100, agx-orin, orin-nano (default on GPU: detected)")
    p.add_argument("--prompt", help="prompt text (default: a short question)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random image")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's)")
    p.add_argument("--ort-config", action="append", metavar="KEY=VALUE",
                   help="ONNX Runtime session config entry for every segment (repeatable), e.g. "
                        "session.intra_op.allow_spinning=0 (default: none beyond the runtime's)")
    p.add_argument("--cache-sweep", metavar="P1,P2,...",
                   help="also time one decode step of every decoder span against a synthetic "
                        "KV cache of these lengths (e.g. 128,512,1024,2048): how a step's cost "
                        "grows with the cache, over a wider range than a generation covers "
                        "(default: no sweep)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate every run's full length past end-of-sequence, so decode is "
                        "measured on models that stop early")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifacts when loading")
    p.add_argument("--quick-microbench", action="store_true",
                   help="small CPU micro-benchmark sizes (seconds; less accurate peak)")
    p.set_defaults(func=cmd_bench)
    return p


def options_from_args(args):
    from feather_export.bench.run import (DEFAULT_PROMPT, BenchOptions, parse_gen_lengths,
                                          parse_ort_config)

    return BenchOptions(repeats=args.repeats, warmup=args.warmup,
                        gen_lengths=parse_gen_lengths(args.gen_lengths), backend=args.backend,
                        device=args.device, prompt=args.prompt or DEFAULT_PROMPT, seed=args.seed,
                        verify=not args.no_verify, quick_microbench=args.quick_microbench,
                        threads=args.threads, ort_config=parse_ort_config(args.ort_config),
                        ignore_eos=args.ignore_eos,
                        cache_sweep=parse_gen_lengths(args.cache_sweep, "--cache-sweep")
                        if args.cache_sweep
                        else ())


def cmd_bench(args) -> int:
    from feather_export.bench.run import headline_line, run_bench
    from feather_export.bench.report import format_table, write_plots

    options = options_from_args(args)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)          # noqa: E731
    report = run_bench(args.artifacts, options, progress=say)
    json_path = None
    if args.json:
        json_path = str(Path(args.json))
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
        say(f"wrote {json_path}")
    if args.plot:
        for path in write_plots(report, args.plot):
            say(f"wrote {path}")
    print(format_table(report), flush=True)
    print(json.dumps(headline_line(report, json_path)), flush=True)
    return 0
