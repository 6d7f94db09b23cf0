"""The command line: subcommands, help, and user errors as one line with exit status 2."""
import json

import pytest

from feather_export.cli.main import main

SAMPLE = "examples/shapes.png"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "art"
    assert main(["build", "--model", "tiny-gqa", "--budget", "64", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("command", ["build", "build-engines", "bench", "export", "run", "check", "validate", "make-tiny",
                                     "reference", "serve"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: feather-export " + command in capsys.readouterr().out


def test_build_says_it_built_for_onnxruntime(tmp_path, capsys):
    assert main(["build", "--budget", "64", "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "TensorRT is not installed" in captured.out
    assert "exporting decoder_" in captured.err          # progress
    assert (tmp_path / "a" / "feather.json").is_file()


def test_build_tensorrt_without_tensorrt_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("numpy")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert main(["build", "--backend", "tensorrt", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("feather-export: error: --backend tensorrt needs TensorRT")
    assert not (tmp_path / "t").exists()


def test_run_json(artifact, capsys):
    assert main(["run", str(artifact), "--image", SAMPLE, "--prompt", "Where is the red square?",
                 "--max-new-tokens", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["token_ids"]) <= 3 and len(res["kept"]) == 2 and len(res["kept"][0]) == 64
    assert res["timings"]["ttft"] > 0


def test_check_and_validate(artifact, capsys):
    assert main(["check", str(artifact)]) == 0
    assert "lint" in capsys.readouterr().out
    assert main(["validate", str(artifact)]) == 0
    assert " 0 failed" in capsys.readouterr().out


def test_make_tiny_and_reference(tmp_path, capsys):
    ckpt = tmp_path / "ck"
    assert main(["make-tiny", "tiny", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["reference", "--model", str(ckpt), "--image", SAMPLE, "--prompt", "What colour?",
                 "--method", "fastv", "--budget", "50", "--max-new-tokens", "4"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["kept"][0]) == 50 and 1 <= len(res["token_ids"]) <= 4


@pytest.mark.parametrize("argv, message", [
    (["build", "--budget", "0", "--out", "{tmp}/x"], "between 1 and"),
    (["build", "--schedule", "3:10,1:5", "--out", "{tmp}/x"], "increase"),
    (["export", "--model", "{tmp}/none", "--out", "{tmp}/x"], "does not exist"),
    (["run", "{tmp}/missing", "--image", SAMPLE, "--prompt", "hi"], "does not exist"),
    (["check", "{tmp}/missing"], "feather.json"),
    (["make-tiny", "giant", "{tmp}/g"], "unknown tiny model"),
    (["serve", "{tmp}/missing"], "does not exist"),
    (["serve", "{tmp}", "--replicas", "0"], "--replicas must be at least 1"),
    (["serve", "{tmp}", "--image-root", "{tmp}/nowhere"], "not a directory"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("feather-export: error:") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_run_unreadable_image(artifact, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["run", str(artifact), "--image", str(bad), "--prompt", "hi"]) == 2
    assert str(bad) in capsys.readouterr().err
