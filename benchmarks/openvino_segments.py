#!/usr/bin/env python
"""Where the gap to OpenVINO GenAI goes: the same model's parts on the same OpenVINO CPU plugin.

Both sides run in this process on the OpenVINO runtime the project installs, one after the other,
with the same compile settings (``feather_runtime.backends.openvino.compile_config``: inference
precision, latency mode, threads) and the CPU plugin's per-node profiler on:

- ours: the ``none`` artifact through ``feather_runtime`` (the OpenVINO backend), as ``run`` does;
- theirs: the OpenVINO IR that optimum-intel exports for OpenVINO GenAI (the files its
  ``VLMPipeline`` loads): the vision-embeddings model and the stateful language model, fed the same
  pixels and an input of the same length as ours (593 tokens: equal work), then decode steps.

Reported per part (vision, decoder prefill, one decode step): the median wall time over
``--repeats`` runs after a warm-up, and the profiled run's time per CPU-plugin node type
(FullyConnected, ScaledDotProductAttention, MatMul, Subgraph (fused elementwise), ...), so the
difference is read per kind of work. GenAI's pipeline adds its own scheduling (paged attention,
sampling) on top of these parts; its end-to-end TTFT is in benchmarks/peers.

    bash benchmarks/peers/setup_openvino.sh                  # once: the optimum-intel venv
    python benchmarks/openvino_segments.py                   # shape-llava-1b, bf16, ~5 min
    python benchmarks/openvino_segments.py --precision f32 --results benchmarks/results/openvino_segments_1b_f32

The model, artifacts and IR are made by benchmarks/peers (kept in --work between runs).
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks/peers"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--repeats", type=int, default=3, help="measured runs per part (default: 3)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds, alternating which side runs first; medians over rounds "
                        "(default: 2)")
    p.add_argument("--decode-steps", type=int, default=15, help="default: 15")
    p.add_argument("--threads", type=int, help="default: OpenVINO's own")
    p.add_argument("--ir", default="ov-fp32", choices=["ov-fp32", "ov-int8"],
                   help="which optimum-intel export to profile (default: %(default)s)")
    p.add_argument("--artifact", default="none",
                   help="which of our artifacts in --work (default: none)")
    p.add_argument("--work", type=Path, default=Path("/work/peerwork"))
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/results/openvino_segments_1b")
    p.add_argument("--ov-python", default=str(REPO / ".venv-ov/bin/python"))
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def node_ms(request) -> dict:
    """Milliseconds per CPU-plugin node type, as the plugin reports them: each node's average over
    every inference of ``request`` so far (node time only: a first run's setup is not in it)."""
    out = defaultdict(float)
    for info in request.profiling_info:
        if str(info.status).endswith("EXECUTED"):
            out[info.node_type] += info.real_time.total_seconds() * 1e3
    return out


class Phase:
    """One request that runs one phase only (vision, prefill, or decode steps): its profile per
    run, without the first (warm-up) run: ``first()`` after that run, ``per_run(n)`` after n."""

    def __init__(self, request):
        self.request, self.after_first = request, {}

    def first(self):
        self.after_first = node_ms(self.request)

    def per_run(self, runs: int) -> dict:
        now = node_ms(self.request)
        out = {k: (v * runs - self.after_first.get(k, 0.0)) / (runs - 1) for k, v in now.items()}
        return dict(sorted(((k, round(v, 2)) for k, v in out.items() if v >= 0.005),
                           key=lambda kv: -kv[1]))


def node_count(request) -> int:
    return sum(str(i.status).endswith("EXECUTED") for i in request.profiling_info)


def matmul_kernels(request) -> list[str]:
    """The kernels (exec types) the plugin picked for its matrix products (FullyConnected, and
    FullyConnectedCompressed for int8 weights), e.g. brgemm_avx512_bf16."""
    return sorted({f"{i.node_type}: {i.exec_type}" for i in request.profiling_info
                   if i.node_type.startswith("FullyConnected")})


def median(values):
    return round(statistics.median(values), 4)


class PhaseRunner:
    """One decoder span as two compiled models: prefill calls go to one, decode steps to the
    other, so each one's profile is of one phase."""

    def __init__(self, prefill, decode):
        self.name, self.prefill, self.decode = prefill.name, prefill, decode

    def run_device(self, inputs):
        long = inputs["inputs_embeds"].shape[1] > 1
        return (self.prefill if long else self.decode).run_device(inputs)


def measure_ours(artifact: Path, image: Path, prompt: str, precision: str, threads, repeats: int,
                 decode_steps: int) -> dict:
    from feather_runtime import Pipeline
    from feather_runtime.backends.openvino import OpenVinoBackend
    from feather_runtime.manifest import load_manifest

    backend = OpenVinoBackend(precision, threads, config={"PERF_COUNT": True})
    manifest = load_manifest(artifact, verify=False)
    runners = {s.name: backend.load(manifest.root, s) for s in manifest.segments}
    spans = [s for s in manifest.segments if s.kind == "decoder"]
    if len(spans) != 1:
        raise SystemExit("profile an artifact without pruning (one decoder span)")
    span = spans[0].name
    split = PhaseRunner(runners[span], backend.load(manifest.root, spans[0]))
    phases = {"vision": Phase(runners["vision"].request), "prefill": Phase(split.prefill.request),
              "decode_step": Phase(split.decode.request)}
    with Pipeline(manifest, backend, {**runners, span: split}, owns_backend=True) as pipe:
        pixels, ids = pipe.encode(str(image), prompt)
        pipe.generate_ids(pixels, ids, 2, ignore_eos=True)          # warm-up: one run of each
        for phase in phases.values():
            phase.first()
        vision, prefill = [], []
        for _ in range(repeats):
            t = pipe.generate_ids(pixels, ids, 1, ignore_eos=True).timings   # prefill only
            vision.append(t["vision"])
            prefill.append(t[span])
        res = pipe.generate_ids(pixels, ids, decode_steps + 1, ignore_eos=True)
        runs = {"vision": repeats + 2, "prefill": repeats + 2, "decode_step": decode_steps + 1}
        profile = {k: ph.per_run(runs[k]) for k, ph in phases.items()}
        nodes = {k: node_count(ph.request) for k, ph in phases.items()}
        kernels = matmul_kernels(split.decode.request)
    return {"tokens": int(ids.shape[1]), "vision_s": median(vision), "prefill_s": median(prefill),
            "decode_step_ms": round(1e3 / res.timings["decode_tokens_per_s"], 2),
            "profile_ms": profile, "nodes_executed": nodes, "matmul_kernels": kernels,
            "pixels": pixels}


def measure_theirs(ir: Path, pixels, tokens: int, precision: str, threads, repeats: int,
                   decode_steps: int) -> dict:
    """The same sequence on the IR: its vision model, and its stateful language model compiled
    twice (prefill; decode steps, starting from a copy of the prefill's state)."""
    import numpy as np
    import openvino as ov

    from feather_runtime.backends.openvino import compile_config

    core = ov.Core()
    config = {**compile_config(precision, threads), "PERF_COUNT": True}
    vision = core.compile_model(str(ir / "openvino_vision_embeddings_model.xml"), "CPU", config)
    lm_file = str(ir / "openvino_language_model.xml")
    lm = core.compile_model(lm_file, "CPU", config)
    vis, pre = vision.create_infer_request(), lm.create_infer_request()
    dec = core.compile_model(lm_file, "CPU", config).create_infer_request()
    phases = {"vision": Phase(vis), "prefill": Phase(pre), "decode_step": Phase(dec)}
    hidden = lm.input("inputs_embeds").get_partial_shape()[2].get_length()
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, tokens, hidden), dtype=np.float32) * 0.02
    step_embeds = rng.standard_normal((1, 1, hidden), dtype=np.float32) * 0.02
    feed = {vision.input(0).get_any_name(): pixels}

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def prefill():
        pre.reset_state()
        pre.infer({"inputs_embeds": embeds, "attention_mask": np.ones((1, tokens), np.int64),
                   "position_ids": np.arange(tokens, dtype=np.int64)[None],
                   "beam_idx": np.zeros(1, np.int32)})

    def hand_over():
        states = {s.name: s.state for s in pre.query_state()}
        for s in dec.query_state():
            s.state = states[s.name]

    def step(pos):
        dec.infer({"inputs_embeds": step_embeds, "attention_mask": np.ones((1, pos + 1), np.int64),
                   "position_ids": np.asarray([[pos]], np.int64), "beam_idx": np.zeros(1, np.int32)})

    vis.infer(feed)                                                  # warm-up: one run of each
    prefill()
    hand_over()
    step(tokens)
    for phase in phases.values():
        phase.first()
    v_times = [timed(lambda: vis.infer(feed)) for _ in range(repeats)]
    p_times = [timed(prefill) for _ in range(repeats)]
    hand_over()
    step(tokens)                       # the first step after a hand-over converts the state
    t = time.perf_counter()
    for i in range(1, decode_steps + 1):
        step(tokens + i)
    decode = (time.perf_counter() - t) / decode_steps
    runs = {"vision": repeats + 1, "prefill": repeats + 1, "decode_step": decode_steps + 2}
    return {"tokens": tokens, "vision_s": median(v_times), "prefill_s": median(p_times),
            "decode_step_ms": round(decode * 1e3, 2),
            "profile_ms": {k: ph.per_run(runs[k]) for k, ph in phases.items()},
            "nodes_executed": {k: node_count(ph.request) for k, ph in phases.items()},
            "matmul_kernels": matmul_kernels(dec),
            "kv_cache_precision": str(lm.get_property("KV_CACHE_PRECISION")),
            "inputs": {p.get_any_name(): str(p.get_partial_shape()) for p in lm.inputs}}


def table(ours: dict, theirs: dict) -> str:
    rows = ["| part | ours | OpenVINO GenAI's IR | ours - theirs |", "|---|---|---|---|"]
    for key, label, scale, unit in (("vision_s", "vision tower + projector", 1, "s"),
                                    ("prefill_s", f"decoder prefill ({ours['tokens']} tokens)", 1, "s"),
                                    ("decode_step_ms", "one decode step", 1, "ms")):
        a, b = ours[key] * scale, theirs[key] * scale
        rows.append(f"| {label} | {a:.3f} {unit} | {b:.3f} {unit} | {a - b:+.3f} {unit} "
                    f"({(a / b - 1) * 100:+.0f} %) |")
    for part in ("vision", "prefill", "decode_step"):
        rows += ["", f"**{part}**, profiled run, ms per CPU-plugin node type (top 8 of either side)",
                 "", "| node type | ours | theirs | ours - theirs |", "|---|---|---|---|"]
        a, b = ours["profile_ms"][part], theirs["profile_ms"][part]
        top = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, 0), b.get(k, 0)))[:8]
        for k in top:
            rows.append(f"| {k} | {a.get(k, 0):.1f} | {b.get(k, 0):.1f} | "
                        f"{a.get(k, 0) - b.get(k, 0):+.1f} |")
        rows.append(f"| (all) | {sum(a.values()):.1f} | {sum(b.values()):.1f} | "
                    f"{sum(a.values()) - sum(b.values()):+.1f} |")
    return "\n".join(rows) + "\n"


def combine(rounds: list[dict]) -> dict:
    """Medians over rounds: the wall times, and each node type's milliseconds per part."""
    out = {k: rounds[0][k] for k in rounds[0] if k not in ("vision_s", "prefill_s",
                                                          "decode_step_ms", "profile_ms")}
    for key in ("vision_s", "prefill_s", "decode_step_ms"):
        out[key] = median([r[key] for r in rounds])
    out["profile_ms"] = {}
    for part in rounds[0]["profile_ms"]:
        types = {t for r in rounds for t in r["profile_ms"][part]}
        medians = {t: round(statistics.median([r["profile_ms"][part].get(t, 0.0) for r in rounds]), 2)
                   for t in types}
        out["profile_ms"][part] = dict(sorted(medians.items(), key=lambda kv: -kv[1]))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import openvino as ov
    import peers

    paths = peers.prepare(args.work, 144, 16, [args.ir], args.ov_python,
                          need_ours=(args.artifact,))
    pixels, tokens = _inputs(paths[args.artifact], paths["image"], peers.PROMPT)
    sides = {"ours": lambda: measure_ours(paths[args.artifact], paths["image"], peers.PROMPT,
                                          args.precision, args.threads, args.repeats,
                                          args.decode_steps),
             "theirs": lambda: measure_theirs(paths[args.ir], pixels, tokens, args.precision,
                                              args.threads, args.repeats, args.decode_steps)}
    runs = {"ours": [], "theirs": []}
    loadavg = [peers.loadavg()]
    for rnd in range(args.rounds):               # alternate which side runs first
        for side in (("ours", "theirs") if rnd % 2 == 0 else ("theirs", "ours")):
            print(f"round {rnd + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
            result = sides[side]()
            result.pop("pixels", None)
            runs[side].append(result)
            gc.collect()
            loadavg.append(peers.loadavg())
    ours, theirs = combine(runs["ours"]), combine(runs["theirs"])
    record = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
              "precision": args.precision, "ir": args.ir, "artifact": args.artifact,
              "openvino": ov.__version__, "machine": peers.cpu_flags(), "loadavg": loadavg,
              "note": args.note, "rounds": args.rounds, "ours": ours, "theirs": theirs,
              "per_round": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "segments.json").write_text(json.dumps(record, indent=1) + "\n")
    text = table(ours, theirs)
    (args.results / "table.md").write_text(text)
    print(text)
    return 0


def _inputs(artifact: Path, image: Path, prompt: str):
    """Our preprocessed pixels and the prompt's length (the same input for both sides), as
    ``Pipeline.encode`` makes them."""
    from feather_runtime.manifest import load_manifest
    from feather_runtime.preprocess import load_image, preprocessor_for
    from feather_runtime.prompt import PromptBuilder

    manifest = load_manifest(artifact, verify=False)
    pixels = preprocessor_for(manifest.root, manifest["model"].get("anyres"))(load_image(str(image)))
    ids = PromptBuilder.for_artifact(manifest).build(prompt, manifest["model"]["num_image_tokens"])
    return pixels, int(ids.shape[1])


if __name__ == "__main__":
    sys.exit(main())
