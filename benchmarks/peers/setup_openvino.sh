#!/usr/bin/env bash
# Creates the separate virtual environment the peer benchmark uses for OpenVINO GenAI:
#   bash benchmarks/peers/setup_openvino.sh [VENV]      (default: .venv-ov in the repository root)
# Separate because optimum-intel needs transformers < 5.6 (the project uses newer) and its
# torchvision dependency would pull a CUDA torch: torch 2.13.0 (CPU wheel) is installed first and
# optimum-intel without its dependencies, then only what the export and the pipeline import.
# Idempotent: an existing venv is reused and only missing packages are installed.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$repo/.venv-ov}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q "transformers>=4.45,<5.6" "openvino==2026.4.1" "openvino-tokenizers==2026.4.1.0" \
    "openvino-genai==2026.4.1.0" "nncf==3.4.0" "optimum==2.3.0" safetensors sentencepiece \
    tokenizers pillow numpy psutil requests
# optimum-intel without dependencies: its requirements name torchvision (no CPU build here)
"$py" -m pip install -q --no-deps "optimum-intel==2.2.0"
"$py" - <<'PY'
import openvino, openvino_genai, optimum.intel, transformers, torch
print("openvino", openvino.__version__, "| genai", openvino_genai.__version__,
      "| transformers", transformers.__version__, "| torch", torch.__version__)
PY
