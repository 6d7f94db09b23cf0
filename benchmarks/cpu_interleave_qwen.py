#!/usr/bin/env python
"""CPU TTFT, none vs FEATHER, on the llava-interleave-qwen-0.5b geometry (Qwen2 + SigLIP, fp32).

Builds ``shape-llava-interleave-qwen-0.5b`` once in-process (deterministic random weights, real
geometry: SigLIP-so400m 26 layers on 729 image tokens, Qwen1.5-0.5B 24 layers), exports ``none``
and ``feather`` at --budget, then measures prefill (TTFT: vision -> ... -> first logits) through
the runtime on ONNX Runtime CPU. Each fp32 artifact holds ~3.8 GiB of weights, so on a small
shared machine only ONE artifact is loaded at a time: rounds alternate none / feather (load, warm
up, time --repeats prefills, close), and the ratio is taken from the medians over all rounds.
The docs/design.md §5 FLOPs prediction of both prefills is written next to the measurement.

    python benchmarks/cpu_interleave_qwen.py --results benchmarks/results/cpu_interleave_qwen_0.5b
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "shape-llava-interleave-qwen-0.5b"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int, default=182, help="FEATHER stage-1 budget (default 182 "
                   "= 25%% of 729)")
    p.add_argument("--rounds", type=int, default=2, help="alternating none/feather rounds (2)")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per round (3)")
    p.add_argument("--work", default="/tmp/feather-bench-interleave-qwen")
    p.add_argument("--results", default=str(REPO / "benchmarks/results/cpu_interleave_qwen_0.5b"))
    p.add_argument("--note", default="", help="free text recorded in the JSON (machine state)")
    p.add_argument("--keep-artifacts", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import numpy as np

    from feather_export.bench.perf_model import prefill_costs, shape_from_config, total
    from feather_export.export.artifact import ExportOptions
    from feather_export.export.shapes import export_shape_artifacts
    from feather_export.models.shapes import shape_llava_config
    from feather_export.models.tokenizer import build_tiny_tokenizer
    from feather_runtime.prompt import PromptBuilder
    from prefill_rounds import measure_prefills, run_fields

    args = parse_args(argv)
    work, results = Path(args.work), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [(work / "none", ExportOptions(method="none", max_text_tokens=64, max_new_tokens=1)),
            (work / f"feather{args.budget}", ExportOptions(method="feather", budget=args.budget,
                                                            max_text_tokens=64, max_new_tokens=1))]
    try:
        t0 = time.perf_counter()
        export_shape_artifacts(MODEL, jobs, progress=say)
        export_s = time.perf_counter() - t0
        gc.collect()
        config = shape_llava_config(MODEL)
        side = config.vision_config.image_size // config.vision_config.patch_size
        n = side * side
        prompt = "Describe the image."
        ids = PromptBuilder(build_tiny_tokenizer()).build(prompt, n)
        size = config.vision_config.image_size
        pixels = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
        measured = measure_prefills({label: path for label, (path, _) in
                                     zip(("none", "feather"), jobs)},
                                    pixels, ids, args.rounds, args.repeats, say)
        times = {label: m["ttft"] for label, m in measured.items()}
        kept, prune = measured["feather"]["kept"], measured["feather"]["prune"]
        shape = shape_from_config(config)
        text_tokens = int(ids.shape[1]) - n
        flops = {"none": total(prefill_costs(shape, None, text_tokens, "fp32")).flops,
                 "feather": total(prefill_costs(shape, prune, text_tokens, "fp32")).flops}
        med = {k: statistics.median(v) for k, v in times.items()}
        report = {
            "model": MODEL, "backend": "onnxruntime-cpu", "dtype": "fp32",
            "prompt_tokens": int(ids.shape[1]), "image_tokens": n, "budget": args.budget,
            "feather_kept_per_stage": kept, "schedule": prune.to_dict(),
            "ttft_s": {k: {"median": med[k], "all": v} for k, v in times.items()},
            "ttft_speedup_measured": med["none"] / med["feather"],
            "prefill_flops": flops,
            "ttft_speedup_predicted_flops": flops["none"] / flops["feather"],
            "measured_over_predicted": (med["none"] / med["feather"])
            / (flops["none"] / flops["feather"]),
            "method": f"one artifact loaded at a time; {args.rounds} alternating rounds of 1 "
                      f"warm-up + {args.repeats} timed prefills each; TTFT from Pipeline timings",
            **run_fields("cpu_interleave_qwen.py", argv, args.note, export_s, started),
        }
        (results / "ttft.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if not args.keep_artifacts and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: report[k] for k in ("ttft_speedup_measured",
                                             "ttft_speedup_predicted_flops",
                                             "measured_over_predicted")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
