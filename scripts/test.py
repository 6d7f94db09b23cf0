#!/usr/bin/env python3
"""One command from a clone to a test run: the environment (created if missing), then the suite.

    python3 scripts/test.py [pytest arguments]

Creates (or reuses) ``.venv`` in the checkout (scripts/dev_env.py) and runs
``python -m pytest -q -rs`` in it; extra arguments go to pytest. CI runs exactly this.
"""
from __future__ import annotations

import subprocess
import sys

from dev_env import REPO, ensure_env, say


def main(argv: list[str]) -> int:
    python = ensure_env()
    cmd = [str(python), "-m", "pytest", "-q", "-rs", *argv]
    say("running the test suite: " + " ".join(cmd[1:]))
    return subprocess.run(cmd, cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
