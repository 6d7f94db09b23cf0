#!/usr/bin/env bash
# feather-export GPU verification kit: every GPU check the project has, on any machine with an
# NVIDIA GPU and no TensorRT, in one command, results as JSON.
#
#   bash scripts/gpu_check.sh OUT_DIR      run the checks, write OUT_DIR/summary.json (+ one JSON
#                                          per check, logs, the benchmark's bench.json)
#   bash scripts/gpu_check.sh --dry-run    print the plan and check the prerequisites (CPU is fine)
#
# Checks (each capped in time; together under 10 minutes on an H100/H200):
#   1. kernels         plugin CUDA kernels vs their CPU reference (engines/plugin, built with nvcc)
#   2. ort_cuda        ONNX Runtime CUDA pipeline vs CPU, tokens and traffic (tests/test_gpu_runtime.py;
#                      runs when onnxruntime-gpu and cuda-python are installed, else skipped, said why)
#   3. torch_segments  torch-on-CUDA segment latency of shape-llava-1.5-7b, none vs FEATHER@144, next
#                      to the roofline (benchmarks/gpu.py --engine torch)
# A check whose prerequisites are missing is recorded as skipped with the reason. Exit status: 0
# when every check that ran passed, 1 when one failed (or timed out), 2 on a usage error, 3 when
# no check could run (e.g. no GPU); `--only kernels,ort_cuda` runs a subset.
#
# Python: $PYTHON, else the repository's .venv, else python3. Needs numpy, onnx, onnxruntime,
# pytest, and for check 3 torch (CUDA build) and transformers; feather-export itself may be
# installed or not (the kit then puts this checkout on the path). No network is needed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  py="$repo/.venv/bin/python"
else
  py="$(command -v python3 || true)"
fi
if [[ -z "$py" ]] || ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "gpu_check: error: needs Python >= 3.10 (set PYTHON=/path/to/python); found '${py:-none}'" >&2
  exit 2
fi
exec "$py" "$here/gpu_check.py" "$@"
