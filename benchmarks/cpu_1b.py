#!/usr/bin/env python
"""CPU benchmark on the ~1.2B LLaVA-shaped model (shape-llava-1b, fp32, ONNX Runtime CPU).

Builds the model once in-process (deterministic random weights), exports `none` and each
requested method at the budget, runs `feather-export bench` on them side by side (interleaved),
profiles one prefill of each with ONNX Runtime's profiler, writes everything to --results, and
deletes the multi-GB artifacts unless --keep-artifacts.

    python benchmarks/cpu_1b.py                      # none vs FEATHER@144 (~15 min on 2 cores)
    python benchmarks/cpu_1b.py --methods feather,fastv --results benchmarks/results/cpu_1b_fastv
    python benchmarks/cpu_1b.py --model shape-llava-interleave-qwen-0.5b --budget 182 \
        --results benchmarks/results/cpu_interleave_qwen_0.5b     # Qwen2 + SigLIP geometry

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
MODEL = "shape-llava-1b"
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL,
                   help="shape model to build (feather_export.models.shapes.SHAPE_MODELS)")
    p.add_argument("--methods", default="feather",
                   help="pruning methods to compare with none (feather,fastv,fastervlm)")
    p.add_argument("--weights", default="float",
                   help="weight formats of the `none` artifact, e.g. float,int8,int4 (the float "
                        "one is the reference; pruned methods use float)")
    p.add_argument("--budget", type=int, default=144)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gen-lengths", default="1,8,16")
    p.add_argument("--cache-sweep", default="150,600,1200,2400",
                   help="decode-step probe lengths passed to bench ('' to skip)")
    p.add_argument("--work", default="/tmp/feather-bench-1b", help="where artifacts are built")
    p.add_argument("--results", default=str(REPO / "benchmarks/results/cpu_1b"))
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: ORT's choice)")
    p.add_argument("--ort-config", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to feather-export bench (e.g. session.intra_op.allow_spinning=0)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--keep-artifacts", action="store_true")
    p.add_argument("--reuse-artifacts", action="store_true",
                   help="skip the export when --work already holds complete artifacts")
    return p.parse_args(argv)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _artifact_gib(model: str, weights: str = "float") -> float:
    from feather_export.bench.perf_model import WeightFormat, shape_from_config, span_cost
    from feather_export.models.shapes import shape_llava_config

    shape = shape_from_config(shape_llava_config(model))
    llm = shape.llm
    decoder = span_cost(llm, llm.layers, 0, 0, True, 4, weights=WeightFormat(weights)).bytes
    return (decoder + llm.vocab * llm.hidden * 4 + shape.vision.params() * 4) / GIB


def check_resources(model: str, work: Path, to_export: int, loaded: int,
                    size: float | None = None) -> None:
    """Disk for the artifacts still to export; memory for all of them loaded side by side
    (``size``: the mean GiB of one artifact; default fp32)."""
    from feather_runtime import FeatherError

    size = size or _artifact_gib(model)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / GIB
    if free < size * to_export * 1.1 + 2:
        raise FeatherError(f"{work} has {free:.1f} GiB free; {to_export} fp32 artifacts need "
                           f"about {size * to_export:.1f} GiB: use --work on a larger disk")
    avail = _mem_available_gib()
    if avail is not None and avail < size * loaded * 1.25 + 2:
        raise FeatherError(f"{loaded} artifacts loaded side by side need about "
                           f"{size * loaded * 1.25:.0f} GiB of memory; {avail:.1f} GiB is "
                           "available: compare fewer --methods")


def _mem_available_gib():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        return None
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    from feather_export.cli.bench import add_bench_parser
    from feather_export.export.artifact import ExportOptions
    from feather_export.export.shapes import export_shape_artifacts
    from feather_runtime import FeatherError

    t_start = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    work, results = Path(args.work), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    max_gen = max(int(g) for g in args.gen_lengths.split(","))
    try:
        jobs = [(work / "none", ExportOptions(method="none", max_text_tokens=64,
                                              max_new_tokens=max_gen))]
        formats = [w.strip() for w in args.weights.split(",") if w.strip() not in ("", "float")]
        jobs += [(work / f"none-{w}", ExportOptions(method="none", max_text_tokens=64,
                                                    max_new_tokens=max_gen, weights=w))
                 for w in formats]
        jobs += [(work / f"{m}{args.budget}",
                  ExportOptions(method=m, budget=args.budget, max_text_tokens=64,
                                max_new_tokens=max_gen)) for m in methods]
        t0 = time.perf_counter()
        todo = [(out, opts) for out, opts in jobs
                if not (args.reuse_artifacts and (out / "feather.json").is_file())]
        if len(todo) < len(jobs):
            say(f"reusing {len(jobs) - len(todo)} artifact(s) in {work}")
        sizes = [_artifact_gib(args.model, o.weights) for _, o in jobs]
        check_resources(args.model, work, len(todo), len(jobs), sum(sizes) / len(sizes))
        if todo:
            export_shape_artifacts(args.model, todo, progress=say)
        paths = [out for out, _ in jobs]
        export_s = time.perf_counter() - t0
        gc.collect()
        bench_argv = ["bench", *map(str, paths), "--repeats", str(args.repeats),
                      "--warmup", str(args.warmup), "--gen-lengths", args.gen_lengths,
                      "--json", str(results / "bench.json"), "--plot", str(results),
                      "--no-verify"] + (["--threads", str(args.threads)] if args.threads else [])
        if args.cache_sweep:
            bench_argv += ["--cache-sweep", args.cache_sweep]
        for entry in args.ort_config:
            bench_argv += ["--ort-config", entry]
        parser = argparse.ArgumentParser(prog="feather-export")
        add_bench_parser(parser.add_subparsers(dest="command"))
        bench_args = parser.parse_args(bench_argv)
        t0 = time.perf_counter()
        bench_args.func(bench_args)
        bench_s = time.perf_counter() - t0
        report = json.loads((results / "bench.json").read_text())
        profiles = {}
        if not args.no_profile:
            profiles = run_profiles(paths, report, results / "profile")
        headline = _headline(report, results, profiles)
        wall = time.perf_counter() - t_start
        (results / "COMMAND.txt").write_text(
            "# made by (from the repository root, venv active):\n"
            f"python benchmarks/cpu_1b.py {shlex.join(argv if argv is not None else sys.argv[1:])}\n"
            f"# which ran: feather-export {shlex.join(bench_argv)}\n"
            f"# on {report['machine']['cpu']} ({report['machine']['logical_cpus']} CPUs, "
            f"{report['machine']['memory_gib']} GiB), {report['created']}\n"
            f"# wall time: export {export_s:.0f} s, bench {bench_s:.0f} s, total {wall:.0f} s\n")
    except FeatherError as exc:
        print(f"cpu_1b: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep_artifacts and work.exists():
            shutil.rmtree(work, ignore_errors=True)
            say(f"removed {work}")
    print(json.dumps(headline))
    return 0


def run_profiles(paths, report, out_dir: Path) -> dict:
    """One profiled prefill per artifact, one at a time (each holds its weights in memory)."""
    import numpy as np

    from feather_export.bench.profile import format_profile, profile_prefill
    from feather_runtime.prompt import PromptBuilder

    size = report["shape"]["vision"]["image_size"]
    pixels = np.random.default_rng(report["options"]["seed"]).standard_normal(
        (1, 3, size, size), dtype=np.float32)
    ids = PromptBuilder.from_dir(Path(paths[0]) / "tokenizer").build(
        report["options"]["prompt"], (report["shape"]["vision"]["image_size"]
                                      // report["shape"]["vision"]["patch_size"]) ** 2)
    out = {}
    for path, target in zip(paths, report["targets"]):
        say(f"profiling one prefill of {target['label']}")
        summary = profile_prefill(path, out_dir / target["label"].replace("/", "_"), pixels, ids,
                                  threads=report["options"].get("threads"))
        say(format_profile(summary))
        out[target["label"]] = summary
        gc.collect()
    return out


def _headline(report: dict, results: Path, profiles: dict) -> dict:
    from feather_export.bench.run import headline_line

    head = headline_line(report, str(results / "bench.json"))
    if profiles:
        head["profile"] = str(results / "profile")
    return head


if __name__ == "__main__":
    sys.exit(main())
