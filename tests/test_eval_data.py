"""feather-export eval --data: a user's own .jsonl (image path, question, answers), made in the test."""
import json

import pytest

from feather_export.errors import FeatherError
from feather_export.quality.evaluate import EvalOptions, evaluate
from feather_export.quality.synthetic import make_samples
from feather_export.quality.userdata import contains_match, exact_match, load_data, normalise


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Six shapes-task images saved as PNG files, their questions and answers (one answer padded
    into a sentence, so contains-match differs from exact match)."""
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    lines = []
    for i, s in enumerate(make_samples("test", 6, seed=3)):
        s.image().save(root / "img" / f"{i}.png")
        answers = [s.answer] if i % 2 else [s.answer.upper() + ".", "unused other answer"]
        lines.append(json.dumps({"image": f"img/{i}.png", "question": s.question, "answers": answers}))
    lines.insert(3, "")                                       # blank lines are skipped
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl"


def test_scoring_rules():
    assert normalise("  The  Red.  ") == "the red"
    assert exact_match("Red.", ["red"]) and not exact_match("a red one", ["red"])
    assert contains_match("a red one", ["blue", "RED"]) and not contains_match("re", ["red"])


def test_eval_on_user_data_both_engines(data_file, tmp_path):
    out = tmp_path / "o"
    res = evaluate(EvalOptions(methods=("none",), schedules=(("btp", "1:128,2:64,3:0"),
                                                             ("fastv", "1:64")),
                               data=str(data_file), out=str(out), threads=1, max_new_tokens=4),
                   progress=lambda m: None)
    assert res["n"] == 6 and [c["name"] for c in res["configs"]] == [
        "none", "btp[1:128,2:64,3:0]", "fastv[1:64]"]
    for row in res["configs"]:
        assert row["onnx_reference_agreement"] == {"token_ids": 1.0, "kept": 1.0}
        for engine, r in row["engines"].items():
            assert r["n"] == 6 and len(r["predictions"]) == 6
            assert 0 <= r["exact_match"] <= r["contains_match"] <= 1
            assert r["latency_ms_per_item"] > 0
            assert all(p["exact"] == exact_match(p["prediction"], ans) for p, ans in
                       zip(r["predictions"], [i.answers for i in load_data(data_file)]))
        assert row["engines"]["onnx"]["ttft_ms_median"] > 0
    none = res["configs"][0]["engines"]["onnx"]
    assert none["exact_match"] >= 4 / 6          # the trained tiny-shapes model answers its task
    assert res["configs"][1]["image_tokens_per_layer"] == [256, 128, 64, 0]
    saved = json.loads((out / "results.json").read_text())
    assert saved["configs"] == json.loads(json.dumps(res["configs"]))
    assert "btp[1:128,2:64,3:0]" in (out / "table.txt").read_text()


def test_eval_data_cli_prints_the_table(data_file, capsys):
    from feather_export.cli.main import main

    assert main(["eval", "--data", str(data_file), "--methods", "none", "--engine", "onnx",
                 "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 items of" in out and "exact" in out and "none" in out


@pytest.mark.parametrize("content, phrase", [
    ('{"image": "nope.png", "question": "q", "answers": ["a"]}', "does not exist"),
    ('{"image": "x.png", "question": "q", "answers": []}', "non-empty list"),
    ('{"image": "x.png", "answers": ["a"]}', "'question'"),
    ('not json', "line 1: not JSON"),
    ('', "holds no items"),
    ('{"image": "bad.png", "question": "q", "answer": "a"}', "cannot read image"),
])
def test_bad_data_files_are_one_line_user_errors(tmp_path, capsys, content, phrase):
    from PIL import Image

    from feather_export.cli.main import main

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "d.jsonl").write_text(content + "\n")
    with pytest.raises(FeatherError, match=phrase):
        load_data(tmp_path / "d.jsonl")
    assert main(["eval", "--data", str(tmp_path / "d.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0]


def test_answer_string_and_absolute_paths(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "d.jsonl").write_text(json.dumps(
        {"image": str(tmp_path / "x.png"), "question": "q?", "answer": "yes"}) + "\n")
    (item,) = load_data(tmp_path / "d.jsonl")
    assert item.answers == ("yes",) and item.line == 1 and item.image().size == (8, 8)
