"""The GPU verification kit behind scripts/gpu_check.sh (see there for usage).

Runs each check as a subprocess with a time cap, records what ran, how long, its result or why
it was skipped, and writes OUT_DIR/<check>.json plus OUT_DIR/summary.json. Standard library only:
the kit must start on a bare GPU machine and say what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "engines" / "plugin"
KIT = "feather-export gpu_check"
FORMAT_VERSION = 1
BENCH_ARGS = ["--engine", "torch", "--model", "shape-llava-1.5-7b", "--methods", "feather",
              "--budget", "144", "--dtype", "fp16", "--repeats", "5", "--warmup", "1",
              "--gen-lengths", "1,16,64"]


@dataclass
class Check:
    name: str
    title: str
    cap_s: int
    needs: Callable[["Env"], list[str]]          # missing prerequisites (empty: can run)
    command: Callable[["Env", Path], list[list[str]]]
    result: Callable[["Env", Path, list], dict]  # from the finished commands
    files: list[str] = field(default_factory=list)


class Env:
    """What this machine has (probed once, without importing anything heavy in this process)."""

    def __init__(self, python: str):
        self.python = python
        self.smi = shutil.which("nvidia-smi")
        self.nvcc = _nvcc()
        self.gpus = _gpus(self.smi)
        self.pythonpath = _pythonpath(python)
        self.modules = _probe_modules(python, self.pythonpath)

    def env(self) -> dict:
        env = dict(os.environ)
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (self.pythonpath, env.get("PYTHONPATH")) if p)
        return env

    def has(self, module: str) -> bool:
        return bool(self.modules.get(module, {}).get("ok"))

    def describe(self) -> dict:
        return {"gpus": self.gpus, "nvidia_smi": self.smi, "nvcc": self.nvcc,
                "nvcc_version": _first_line([self.nvcc, "--version"], last=True) if self.nvcc else None,
                "python": self.python, "python_version": _first_line([self.python, "--version"]),
                "modules": self.modules, "feather_export_from": self.pythonpath or "installed",
                "host": platform.node(), "platform": platform.platform()}


# ---- probes ---------------------------------------------------------------------------------------

def _nvcc() -> str | None:
    for c in (os.environ.get("CUDACXX"), os.environ.get("CUDA_HOME") and
              os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"), shutil.which("nvcc"),
              "/usr/local/cuda/bin/nvcc"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _gpus(smi: str | None) -> list[dict]:
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return gpus


def _first_line(cmd: list[str], last: bool = False) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return (lines[-1] if last else lines[0]) if lines else None


def _pythonpath(python: str) -> str | None:
    """None when feather_export and feather_runtime import as installed; else a directory that
    maps them onto this checkout (feather_runtime lives in runtime/)."""
    code = "import feather_export, feather_runtime"
    ok = subprocess.run([python, "-c", code], capture_output=True, cwd=tempfile.gettempdir()).returncode == 0
    if ok:
        return None
    shim = Path(tempfile.gettempdir()) / f"feather-gpu-check-path-{os.getuid()}"
    shim.mkdir(exist_ok=True)
    for name, target in (("feather_export", REPO / "feather_export"), ("feather_runtime", REPO / "runtime")):
        link = shim / name
        if link.is_symlink() and Path(os.readlink(link)) != target:
            link.unlink()
        if not link.exists():
            link.symlink_to(target)
    return str(shim)


_PROBE = r"""
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        m = importlib.import_module(name)
        out[name] = {"ok": True, "version": str(getattr(m, "__version__", ""))}
    except Exception as exc:
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
if out.get("torch", {}).get("ok"):
    import torch
    out["torch"]["cuda"] = torch.version.cuda
    out["torch"]["cuda_available"] = bool(torch.cuda.is_available())
if out.get("onnxruntime", {}).get("ok"):
    import onnxruntime
    out["onnxruntime"]["providers"] = onnxruntime.get_available_providers()
print(json.dumps(out))
"""
_MODULES = ["numpy", "onnx", "onnxruntime", "pytest", "torch", "transformers", "cuda.bindings",
            "feather_export", "feather_runtime"]


def _probe_modules(python: str, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    try:
        out = subprocess.run([python, "-c", _PROBE, *_MODULES], capture_output=True, text=True,
                             timeout=300, env=env, cwd=tempfile.gettempdir())
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {m: {"ok": False, "error": f"probe failed: {exc}"} for m in _MODULES}


# ---- the checks ----------------------------------------------------------------------------------

def _needs_gpu(env: Env) -> list[str]:
    return [] if env.gpus else ["an NVIDIA GPU (nvidia-smi lists none)"]


def _needs_project(env: Env) -> list[str]:
    return [f"{m} importable ({env.modules.get(m, {}).get('error')})"
            for m in ("feather_export", "feather_runtime") if not env.has(m)]


def _kernels_needs(env: Env) -> list[str]:
    return _needs_gpu(env) + ([] if env.nvcc else ["nvcc (CUDA toolkit; set CUDACXX or CUDA_HOME)"])


def _kernels_command(env: Env, out: Path) -> list[list[str]]:
    exe = out / "build" / "select_tokens_kernel_test"
    return [[env.nvcc or "nvcc", "-std=c++17", "-O2", "-arch=native", str(PLUGIN / "select_tokens_kernel.cu"),
             str(PLUGIN / "select_tokens_kernel_test.cpp"), "-o", str(exe)],
            [str(exe), "--random", "200", "--quiet"]]


def _kernels_result(env: Env, out: Path, runs: list) -> dict:
    text = runs[-1]["stdout"] if runs else ""
    m = re.search(r"^(OK|FAILED): (\d+) passed, (\d+) failed", text, re.M)
    return {"cases_passed": int(m.group(2)) if m else None, "cases_failed": int(m.group(3)) if m else None,
            "host_checks": "PASS host_checks" in text,
            "stale_error_case": ("passed" if "PASS stale_error" in text else
                                 "failed" if "FAIL stale_error" in text else "not run"),
            "device": next((line for line in text.splitlines() if line.startswith("device 0:")), None)}


def _ort_needs(env: Env) -> list[str]:
    missing = _needs_gpu(env)
    providers = env.modules.get("onnxruntime", {}).get("providers", [])
    if "CUDAExecutionProvider" not in providers:
        missing.append(f"onnxruntime-gpu (ONNX Runtime providers here: {providers or 'none'})")
    if not env.has("cuda.bindings"):
        missing.append("cuda-python (cuda.bindings), for device memory")
    for m in ("pytest", "torch", "transformers"):
        if not env.has(m):
            missing.append(f"{m} (the test exports its tiny artifacts)")
    return missing + _needs_project(env)


def _ort_command(env: Env, out: Path) -> list[list[str]]:
    return [[env.python, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
             str(REPO / "tests" / "test_gpu_runtime.py"), f"--junitxml={out / 'ort_cuda.junit.xml'}"]]


def _ort_result(env: Env, out: Path, runs: list) -> dict:
    return _junit(out / "ort_cuda.junit.xml")


def _torch_needs(env: Env) -> list[str]:
    missing = _needs_gpu(env)
    torch = env.modules.get("torch", {})
    if not torch.get("ok"):
        missing.append("torch")
    elif not torch.get("cuda_available"):
        missing.append(f"torch with CUDA (torch {torch.get('version')}, CUDA build "
                       f"{torch.get('cuda')}, no device visible)")
    if not env.has("transformers"):
        missing.append("transformers")
    return missing + _needs_project(env)


def _torch_command(env: Env, out: Path) -> list[list[str]]:
    return [[env.python, str(REPO / "benchmarks" / "gpu.py"), *BENCH_ARGS,
             "--results", str(out / "torch_segments")]]


def _torch_result(env: Env, out: Path, runs: list) -> dict:
    result: dict = {"headline": None, "rows": []}
    lines = runs[-1]["stdout"].strip().splitlines() if runs else []
    try:
        result["headline"] = json.loads(lines[-1]) if lines else None
    except ValueError:
        pass
    bench = out / "torch_segments" / "bench.json"
    if bench.is_file():
        report = json.loads(bench.read_text())
        result["bench_json"] = str(bench)
        result["rows"] = [{k: r.get(k) for k in ("target", "row", "median", "predicted_s", "ratio",
                                                   "speedup")}
                          for r in report.get("rows", []) if r.get("kind") != "curve"]
    return result


CHECKS = [
    Check("kernels", "plugin CUDA kernels (selection, row gather) vs their CPU reference, bit-exact; "
          "a stale CUDA error before the launches must not fail them", 150,
          _kernels_needs, _kernels_command, _kernels_result, ["kernels.log"]),
    Check("ort_cuda", "ONNX Runtime CUDA pipeline (I/O binding, device-resident KV caches) vs ONNX "
          "Runtime CPU: tokens and kept indices equal, bytes moved per decode step",
          150, _ort_needs, _ort_command, _ort_result, ["ort_cuda.log", "ort_cuda.junit.xml"]),
    Check("torch_segments", "torch-on-CUDA per-segment latency of shape-llava-1.5-7b (random weights, "
          "fp16), none vs FEATHER@144, next to the roofline", 300,
          _torch_needs, _torch_command, _torch_result, ["torch_segments.log", "torch_segments/bench.json"]),
]


def _junit(path: Path) -> dict:
    if not path.is_file():
        return {"tests": []}
    root = ET.parse(path).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:500]
                break
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message})
    return {"tests": tests}


# ---- running ---------------------------------------------------------------------------------------

def run_check(check: Check, env: Env, out: Path) -> dict:
    record = {"check": check.name, "title": check.title, "cap_s": check.cap_s,
              "commands": [" ".join(c) for c in check.command(env, out)]}
    missing = check.needs(env)
    if missing:
        record.update(status="skipped", reason="missing: " + "; ".join(missing), seconds=0.0)
        return record
    (out / "build").mkdir(exist_ok=True)
    runs, status, t0 = [], "passed", time.monotonic()
    log = out / f"{check.name}.log"
    with open(log, "w") as f:
        for cmd in check.command(env, out):
            left = check.cap_s - (time.monotonic() - t0)
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(left, 1),
                                      env=env.env(), cwd=REPO)
            except subprocess.TimeoutExpired as exc:
                f.write(_text(exc.stdout) + _text(exc.stderr))
                status = "timed_out"
                break
            f.write(proc.stdout + proc.stderr + f"[exit {proc.returncode}]\n")
            runs.append({"returncode": proc.returncode, "stdout": proc.stdout})
            if proc.returncode != 0:
                status = "failed"
                break
    record.update(status=status, seconds=round(time.monotonic() - t0, 1), log=str(log))
    try:
        record["results"] = check.result(env, out, runs)
    except Exception as exc:  # noqa: BLE001 - a result we cannot read is recorded, not fatal
        record["results"] = {"error": f"{type(exc).__name__}: {exc}"}
    if status == "passed" and check.name == "ort_cuda":
        outcomes = {t["outcome"] for t in record["results"].get("tests", [])}
        if outcomes == {"skipped"}:
            record.update(status="skipped", reason="every test skipped: " +
                          "; ".join(sorted({t["message"] or "" for t in record["results"]["tests"]})))
    return record


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _git_commit() -> str | None:
    return _first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"])


def dry_run(env: Env) -> int:
    print(f"{KIT}: plan (dry run; nothing is built or run)")
    print(f"  repository  {REPO} (commit {_git_commit()})")
    print(f"  python      {env.python} ({env.describe()['python_version']}); feather-export "
          f"{'installed' if not env.pythonpath else 'from this checkout via ' + env.pythonpath}")
    print(f"  GPUs        {', '.join(g['name'] + ' driver ' + g['driver'] for g in env.gpus) or 'none here'}")
    print(f"  nvcc        {env.nvcc or 'not found here'}")
    problems = []
    for module in ("numpy", "onnx", "onnxruntime", "pytest", "feather_export", "feather_runtime"):
        if not env.has(module):
            problems.append(f"python module {module}: {env.modules.get(module, {}).get('error')}")
    for path in (PLUGIN / "select_tokens_kernel.cu", PLUGIN / "select_tokens_kernel_test.cpp",
                 REPO / "tests" / "test_gpu_runtime.py", REPO / "benchmarks" / "gpu.py",
                 REPO / "benchmarks" / "gpu_torch.py"):
        if not path.is_file():
            problems.append(f"missing file {path}")
    total = sum(c.cap_s for c in CHECKS)
    for i, check in enumerate(CHECKS, 1):
        missing = check.needs(env)
        print(f"\n{i}. {check.name} (at most {check.cap_s} s): {check.title}")
        for cmd in check.command(env, Path("OUT_DIR")):
            print(f"     $ {' '.join(cmd)}")
        print("     prerequisites: " + ("all present here" if not missing else
                                         "missing here (needed on the GPU machine): " + "; ".join(missing)))
    print(f"\nwrites OUT_DIR/summary.json, OUT_DIR/<check>.json and logs; at most {total} s in all")
    if problems:
        print("\nthe kit cannot run from here:\n  " + "\n  ".join(problems))
        return 1
    print("dry run OK: the kit's own prerequisites are present")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description="feather-export GPU "
                                     "verification kit (scripts/gpu_check.sh has the details)")
    parser.add_argument("out", nargs="?", help="directory for the JSON results (created)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check the "
                        "prerequisites; build and run nothing (default: off)")
    parser.add_argument("--only", help="comma list of checks to run (default: all: "
                        + ",".join(c.name for c in CHECKS) + ")")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run(Env(sys.executable))
    if not args.out:
        parser.print_usage(sys.stderr)
        print("gpu_check: error: give OUT_DIR (or --dry-run)", file=sys.stderr)
        return 2
    selected = CHECKS
    if args.only:
        names = [n for n in args.only.split(",") if n]
        unknown = sorted(set(names) - {c.name for c in CHECKS})
        if unknown:
            print(f"gpu_check: error: unknown checks {unknown}; choose from "
                  f"{[c.name for c in CHECKS]}", file=sys.stderr)
            return 2
        selected = [c for c in CHECKS if c.name in names]
    env = Env(sys.executable)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    summary = {"kit": KIT, "format_version": FORMAT_VERSION,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "commit": _git_commit(), "command": "bash scripts/gpu_check.sh " + " ".join(argv or sys.argv[1:]),
               "machine": env.describe(), "checks": []}
    for check in selected:
        print(f"[gpu_check] {check.name}: {check.title}", file=sys.stderr, flush=True)
        record = run_check(check, env, out)
        (out / f"{check.name}.json").write_text(json.dumps(record, indent=1) + "\n")
        summary["checks"].append({k: record.get(k) for k in ("check", "status", "seconds", "reason")})
        print(f"[gpu_check] {check.name}: {record['status']} ({record['seconds']} s)"
              + (f": {record['reason']}" if record.get("reason") else ""), file=sys.stderr, flush=True)
    summary["total_seconds"] = round(time.monotonic() - t0, 1)
    bad = [c["check"] for c in summary["checks"] if c["status"] in ("failed", "timed_out")]
    ran = [c["check"] for c in summary["checks"] if c["status"] != "skipped"]
    summary.update(ran=ran, failed=bad, ok=bool(ran) and not bad)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("ok", "ran", "failed", "total_seconds", "checks")}))
    if bad:
        return 1
    return 0 if ran else 3


if __name__ == "__main__":
    sys.exit(main())
