"""``feather-export eval --data FILE.jsonl``: every configuration on a user's own data.

The same configurations as the shapes task (``none``, method x budget, ``--schedule``), through the
exported ONNX artifacts and/or the PyTorch reference; scored by exact and contains match
(``userdata.py``), with latency per item (wall time per answer; ONNX: also the median TTFT).
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

DATA_MAX_NEW_TOKENS = 16              # --max-new-tokens default with --data
TEXT_TOKEN_MARGIN = 8                 # prompt bound of the exported artifacts: longest prompt + this


def evaluate_data(opts, say: Callable[[str], None], command: str | None) -> dict:
    """Run every configuration on ``opts.data``; write results.json and table.txt under ``opts.out``."""
    from feather_runtime.prompt import PromptBuilder

    from feather_export.models.checkpoint import check_checkpoint_dir, checkpoint_path, load_config
    from feather_export.models.geometry import geometry_of
    from feather_export.quality.evaluate import default_budgets, plan_configs
    from feather_export.quality.userdata import load_data

    items = load_data(opts.data)[: opts.n]                   # checked before any model work
    model_dir = check_checkpoint_dir(checkpoint_path(opts.model))
    config = load_config(model_dir)
    geometry = geometry_of(config)
    budgets = opts.budgets or default_budgets(geometry.num_image_tokens)
    configs = plan_configs(opts.methods, budgets, geometry, opts.schedules)
    builder = PromptBuilder.from_dir(model_dir)
    text_tokens = [builder.build(item.question, 1).shape[1] - 1 for item in items]
    opts = replace(opts, max_text_tokens=max(opts.max_text_tokens, max(text_tokens) + TEXT_TOKEN_MARGIN))
    out = Path(opts.out) if opts.out else None
    say(f"eval: {len(items)} items of {opts.data} x {len(configs)} configurations "
        f"({', '.join(c.name for c in configs)}) on {', '.join(opts.engines)}")
    t_start = time.perf_counter()
    rows = _run(opts, model_dir, configs, items, geometry, config.text_config,
                round(float(np.mean(text_tokens))), say)
    results = {
        "model": str(model_dir.resolve()),
        "task": f"user data {Path(opts.data).resolve()}",
        "data": str(Path(opts.data).resolve()), "n": len(items),
        "num_image_tokens": geometry.num_image_tokens, "num_layers": geometry.num_layers,
        "budgets": list(budgets), "schedules": [f"{m}={sch}" for m, sch in opts.schedules],
        "engines": list(opts.engines), "max_new_tokens": opts.max_new_tokens,
        "scoring": "normalised (lower case, whitespace collapsed, trailing full stop dropped); "
                   "exact: equals one answer; contains: one answer occurs in the prediction",
        "configs": rows, "wall_time_s": round(time.perf_counter() - t_start, 1),
        "command": command,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "table.txt").write_text(format_data_table(results) + "\n")
        say(f"wrote {out / 'results.json'}, {out / 'table.txt'}")
    return results


def _run(opts, model_dir, configs, items, geometry, text_config, mean_text, say) -> list[dict]:
    from feather_export.quality.evaluate import (ReferenceEngine, _cost, _torch_threads,
                                                 run_onnx)

    reference = ReferenceEngine(model_dir) if "reference" in opts.engines else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="feather-eval-data-") as work, \
            _torch_threads(opts.threads if reference is not None else 0):
        for config in configs:
            runs, ttft = {}, []
            if "onnx" in opts.engines:
                runs["onnx"] = run_onnx(model_dir, config, items, Path(work), opts,
                                        lambda item, image, res, pipe: ttft.append(res.timings["ttft"]))
            if reference is not None:
                runs["reference"] = reference.run(config, items, opts.max_new_tokens)
            row = {"method": config.method, "budget": config.budget, "schedule": config.schedule,
                   "name": config.name, **_cost(config, geometry, text_config, mean_text),
                   "engines": {e: _score(items, run, ttft if e == "onnx" else None)
                               for e, run in runs.items()}}
            if len(runs) == 2:
                a, b = runs["onnx"].predictions, runs["reference"].predictions
                row["onnx_reference_agreement"] = {
                    "token_ids": float(np.mean([x.token_ids == y.token_ids for x, y in zip(a, b)])),
                    "kept": float(np.mean([x.kept == y.kept for x, y in zip(a, b)]))}
            rows.append(row)
            say("  " + _line(row))
    return rows


def _score(items, run, ttft) -> dict:
    from feather_export.quality.userdata import contains_match, exact_match

    exact = [exact_match(p.text, i.answers) for i, p in zip(items, run.predictions)]
    contains = [contains_match(p.text, i.answers) for i, p in zip(items, run.predictions)]
    out = {"exact_match": float(np.mean(exact)), "contains_match": float(np.mean(contains)),
           "n": len(items), "seconds": round(run.seconds, 3),
           "latency_ms_per_item": round(1e3 * run.seconds / len(items), 2),
           "predictions": [{"line": i.line, "prediction": p.text, "exact": e, "contains": c}
                           for i, p, e, c in zip(items, run.predictions, exact, contains)]}
    if ttft:
        out["ttft_ms_median"] = round(1e3 * float(np.median(ttft)), 2)
    return out


def _line(row: dict) -> str:
    parts = [f"{e} exact {100 * r['exact_match']:.1f}% contains {100 * r['contains_match']:.1f}% "
             f"({r['latency_ms_per_item']:.0f} ms/item)" for e, r in row["engines"].items()]
    return f"{row['name']:<24} " + ", ".join(parts)


def format_data_table(results: dict) -> str:
    """The terminal table for --data: exact / contains match (%) and latency per configuration."""
    head = (f"{'config':<24} {'engine':<9} {'exact':>6} {'contains':>8} {'ms/item':>8} "
            f"{'TTFT ms':>8} {'rel. FLOPs':>10}")
    lines = [f"{results['n']} items of {results['data']}; {results['num_image_tokens']} image tokens",
             head, "-" * len(head)]
    for row in results["configs"]:
        for engine, r in row["engines"].items():
            ttft = r.get("ttft_ms_median")
            lines.append(f"{row['name']:<24} {engine:<9} {100 * r['exact_match']:6.1f} "
                         f"{100 * r['contains_match']:8.1f} {r['latency_ms_per_item']:8.1f} "
                         f"{'-' if ttft is None else f'{ttft:.1f}':>8} "
                         f"{row['relative_prefill_flops']:10.3f}")
    lines.append("exact: the answer normalised equals a reference; contains: a reference occurs in it; "
                 "ms/item: wall time per answer (generation included); TTFT: ONNX median")
    return "\n".join(lines)
