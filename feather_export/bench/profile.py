"""Where prefill time goes: ONNX Runtime's profiler on every segment of one artifact.

Sessions are opened with profiling on (the same graph optimisation level as the runtime's
backend), one warm-up prefill runs, then one profiled prefill. Node events of the last run of each
segment are grouped by op type; MatMul nodes also get their FLOPs (from the input shapes ORT
records) and the achieved rate, so the gap to the roofline can be read per op.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def _matmul_flops(args: dict) -> float:
    """2 * (output elements) * K, with K the last dim of the first input (ORT lists only the
    activation when the weight is a prepacked initializer, so the output gives N)."""
    ins = [list(next(iter(d.values()))) for d in args.get("input_type_shape", [])]
    outs = [list(next(iter(d.values()))) for d in args.get("output_type_shape", [])]
    if not ins or not outs or not ins[0]:
        return 0.0
    elements = 1
    for d in outs[0]:
        elements *= d
    return 2.0 * elements * ins[0][-1]


def summarize_profile(path: Path) -> dict:
    """Per op type: total ms, calls, and for MatMul-like ops GFLOP and GFLOP/s (last model run)."""
    events = json.loads(Path(path).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    if not runs:
        return {}
    last = runs[-1]
    lo, hi = last["ts"], last["ts"] + last["dur"]
    ops: dict = defaultdict(lambda: {"ms": 0.0, "calls": 0, "gflop": 0.0})
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not lo <= e["ts"] <= hi:
            continue
        op = e.get("args", {}).get("op_name", "?")
        ops[op]["ms"] += e["dur"] / 1e3
        ops[op]["calls"] += 1
        if op in ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits"):
            ops[op]["gflop"] += _matmul_flops(e.get("args", {})) / 1e9
    out = {"run_ms": last["dur"] / 1e3, "ops": {}}
    for op, v in sorted(ops.items(), key=lambda kv: -kv[1]["ms"]):
        entry = {"ms": round(v["ms"], 3), "calls": v["calls"]}
        if v["gflop"]:
            entry["gflop"] = round(v["gflop"], 3)
            entry["gflop_per_s"] = round(v["gflop"] / (v["ms"] / 1e3), 2) if v["ms"] else None
        out["ops"][op] = entry
    return out


def profile_prefill(artifact, out_dir, pixels, input_ids, threads: int | None = None) -> dict:
    """Profile one prefill of ``artifact``; profiles and a summary JSON land in ``out_dir``."""
    from feather_runtime import Pipeline
    from feather_runtime.backends.onnxruntime import OnnxRuntimeBackend
    from feather_runtime.manifest import load_manifest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(artifact, verify=False)
    backend = OnnxRuntimeBackend(device="cpu", threads=threads, profile_dir=out)
    runners = {seg.name: backend.load(manifest.root, seg) for seg in manifest.segments}
    pipe = Pipeline(manifest, backend, runners)
    pipe.generate_ids(pixels, input_ids, 1)                  # warm-up
    res = pipe.generate_ids(pixels, input_ids, 1)            # profiled
    summary = {"artifact": str(artifact), "timings": res.timings, "segments": {}}
    for name, session in backend.sessions.items():
        path = Path(session.end_profiling())
        summary["segments"][name] = {"profile": path.name, **summarize_profile(path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_profile(summary: dict, top: int = 6) -> str:
    lines = [f"profile of {summary['artifact']} (ttft {summary['timings']['ttft'] * 1e3:.1f} ms)"]
    for name, seg in summary["segments"].items():
        if not seg.get("ops"):
            continue
        parts = []
        for op, v in list(seg["ops"].items())[:top]:
            rate = f" {v['gflop_per_s']:.1f} GFLOP/s" if v.get("gflop_per_s") else ""
            parts.append(f"{op} {v['ms']:.1f} ms{rate}")
        lines.append(f"  {name:<14} run {seg['run_ms']:9.1f} ms: " + ", ".join(parts))
    return "\n".join(lines)
