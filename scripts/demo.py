#!/usr/bin/env python3
"""One command from a clone to an answer: the environment, the default model, the example question.

    python3 scripts/demo.py

Creates (or reuses) ``.venv`` in the checkout (scripts/dev_env.py), builds the built-in default
model (tiny-shapes, FEATHER at its default budget) into ``art/`` and asks it about
``examples/shapes.png``; it prints ``top left``.
"""
from __future__ import annotations

import sys

from dev_env import REPO, ensure_env, run, say, venv_bin

COMMANDS = [
    ["feather-export", "build", "--out", "art"],
    ["feather-export", "run", "art", "--image", "examples/shapes.png",
     "--prompt", "Where is the red square?"],
]


def main() -> int:
    ensure_env()
    for cmd in COMMANDS:
        say(" ".join(cmd[:2]))
        run([venv_bin(cmd[0]), *cmd[1:]], cwd=REPO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
