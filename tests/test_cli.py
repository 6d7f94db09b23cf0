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


def _subparsers():
    import argparse

    from feather_export.cli.main import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_documents_every_option_and_its_default(command):
    """Every option has help; every option that takes a value says its default."""
    import argparse

    sub = _subparsers()[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{command} {name} has no help"
        takes_value = action.option_strings and action.nargs != 0 and not action.required
        if takes_value:
            text = formatter._expand_help(action)
            assert "default" in text, f"{command} {name}: help does not say the default: {text!r}"


def test_tensorrt_options_are_grouped_and_say_they_need_the_backend():
    build = _subparsers()["build"]
    group = next(g for g in build._action_groups if "TensorRT" in (g.title or ""))
    assert "--backend tensorrt" in group.title
    assert {a.option_strings[0] for a in group._group_actions} == {
        "--precision", "--plugin", "--timing-cache", "--workspace", "--reuse-engines"}


def test_build_says_it_built_for_onnxruntime_in_one_line(tmp_path, capsys):
    assert main(["build", "--budget", "64", "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1                 # one completion line, on stdout
    assert captured.out.startswith(f"built {tmp_path / 'a'}: 7 segments, feather keeping 64 -> 6 of 256 "
                                    "image tokens, fp32, for ONNX Runtime")
    assert "TensorRT is not installed" in captured.out
    assert "exporting decoder_" in captured.err          # progress
    assert "wrote" not in captured.err and "built" not in captured.err
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


def test_run_default_max_new_tokens_fits_a_small_artifact(tmp_path, capsys):
    art = tmp_path / "small"
    assert main(["build", "--max-new-tokens", "4", "--out", str(art)]) == 0
    capsys.readouterr()
    assert main(["run", str(art), "--image", SAMPLE, "--prompt", "Where is the red square?",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "top left"
    assert main(["run", str(art), "--image", SAMPLE, "--prompt", "Where is the red square?",
                 "--max-new-tokens", "5"]) == 2
    assert "max_new_tokens must be between 1 and 4" in capsys.readouterr().err
    assert main(["run", str(art), "--image", SAMPLE, "--prompt", "Where is the red square?",
                 "--ignore-eos", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


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
