#!/usr/bin/env python
"""Decode-step variants of the OpenVINO backend, side by side: time per step and memory.

Variants (each in its own process, the order alternating over rounds):
- ``bf16-values``: the backend as shipped (value caches in bfloat16);
- ``fp32-values``: value caches in the artifact's dtype (the backend before the bf16 value cache);
- ``static-decode``: a second compiled model per decoder span with static shapes for decode steps
  (one token, the span's cache capacity), prefill on the dynamic one: the plugin's per-call work
  for dynamic shapes gone, at the price of a second copy of the packed weights.

Each process loads the artifact, runs one warm-up generation, then --repeats generations of
--steps decode steps; it reports the median milliseconds per decode step, its resident memory after
them (VmRSS) and its peak (VmHWM).

    python benchmarks/openvino_decode.py                     # shape-llava-1b, int8 weights, ~4 min
    python benchmarks/openvino_decode.py --artifact none --results benchmarks/results/openvino_decode_1b_fp32

The artifact is made by benchmarks/peers (kept in --work between runs).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
VARIANTS = ("bf16-values", "fp32-values", "static-decode")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default="none-int8",
                   help="one of benchmarks/peers' artifacts in --work (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="default: 2")
    p.add_argument("--repeats", type=int, default=3, help="generations per process (default: 3)")
    p.add_argument("--steps", type=int, default=15, help="decode steps per generation (default: 15)")
    p.add_argument("--work", type=Path, default=Path("/work/peerwork"))
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/results/openvino_decode_1b_int8")
    p.add_argument("--note", default="")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)   # child process
    return p.parse_args(argv)


def _memory_gib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 2 ** 20, 2)
    return out


def _static_decode(pipe, backend) -> None:
    """Give every decoder span a static-shape model for decode steps (prefill stays dynamic)."""
    from openvino_segments import PhaseRunner

    from feather_runtime.backends.openvino import (OpenVinoRunner, _value_cache_in_bf16,
                                                   compile_config)

    for step in pipe.steps:
        seg = pipe.manifest.segment(step.span)
        model = backend.core.read_model(str(pipe.manifest.root / seg.file))
        shapes = {}
        for spec in seg.inputs:
            name = spec["name"]
            if name == "inputs_embeds":
                shapes[name] = [1, 1, spec["shape"][2]]
            elif name == "position_ids":
                shapes[name] = [1, 1]
            elif name == "past_length":
                shapes[name] = []
            else:                                     # past_key_values.*: the whole buffer
                shapes[name] = [1, spec["shape"][1], step.cache.capacity, spec["shape"][3]]
        model.reshape(shapes)
        if backend.value_cache_dtype is not None:
            model = _value_cache_in_bf16(model)
        compiled = backend.core.compile_model(model, "CPU", compile_config(backend.precision))
        decode = OpenVinoRunner(seg.name, compiled, backend.memory, [o["name"] for o in seg.outputs])
        pipe.runners[step.span] = PhaseRunner(pipe.runners[step.span], decode)


def child(args) -> int:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE / "peers"))
    import peers

    from feather_runtime import Pipeline
    from feather_runtime.backends.openvino import OpenVinoBackend
    from feather_runtime.manifest import load_manifest

    backend = OpenVinoBackend("bf16")
    if args.variant == "fp32-values":
        backend.value_cache_dtype = None
    manifest = load_manifest(args.work / args.artifact, verify=False)
    runners = {s.name: backend.load(manifest.root, s) for s in manifest.segments}
    with Pipeline(manifest, backend, runners, owns_backend=True) as pipe:
        if args.variant == "static-decode":
            _static_decode(pipe, backend)
        pixels, ids = pipe.encode(str(args.work / "image.png"), peers.PROMPT)
        pipe.generate_ids(pixels, ids, 2, ignore_eos=True)                      # warm-up
        per_step = [1e3 / pipe.generate_ids(pixels, ids, args.steps + 1, ignore_eos=True)
                    .timings["decode_tokens_per_s"] for _ in range(args.repeats)]
        memory = _memory_gib()
    print(json.dumps({"variant": args.variant, "ms_per_step": per_step, **memory}))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        return child(args)
    sys.path.insert(0, str(HERE / "peers"))
    import peers

    peers.prepare(args.work, 144, 16, [], "", need_ours=(args.artifact,))
    runs = []
    for rnd in range(args.rounds):
        for variant in (VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]):
            print(f"round {rnd + 1}/{args.rounds}: {variant}", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--variant", variant, "--artifact", args.artifact,
                   "--work", str(args.work), "--repeats", str(args.repeats),
                   "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
            runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "round": rnd,
                         "loadavg": peers.loadavg()})
    summary = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {
            "ms_per_step": round(statistics.median(x for r in mine for x in r["ms_per_step"]), 2),
            "ms_per_step_each_round": [round(statistics.median(r["ms_per_step"]), 2) for r in mine],
            "rss_gib": max(r["VmRSS"] for r in mine), "peak_gib": max(r["VmHWM"] for r in mine)}
    record = {"command": "python " + shlex.join([sys.argv[0], *sys.argv[1:]]),
              "artifact": args.artifact, "steps": args.steps, "repeats": args.repeats,
              "machine": peers.cpu_flags(), "note": args.note, "summary": summary, "runs": runs}
    rows = ["| variant | ms per decode step (median; per round) | resident after / peak GiB |",
            "|---|---|---|"]
    for variant, s in summary.items():
        rows.append(f"| {variant} | {s['ms_per_step']} ({', '.join(map(str, s['ms_per_step_each_round']))}) "
                    f"| {s['rss_gib']} / {s['peak_gib']} |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "decode.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.results / "table.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
