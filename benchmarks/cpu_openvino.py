#!/usr/bin/env python
"""Our artifacts on ONNX Runtime CPU vs the OpenVINO backend (bf16 / f32), side by side.

Exports `none` and FEATHER@BUDGET of a shape model (streamed; kept in --work between runs), then
runs rounds in which every (backend, artifact) pair is loaded, warmed up once and measured
--repeats times (same image, same 593-token-class prompt, --new-tokens greedy tokens past EOS),
one pipeline in memory at a time, the order rotating per round. Records TTFT, per-segment prefill
times, decode tokens/s, whether each run's tokens equal ONNX Runtime's, the CPU's flags and load.

    python benchmarks/cpu_openvino.py                       # shape-llava-1b, ~20 min on 2 cores
    python benchmarks/cpu_openvino.py --model tiny --rounds 1 --repeats 1   # smoke run

Needs OpenVINO in the same environment (pip install 'feather-export[openvino]').
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("onnxruntime-cpu", "openvino-bf16", "openvino-f32")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shape-llava-1b")
    p.add_argument("--budget", type=int, default=144)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--work", type=Path, default=REPO / ".cpu_openvino")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/results/cpu_openvino_1b")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def cpu_flags() -> dict:
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(),
            **{f: f in flags for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                       "amx_int8")}}


def export_artifacts(args) -> dict:
    from feather_export.export.artifact import ExportOptions
    from feather_export.export.shapes import export_shape_artifacts
    from feather_export.models.shapes import SHAPE_MODELS

    paths = {"none": args.work / "none", f"feather{args.budget}": args.work / f"feather{args.budget}"}
    todo = [(paths[k], ExportOptions(method="none" if k == "none" else "feather",
                                     budget=None if k == "none" else args.budget,
                                     max_text_tokens=64, max_new_tokens=args.new_tokens))
            for k in paths if not (paths[k] / "feather.json").is_file()]
    if todo:
        if args.model in SHAPE_MODELS:
            export_shape_artifacts(args.model, todo)
        else:
            from feather_export.export.artifact import export
            for out, options in todo:
                export(args.model, out, options)
    return paths


def measure(backend: str, artifact: Path, args) -> dict:
    import numpy as np
    from feather_runtime import Pipeline
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))
    t = time.perf_counter()
    pipe = Pipeline.load(artifact, backend=backend)
    load_s = time.perf_counter() - t
    kwargs = dict(image=image, prompt="Describe the image in detail.",
                  max_new_tokens=args.new_tokens, ignore_eos=True)
    pipe.generate(**kwargs)                                          # warm-up
    runs = []
    for _ in range(args.repeats):
        res = pipe.generate(**kwargs)
        runs.append({"ttft_s": res.timings["ttft"],
                     "decode_tokens_per_s": res.timings["decode_tokens_per_s"],
                     "segments_s": {k: v for k, v in res.timings.items()
                                    if k not in ("ttft", "decode", "decode_tokens_per_s")},
                     "token_ids": res.token_ids, "load_average": os.getloadavg()[0]})
    pipe.close()
    return {"load_s": load_s, "runs": runs}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    paths = export_artifacts(args)
    backends = args.backends.split(",")
    pairs = [(b, k) for k in paths for b in backends]
    samples: dict = {f"{b}/{k}": [] for b, k in pairs}
    for r in range(args.rounds):
        order = pairs[r % len(pairs):] + pairs[:r % len(pairs)]
        for backend, key in order:
            print(f"round {r + 1}: {backend} {key}", file=sys.stderr, flush=True)
            samples[f"{backend}/{key}"].append(measure(backend, paths[key], args))
    summary = {}
    for name, blocks in samples.items():
        runs = [run for block in blocks for run in block["runs"]]
        backend, key = name.split("/")
        reference = [run["token_ids"] for block in samples[f"onnxruntime-cpu/{key}"]
                     for run in block["runs"]] if f"onnxruntime-cpu/{key}" in samples else []
        summary[name] = {
            "ttft_s": statistics.median(run["ttft_s"] for run in runs),
            "ttft_range_s": [min(run["ttft_s"] for run in runs), max(run["ttft_s"] for run in runs)],
            "decode_tokens_per_s": statistics.median(run["decode_tokens_per_s"] for run in runs),
            "segments_s": {seg: statistics.median(run["segments_s"].get(seg, 0.0) for run in runs)
                           for seg in runs[0]["segments_s"]},
            "tokens_equal_onnxruntime": (None if not reference else
                                         all(run["token_ids"] == reference[0] for run in runs)),
            "tokens": runs[0]["token_ids"],
        }
    report = {"command": shlex.join(["python", "benchmarks/cpu_openvino.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "model": args.model, "budget": args.budget, "new_tokens": args.new_tokens,
              "machine": cpu_flags(), "note": args.note, "summary": summary, "samples": samples}
    (args.results / "cpu_openvino.json").write_text(json.dumps(report, indent=1) + "\n")
    for name, s in summary.items():
        print(f"{name:<34} TTFT {s['ttft_s']:7.2f} s  decode {s['decode_tokens_per_s']:6.2f} tok/s"
              f"  tokens = ORT: {s['tokens_equal_onnxruntime']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
