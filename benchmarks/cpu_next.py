#!/usr/bin/env python
"""CPU TTFT on the LLaVA-NeXT geometry at 672x672 (2,928 image tokens): none vs FEATHER and
FasterVLM at budgets keeping about 25 % and 5 % of the image tokens, next to the FLOPs prediction.

Builds ``shape-llava-next-cpu`` once in-process (deterministic random weights: the real NeXT token
plan, CLIP 336/14 crops x 5 and 48 newlines, with a small tower and decoder so a prefill takes
seconds on a 2-core CPU), exports every configuration, then measures prefill (TTFT: vision ->
... -> first logits) through the runtime on ONNX Runtime CPU, one artifact loaded at a time in
alternating rounds. Also records the select segments' share of the prefill.

    python benchmarks/cpu_next.py --results benchmarks/results/cpu_next_672
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
MODEL = "shape-llava-next-cpu"
# (label, method, budget): FEATHER's budget is its first stage; FasterVLM's is patches over the
# 5 crops (a multiple of 5), and it also keeps the 48 newlines
CONFIGS = (("none", "none", None),
           ("feather@732", "feather", 732), ("fastervlm@685", "fastervlm", 685),
           ("feather@146", "feather", 146), ("fastervlm@100", "fastervlm", 100))


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds over the configs (2)")
    p.add_argument("--repeats", type=int, default=2, help="timed prefills per round (2)")
    p.add_argument("--work", default="/tmp/feather-bench-next")
    p.add_argument("--results", default=str(REPO / "benchmarks/results/cpu_next_672"))
    p.add_argument("--note", default="", help="free text recorded in the JSON (machine state)")
    p.add_argument("--keep-artifacts", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import numpy as np

    from feather_export.bench.perf_model import prefill_costs, shape_from_config, total
    from feather_export.export.artifact import ExportOptions
    from feather_export.export.shapes import export_shape_artifacts
    from feather_export.models.geometry import geometry_of
    from feather_export.models.shapes import shape_llava_config
    from feather_export.models.tokenizer import build_tiny_tokenizer
    from feather_runtime.prompt import PromptBuilder
    from prefill_rounds import measure_prefills, run_fields

    args = parse_args(argv)
    work, results = Path(args.work), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = shape_llava_config(MODEL)
    geo = geometry_of(config)
    jobs = [(work / label.replace("@", "_"),
             ExportOptions(method=method, budget=budget, max_text_tokens=32, max_new_tokens=1))
            for label, method, budget in CONFIGS]
    report = None
    try:
        t0 = time.perf_counter()
        export_shape_artifacts(MODEL, jobs, progress=say)
        export_s = time.perf_counter() - t0
        gc.collect()
        n = geo.num_image_tokens
        ids = PromptBuilder(build_tiny_tokenizer()).build("Describe the image.", n)
        crop = config.vision_config.image_size
        pixels = np.random.default_rng(0).standard_normal((1, len(geo.crops()), 3, crop, crop),
                                                          dtype=np.float32)
        measured = measure_prefills({label: path for (label, _, _), (path, _) in zip(CONFIGS, jobs)},
                                    pixels, ids, args.rounds, args.repeats, say)
        ttft = {label: m["ttft"] for label, m in measured.items()}
        selection = {label: m["selection"] for label, m in measured.items()}
        kept = {label: m["kept"] for label, m in measured.items()}
        prunes = {label: m["prune"] for label, m in measured.items()}
        shape = shape_from_config(config)
        text_tokens = int(ids.shape[1]) - n
        rows = {}
        none_flops = total(prefill_costs(shape, None, text_tokens, "fp32")).flops
        none_ttft = statistics.median(ttft["none"])
        for label, method, budget in CONFIGS:
            prune = prunes[label] if method != "none" else None
            flops = total(prefill_costs(shape, prune, text_tokens, "fp32")).flops
            med = statistics.median(ttft[label])
            sel = statistics.median(selection[label])
            rows[label] = {
                "method": method, "budget": budget, "kept_per_stage": kept[label],
                "kept_fraction_first_stage": (kept[label][0] / n) if kept[label] else 1.0,
                "ttft_s": {"median": med, "all": ttft[label]},
                "selection_s": {"median": sel, "all": selection[label]},
                "selection_share_of_prefill": sel / med,
                "prefill_flops": flops,
                "speedup_measured": none_ttft / med,
                "speedup_predicted_flops": none_flops / flops,
            }
        report = {
            "model": MODEL, "resolution": "672x672", "image_tokens": n,
            "crops": len(geo.crops()), "newlines": len(geo.free_indices()),
            "backend": "onnxruntime-cpu", "dtype": "fp32", "prompt_tokens": int(ids.shape[1]),
            "configs": rows,
            "method": f"one artifact loaded at a time; {args.rounds} rounds over all configs of 1 "
                      f"warm-up + {args.repeats} timed prefills each; TTFT and selection from "
                      "Pipeline timings",
            **run_fields("cpu_next.py", argv, args.note, export_s, started),
        }
        (results / "ttft.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if not args.keep_artifacts and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: {m: round(v[m], 3) for m in ("speedup_measured", "speedup_predicted_flops",
                                                       "selection_share_of_prefill")}
                      for k, v in report["configs"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
