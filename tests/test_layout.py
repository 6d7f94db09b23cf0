"""The house: feather_export's folders are rooms, and imports point down, never sideways or up.

models -> methods -> onnx -> export -> {tensorrt, bench, quality} -> serve -> cli (errors.py and
files.py are the floor). A module may import its own room and any room below it. feather_runtime
(runtime/) never imports feather_export.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "feather_export"
RANK = {"errors": 0, "files": 0, "__version__": 0, "models": 1, "methods": 2, "onnx": 3, "export": 4,
        "tensorrt": 5, "bench": 5, "quality": 5, "serve": 6, "cli": 7}
TOP_LEVEL_MODULES = {"__init__.py", "errors.py", "files.py"}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "feather_export" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path):
    """Every feather_export module imported by ``path`` (top level and inside functions)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "feather_export":
                for alias in node.names:
                    yield f"feather_export.{alias.name}"
            else:
                yield module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name


def test_every_module_lives_in_a_room():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in TOP_LEVEL_MODULES)
    assert loose == [], f"modules outside a room: {loose}"
    rooms = sorted(p.name for p in PACKAGE.iterdir()
                   if p.is_dir() and (p / "__init__.py").is_file())
    assert set(rooms) <= set(RANK), f"rooms without a rank in this test: {set(rooms) - set(RANK)}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path):
    rel = path.relative_to(PACKAGE)
    own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    if own == "__init__":
        own = "errors"
    for module in _imports(path):
        room = _room(module)
        if room is None or room == own:
            continue
        assert room in RANK, f"{rel} imports {module}: unknown room {room!r}"
        assert RANK[room] < RANK[own], (f"{rel} ({own}) imports {module} ({room}): imports must "
                                        "point down (models -> methods -> onnx -> export -> "
                                        "tensorrt/bench/quality -> serve -> cli)")


def test_runtime_never_imports_the_export_side():
    for path in sorted((REPO / "runtime").rglob("*.py")):
        for module in _imports(path):
            assert not module.startswith("feather_export"), f"{path} imports {module}"


def test_docs_and_messages_link_only_inside_the_repository():
    """README, docs, benchmarks' README and every message in the code cite docs/design.md, never the
    team's contract outside this repository."""
    files = [REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").rglob("*.md"),
             *PACKAGE.rglob("*.py"), *(REPO / "runtime").rglob("*.py")]
    offenders = [str(f.relative_to(REPO)) for f in files
                 if "shared/DESIGN" in f.read_text() or "DESIGN.md" in f.read_text()]
    assert offenders == []
