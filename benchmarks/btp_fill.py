#!/usr/bin/env python
"""BTP's greedy fill as an ONNX ``Loop`` vs unrolled: the select segments of a BTP schedule timed
side by side in ONNX Runtime CPU (default: shape-llava-1b's default schedule, 576 image tokens,
hidden 2048).

    python benchmarks/btp_fill.py [--repeats 30] [--threads 1] [--results benchmarks/results/btp_fill]
    python benchmarks/btp_fill.py --model tiny-shapes --schedule 1:136 --results .../btp_fill_tiny

Builds each select graph both ways from the exporter's own builder (only the model config is
needed: the select segments hold no weights), feeds the same random span outputs, checks that both
give identical outputs, and times them interleaved. Writes results.json; the last line printed is
one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    import onnxruntime as ort

    from feather_export.methods.config import PruneConfig
    from feather_export.models.geometry import geometry_of
    from feather_export.models.checkpoint import load_config
    from feather_export.onnx.select import build_btp_select, score_input_names

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0: ORT's choice)")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--results", default=str(REPO / "benchmarks/results/btp_fill"))
    p.add_argument("--model", default="shape-llava-1b", help="built-in name or checkpoint directory")
    p.add_argument("--schedule", help="BTP schedule (default: BTP's default for the model)")
    args = p.parse_args(argv)

    config = load_config(args.model)
    text = config.text_config
    holder = SimpleNamespace(config=SimpleNamespace(text_config=text))
    geo = geometry_of(config)
    prune = PruneConfig.create("btp", geo, schedule=args.schedule)
    heads = text.num_attention_heads
    hd = getattr(text, "head_dim", None) or text.hidden_size // heads
    rng = np.random.default_rng(0)
    start = 5
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rows = []
    for stage in prune.stages:
        if stage.keep == 0:
            continue
        seq = stage.num_in + args.text_tokens
        query_name, keys_name = score_input_names(stage)
        feeds = {query_name: rng.standard_normal((1, 1, heads, hd)).astype(np.float32),
                 keys_name: rng.standard_normal((1, text.num_key_value_heads, seq, hd)).astype(np.float32),
                 "hidden_states": rng.standard_normal((1, seq, text.hidden_size)).astype(np.float32),
                 "position_ids": np.arange(seq, dtype=np.int64)[None],
                 "image_start": np.asarray(start, np.int64)}
        sessions, sizes, build_s = {}, {}, {}
        for fill in ("loop", "unrolled"):
            t = time.perf_counter()
            model = build_btp_select(holder, stage, geo.grid_side, 1, fill=fill)
            blob = model.SerializeToString()
            sessions[fill] = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
            build_s[fill] = time.perf_counter() - t
            sizes[fill] = len(blob)
        outs = {f: s.run(None, feeds) for f, s in sessions.items()}
        same = all(np.array_equal(a, b) for a, b in zip(outs["loop"], outs["unrolled"]))
        times = {f: [] for f in sessions}
        for r in range(args.repeats):
            for f in (("loop", "unrolled") if r % 2 == 0 else ("unrolled", "loop")):
                t = time.perf_counter()
                sessions[f].run(None, feeds)
                times[f].append(time.perf_counter() - t)
        row = {"stage": f"select_{stage.layer}", "num_in": stage.num_in, "keep": stage.keep,
               "attention_count": stage.attention_count, "fill_steps": stage.keep - stage.attention_count,
               "identical_outputs": same,
               "median_ms": {f: round(1e3 * float(np.median(v)), 3) for f, v in times.items()},
               "p10_p90_ms": {f: [round(1e3 * float(np.percentile(v, q)), 3) for q in (10, 90)]
                              for f, v in times.items()},
               "graph_bytes": sizes, "build_and_load_s": {f: round(v, 2) for f, v in build_s.items()}}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"model": args.model, "schedule": [(s.layer, s.keep) for s in prune.stages],
              "threads": args.threads, "repeats": args.repeats, "text_tokens": args.text_tokens,
              "onnxruntime": ort.__version__, "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
              "note": "shared 2-core machine (several sessions running); loop and unrolled are "
                      "interleaved in one process so load hits both alike",
              "command": "python benchmarks/btp_fill.py " + " ".join(map(shlex.quote, sys.argv[1:])),
              "stages": rows}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({r["stage"]: r["median_ms"] for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
