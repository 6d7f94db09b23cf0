"""The checkout's virtual environment for scripts/demo.py and scripts/test.py (standard library only).

``ensure_env()`` creates ``.venv`` in the checkout if it is missing, installs PyTorch's CPU wheel
first (so pip never pulls CUDA packages for it), then the project with its test extra, and records
what it installed in a stamp file; a second call with nothing changed installs nothing.

Environment variables: ``FEATHER_TORCH`` (default ``torch==2.13.0``: the pip requirement for
PyTorch) and ``FEATHER_TORCH_INDEX`` (an extra ``--index-url`` for it, e.g. PyTorch's CPU wheel
index where the default index serves CUDA builds).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
STAMP = VENV / ".feather-env"
EXTRAS = "test"
MIN_PYTHON = (3, 10)


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    print("    $ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def venv_bin(name: str) -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / name


def _wanted() -> str:
    """What the environment must hold: the torch requirement and the project's metadata."""
    torch = os.environ.get("FEATHER_TORCH", "torch==2.13.0")
    index = os.environ.get("FEATHER_TORCH_INDEX", "")
    project = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    return f"{torch}\n{index}\n{EXTRAS}\n{project}\n"


def ensure_env() -> Path:
    """The virtual environment's python, created and installed as needed."""
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"feather-export needs Python >= {'.'.join(map(str, MIN_PYTHON))}; "
                 f"this is {sys.version.split()[0]}")
    python = venv_bin("python")
    if not python.is_file():
        say(f"creating the virtual environment {VENV.relative_to(REPO)}/")
        run([sys.executable, "-m", "venv", VENV])
        run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    wanted = _wanted()
    if STAMP.is_file() and STAMP.read_text() == wanted:
        say(f"reusing {VENV.relative_to(REPO)}/ (already installed)")
        return python
    torch, index = wanted.splitlines()[:2]
    say(f"installing PyTorch first ({torch}; CPU wheel, so nothing pulls CUDA packages)")
    run([python, "-m", "pip", "install", "-q", torch, *(["--index-url", index] if index else [])])
    say(f"installing feather-export and its [{EXTRAS}] extra (editable)")
    run([python, "-m", "pip", "install", "-q", "-e", f".[{EXTRAS}]"], cwd=REPO)
    STAMP.write_text(wanted)
    return python
