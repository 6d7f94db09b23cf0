#!/usr/bin/env python
"""Export at real scale: wall time and peak RSS of `build`, `check` and `validate`.

Each command runs as its own process (`feather-export ...`, exactly as a user types it); its
peak resident memory is the kernel's figure for that process (``ru_maxrss`` from ``wait4``).
The artifact's size on disk is measured, then the artifact is deleted unless ``--keep``.

    python benchmarks/export_scale.py                                  # 1B fp32, 7B fp16, 13B fp16
    python benchmarks/export_scale.py --models shape-llava-1.5-7b:fp16 --skip-validate

One JSON file per model under --results (default benchmarks/results/export_scale/), each with
the commands, the machine, and the figures from before streaming export for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("shape-llava-1b:fp32", "shape-llava-1.5-7b:fp16", "shape-llava-1.5-13b:fp16")
# measured on the same kind of machine with the exporter that built the whole model first
BEFORE = {
    "shape-llava-1.5-7b:fp16": "killed by the kernel's OOM killer after 1 min 40 s at 24.3 GB "
                               "resident, having printed only 'loading model' (the whole model "
                               "was built in fp32, ~28 GB, before anything was exported)",
    "shape-llava-1.5-13b:fp16": "not attempted: the fp32 model alone is ~52 GB, twice the "
                                "machine's memory",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="MODEL:DTYPE pairs (built-in names or checkpoint directories)")
    p.add_argument("--method", default="feather")
    p.add_argument("--budget", type=int, default=144)
    p.add_argument("--work", type=Path, default=REPO / ".export_scale",
                   help="where artifacts are written (needs the artifact's size free)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/results/export_scale")
    p.add_argument("--skip-validate", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the artifacts")
    return p.parse_args(argv)


def cli() -> list[str]:
    exe = shutil.which("feather-export", path=str(Path(sys.executable).parent)) \
        or shutil.which("feather-export")
    return [exe] if exe else [sys.executable, "-c",
                              "import sys; from feather_export.cli.main import main; "
                              "sys.exit(main())"]


def measured(argv: list[str]) -> dict:
    """Run ``argv``; wall seconds, peak RSS of that process (bytes), exit code, output tail."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": shlex.join(["feather-export", *argv[len(cli()):]]),
            "wall_s": round(time.monotonic() - start, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
            "returncode": proc.returncode,
            "output_tail": out.strip().splitlines()[-3:]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 1e9, 1),
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def run_one(spec: str, args) -> dict:
    model, dtype = spec.rsplit(":", 1)
    out = args.work / f"{Path(model).name}-{dtype}-{args.method}{args.budget}"
    shutil.rmtree(out, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    base = cli()
    result = {"model": model, "dtype": dtype, "method": args.method, "budget": args.budget,
              "machine": machine(), "free_disk_gb": round(shutil.disk_usage(args.work).free / 1e9, 1)}
    print(f"== {spec}", flush=True)
    result["build"] = measured([*base, "build", "--model", model, "--method", args.method,
                                "--budget", str(args.budget), "--dtype", dtype, "--out", str(out)])
    print(json.dumps(result["build"]), flush=True)
    if result["build"]["returncode"] == 0:
        result["artifact_gb"] = round(sum(f.stat().st_size for f in out.rglob("*")
                                          if f.is_file()) / 1e9, 3)
        result["check"] = measured([*base, "check", str(out)])
        print(json.dumps(result["check"]), flush=True)
        if not args.skip_validate:
            result["validate"] = measured([*base, "validate", str(out)])
            print(json.dumps(result["validate"]), flush=True)
    if spec in BEFORE:
        result["before_streaming_export"] = BEFORE[spec]
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable.rsplit("/", 1)[-1], "benchmarks/export_scale.py",
                          *(argv if argv is not None else sys.argv[1:])])
    for spec in args.models:
        result = {"command": command, **run_one(spec, args)}
        model, dtype = spec.rsplit(":", 1)
        path = args.results / f"{Path(model).name}-{dtype}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
