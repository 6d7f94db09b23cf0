"""`pip install .` and `pip install -e .` both give feather_export, feather_runtime and the script."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


def _origin(python: Path, module: str) -> str:
    # find_spec on a top-level package locates it without executing it (no deps needed)
    code = f"import importlib.util as u; print(u.find_spec({module!r}).origin)"
    return subprocess.run([str(python), "-c", code], check=True, capture_output=True,
                          text=True, cwd=python.parent).stdout.strip()   # not the repo root


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_install_modes(tmp_path, editable):
    python = _venv(tmp_path / "venv")
    # build isolation fetches setuptools/wheel from PyPI, as a user's `pip install .` does
    args = [str(python), "-m", "pip", "install", "-q", "--no-deps"]
    args += ["-e", str(ROOT)] if editable else [str(ROOT)]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    runtime = _origin(python, "feather_runtime")
    export = _origin(python, "feather_export")
    if editable:
        assert runtime == str(ROOT / "runtime" / "__init__.py")
        assert export == str(ROOT / "feather_export" / "__init__.py")
    else:
        assert "site-packages" in runtime and runtime.endswith("feather_runtime/__init__.py")
        assert "site-packages" in export
        # every module of both trees is installed (subpackages included)
        for package, source in (("feather_runtime", ROOT / "runtime"),
                                ("feather_export", ROOT / "feather_export")):
            installed = Path(runtime if package == "feather_runtime" else export).parent
            want = {p.relative_to(source) for p in source.rglob("*.py")}
            got = {p.relative_to(installed) for p in installed.rglob("*.py")}
            assert want <= got, f"{package}: not installed: {sorted(map(str, want - got))}"
        # the trained default model ships inside the package (feather-export build needs it)
        assets = Path(export).parent / "assets" / "tiny-shapes"
        for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"):
            assert (assets / name).is_file(), name
    assert (tmp_path / "venv" / "bin" / "feather-export").is_file()
