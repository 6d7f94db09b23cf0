"""The GPU verification kit (scripts/gpu_check.sh) on a CPU machine: the dry run (what CI runs),
a real run where no check can run (recorded as skipped, with the reasons, exit 3), usage errors,
and the kit's runner and result parsers on real subprocesses and real pytest/kernel-test output
formats. The checks themselves need a GPU: on such a machine ``bash scripts/gpu_check.sh OUT``
is the test.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
CHECKS = ["kernels", "ort_cuda", "torch_segments"]


def _kit():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def _bash(*args, **kw):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable}, **kw)


def _has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def test_dry_run_prints_the_plan_and_checks_prerequisites():
    proc = _bash("--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for i, name in enumerate(CHECKS, 1):
        assert f"\n{i}. {name} (at most " in out
    assert "select_tokens_kernel_test.cpp" in out and "-arch=native" in out
    assert "tests/test_gpu_runtime.py" in out and "-m gpu" in out
    assert "benchmarks/gpu.py --engine torch --model shape-llava-1.5-7b --methods feather --budget 144" in out
    assert "at most 600 s in all" in out and "dry run OK" in out
    if not _has_gpu():
        assert out.count("missing here (needed on the GPU machine): an NVIDIA GPU") == 3


def test_usage_errors():
    assert _bash().returncode == 2
    proc = _bash("/tmp/x", "--only", "kernels,warp")
    assert proc.returncode == 2 and "unknown checks ['warp']" in proc.stderr


@pytest.mark.skipif(_has_gpu(), reason="a GPU is here: the real run takes minutes (run the kit itself)")
def test_run_without_a_gpu_skips_every_check_and_says_why(tmp_path):
    proc = _bash(tmp_path / "out")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["kit"] == "feather-export gpu_check" and summary["ok"] is False
    assert summary["ran"] == [] and summary["failed"] == []
    assert [c["check"] for c in summary["checks"]] == CHECKS
    assert all(c["status"] == "skipped" and "an NVIDIA GPU" in c["reason"] for c in summary["checks"])
    assert summary["machine"]["modules"]["feather_runtime"]["ok"]
    for name in CHECKS:
        record = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert record["commands"] and record["status"] == "skipped"


def test_runner_records_pass_fail_timeout_and_pytest_results(tmp_path):
    kit = _kit()
    env = object.__new__(kit.Env)                 # no probing: these commands need nothing
    env.python, env.pythonpath = sys.executable, None
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "def test_skip():\n    pytest.skip('no CUDA provider here')\n")

    def check(name, cmds, cap=60, result=lambda e, o, runs: {"runs": len(runs)}):
        return kit.Check(name, "t", cap, lambda e: [], lambda e, o: cmds, result)

    ok = kit.run_check(check("a", [[sys.executable, "-c", "print('OK: 3 passed, 0 failed')"]]), env, out)
    assert ok["status"] == "passed" and ok["results"] == {"runs": 1}
    bad = kit.run_check(check("b", [[sys.executable, "-c", "raise SystemExit(4)"], ["true"]]), env, out)
    assert bad["status"] == "failed" and bad["results"] == {"runs": 1}       # stops at the failure
    slow = kit.run_check(check("c", [[sys.executable, "-c", "import time; time.sleep(30)"]], cap=1), env, out)
    assert slow["status"] == "timed_out" and slow["seconds"] < 20
    junit = out / "sample.xml"
    py = kit.run_check(check("d", [[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    str(tmp_path / "test_sample.py"), f"--junitxml={junit}"]],
                             result=lambda e, o, runs: kit._junit(junit)), env, out)
    assert py["status"] == "passed"
    assert [(t["name"], t["outcome"]) for t in py["results"]["tests"]] == [("test_ok", "passed"),
                                                                           ("test_skip", "skipped")]
    assert "no CUDA provider here" in py["results"]["tests"][1]["message"]


def test_kernel_output_is_parsed():
    """The formats select_tokens_kernel_test.cpp prints (printf strings in the source)."""
    kit = _kit()
    source = (REPO / "engines" / "plugin" / "select_tokens_kernel_test.cpp").read_text()
    assert '"%s: %d passed, %d failed\\n"' in source and '"%s host_checks' in source
    assert '"%s stale_error: %s pending' in source
    text = ("PASS host_checks (grid count closed form, argument validation)\n"
            "device 0: NVIDIA H200 (sm_90), seed 1\n"
            "PASS stale_error: cudaErrorMemoryAllocation pending before the launches did not fail them\n"
            "OK: 241 passed, 0 failed\n")
    got = kit._kernels_result(None, None, [{"stdout": text, "returncode": 0}])
    assert got == {"cases_passed": 241, "cases_failed": 0, "host_checks": True, "stale_error_case": "passed",
                   "device": "device 0: NVIDIA H200 (sm_90), seed 1"}
