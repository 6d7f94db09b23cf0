"""The README quickstart: its two commands (scripts/demo.py, scripts/test.py), and the commands the
demo runs, through the installed ``feather-export`` console script in subprocesses.

The feather-export commands are scripts/demo.py's own list, and the README shows the same lines, so
the test follows what a user runs. (Creating the environment from scratch is CI's job: .ci/run runs
both scripts in a fresh clone.)
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# what the trained tiny-shapes model answers about examples/shapes.png (a held-out test-split scene)
EXAMPLE_ANSWER = "top left"


def _cli() -> list[str]:
    """The installed console script (PATH, or next to this interpreter), else ``python -m``."""
    found = shutil.which("feather-export")
    if found is None:
        sibling = Path(sys.executable).with_name("feather-export")
        found = str(sibling) if sibling.is_file() else None
    return [found] if found else [sys.executable, "-m", "feather_export.cli.main"]


def _feather(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*_cli(), *args], cwd=REPO, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


def _demo_module():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "scripts"))


def _quickstart_commands() -> list[list[str]]:
    """The feather-export commands scripts/demo.py runs."""
    return [list(c) for c in _demo_module().COMMANDS]


def test_readme_quickstart_is_the_two_scripts_and_shows_the_demo_commands():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1]
    first_block = section.split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:]
                if line.strip() and not line.strip().startswith("#")]
    assert commands == ["python3 scripts/demo.py", "python3 scripts/test.py"]
    shown = [shlex.split(line, comments=True) for line in section.split("## ", 1)[0].splitlines()
             if line.strip().startswith("feather-export ")]
    assert shown[:2] == _quickstart_commands()
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 scripts/demo.py" in ci and "python3 scripts/test.py" in ci


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """Runs the README's build command with the artifact directory moved under a tmp dir."""
    commands = _quickstart_commands()
    subcommands = [c[1] for c in commands]
    assert subcommands[:2] == ["build", "run"], commands
    build, run = commands[0], commands[1]
    art_name = build[build.index("--out") + 1]
    assert run[2] == art_name, "the run command must use the artifact the build command wrote"
    art = tmp_path_factory.mktemp("quickstart") / art_name
    build = [str(art) if a == art_name else a for a in build[1:]]
    run = [str(art) if a == art_name else a for a in run[1:]]
    proc = _feather(build)
    return art, build, run, proc


def test_quickstart_build(quickstart):
    art, _, _, proc = quickstart
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "built" in proc.stdout and str(art) in proc.stdout
    manifest = json.loads((art / "feather.json").read_text())
    # the README promises the trained tiny-shapes model with FEATHER at its default budget
    # (a quarter of the 16 x 16 = 256 image tokens, as 144 is of LLaVA-1.5's 576)
    assert manifest["model"]["id"] == "tiny-shapes"
    assert manifest["model"]["num_image_tokens"] == 256
    assert manifest["prune"]["method"] == "feather"
    assert manifest["prune"]["stages"][0]["keep"] == 64


def test_quickstart_run_streams_an_answer(quickstart):
    art, _, run, build_proc = quickstart
    assert build_proc.returncode == 0, build_proc.stderr
    proc = _feather(run)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    answer = proc.stdout.rstrip("\n")
    # the trained default model answers the README's question about the example image correctly
    assert answer == EXAMPLE_ANSWER, proc.stdout
    # the streamed answer is the same text --json reports
    proc_json = _feather([*run, "--json"])
    assert proc_json.returncode == 0, proc_json.stderr
    out = json.loads(proc_json.stdout)
    assert set(out) >= {"text", "token_ids", "kept", "timings"}
    assert out["text"] == answer
    assert isinstance(out["token_ids"], list) and 1 <= len(out["token_ids"]) <= 64   # stops at EOS
    manifest = json.loads((art / "feather.json").read_text())
    assert [len(k) for k in out["kept"]] == [s["keep"] for s in manifest["prune"]["stages"]]
    assert {"vision", "ttft", "selection", "decode_tokens_per_s"} <= set(out["timings"])


def test_run_overlay_draws_every_stage(quickstart, tmp_path):
    from PIL import Image

    from feather_export.quality.overlay import PANEL

    art, _, run, build_proc = quickstart
    assert build_proc.returncode == 0, build_proc.stderr
    png = tmp_path / "kept.png"
    proc = _feather([*run, "--overlay", str(png)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == EXAMPLE_ANSWER
    stages = json.loads((art / "feather.json").read_text())["prune"]["stages"]
    with Image.open(png) as im:                       # the input, then one panel per stage
        assert im.format == "PNG"
        assert im.width == PANEL * (len(stages) + 1) + 4 * len(stages)


@pytest.mark.parametrize("case", ["missing-artifact", "garbage-image", "bad-max-new-tokens",
                                  "overlay-missing-dir", "overlay-not-png"])
def test_cli_user_errors_are_one_line(quickstart, tmp_path, case):
    art = quickstart[0]
    image = "examples/shapes.png"
    args = ["run", str(art), "--prompt", "Where is the red square?"]
    if case == "missing-artifact":
        args[1] = str(tmp_path / "no-such-artifact")
        phrase = "does not exist"
    elif case == "garbage-image":
        image = tmp_path / "garbage.png"
        image.write_bytes(os.urandom(100))
        phrase = "cannot read image"
    elif case == "bad-max-new-tokens":
        args += ["--max-new-tokens", "100000"]
        phrase = "max_new_tokens must be between"
    elif case == "overlay-missing-dir":
        args += ["--overlay", str(tmp_path / "no-such-dir" / "kept.png")]
        phrase = "does not exist"
    else:
        args += ["--overlay", str(tmp_path / "kept.jpg")]
        phrase = "give a path ending in .png"
    proc = _feather([*args, "--image", str(image)])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("feather-export: error:")
    assert phrase in lines[0]


def test_build_refuses_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = _feather(["build", "--out", str(out)])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("feather-export: error:") and "not a feather-export artifact" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
