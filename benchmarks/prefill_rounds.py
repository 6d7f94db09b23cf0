"""Shared by the CPU TTFT scripts (cpu_next.py, cpu_interleave_qwen.py): prefills of several
artifacts measured through the runtime on ONNX Runtime CPU, ONE artifact loaded at a time (large
fp32 artifacts on a small machine), in rounds over all of them, and the run's common JSON fields.
"""
from __future__ import annotations

import gc
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone


def measure_prefills(paths: dict, pixels, ids, rounds: int, repeats: int, say) -> dict:
    """{label: {"ttft": [s...], "selection": [s...], "kept": [per stage], "prune": PruneConfig}}
    for ``paths`` = {label: artifact}: per round and artifact, load, one warm-up prefill,
    ``repeats`` timed prefills (the Pipeline's TTFT and selection timings), close."""
    from feather_runtime import Pipeline

    from feather_export.methods.config import PruneConfig

    out = {label: {"ttft": [], "selection": []} for label in paths}
    for r in range(rounds):
        for label, path in paths.items():
            pipe = Pipeline.load(path)
            pipe.generate_ids(pixels, ids, max_new_tokens=1)            # warm-up
            for _ in range(repeats):
                res = pipe.generate_ids(pixels, ids, max_new_tokens=1)
                out[label]["ttft"].append(res.timings["ttft"])
                out[label]["selection"].append(res.timings.get("selection", 0.0))
            out[label]["kept"] = [len(k) for k in res.kept]
            out[label]["prune"] = PruneConfig.from_dict(pipe.manifest["prune"])
            pipe.close()
            del pipe
            gc.collect()
            say(f"round {r + 1}: {label} TTFT median {statistics.median(out[label]['ttft']):.2f} s")
    return out


def run_fields(script: str, argv, note: str, export_s: float, started: float) -> dict:
    """The machine, note, time and command fields every results JSON carries."""
    from feather_export.bench.perf_model import cpu_model_name

    return {"machine": {"cpu": cpu_model_name(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "note": note,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": f"python benchmarks/{script} "
                       + shlex.join(argv if argv is not None else sys.argv[1:]),
            "wall_s": {"export": export_s, "total": time.perf_counter() - started}}
