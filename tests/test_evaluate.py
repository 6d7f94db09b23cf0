"""The quality evaluator: the committed tiny-shapes checkpoint answers; the plumbing on a random model."""
import json

import numpy as np
import pytest

from feather_export.errors import FeatherError
from feather_export.quality.evaluate import (EvalConfig, EvalOptions, Prediction, accuracy_table,
                                             default_budgets, evaluate, format_table, is_correct,
                                             kept_diagnostics,
                                             object_patches, parse_budgets, parse_engines,
                                             parse_methods, parse_schedules, patch_band,
                                             plan_configs)
from feather_export.models.checkpoint import TINY_SHAPES_DIR as DEFAULT_MODEL_DIR
from feather_export.quality.synthetic import make_samples


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A randomly initialised model of the tiny-shapes architecture on an 8 x 8 grid (fast)."""
    from feather_export.quality.train import ModelSpec, save_untrained

    spec = ModelSpec(image_size=112, patch_size=14, vision_hidden=32, hidden=32, intermediate=64)
    return save_untrained(tmp_path_factory.mktemp("rand") / "model", spec, seed=1)


def test_committed_checkpoint_answers_the_test_split():
    assert (DEFAULT_MODEL_DIR / "model.safetensors").is_file(), "the trained checkpoint is committed"
    res = evaluate(EvalOptions(methods=("none",), n=12, engines=("onnx", "reference"), threads=1),
                   progress=lambda m: None)
    (row,) = res["configs"]
    for engine in ("onnx", "reference"):
        assert row["engines"][engine]["all"]["accuracy"] >= 10 / 12
    assert row["onnx_reference_agreement"]["token_ids"] == 1.0


def test_plumbing_every_method_both_engines_and_outputs(random_model, tmp_path):
    out = tmp_path / "eval"
    res = evaluate(EvalOptions(model=str(random_model), budgets=(16, 8), n=4, out=str(out),
                               overlays=2, threads=1), progress=lambda m: None)
    assert [c["name"] for c in res["configs"]] == [
        "none", "feather@16", "feather@8", "fastv@16", "fastv@8", "fastervlm@16", "fastervlm@8"]
    assert res["num_image_tokens"] == 64 and res["n"] == 4
    for row in res["configs"]:
        # the exported artifact and the PyTorch reference generate the same tokens and keep the same set
        assert row["onnx_reference_agreement"] == {"token_ids": 1.0, "kept": 1.0}
        for r in row["engines"].values():
            assert r["all"]["n"] == 4 and 0 <= r["all"]["accuracy"] <= 1
            if row["method"] != "none":
                assert abs(sum(r["kept_share_by_band"].values()) - 1) < 1e-6
    saved = json.loads((out / "results.json").read_text())
    assert saved["configs"] == json.loads(json.dumps(res["configs"]))
    assert (out / "accuracy_vs_budget.png").stat().st_size > 1000
    assert "feather@16" in (out / "table.txt").read_text()
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 2 * len(res["configs"])
    for config in res["configs"]:           # two examples per configuration, named by config
        stem = config["name"].replace("@", "_b")
        assert sum(name.startswith(f"{stem}_ex") for name in overlays) == 2, (stem, overlays)
    from PIL import Image

    with Image.open(out / "overlays" / next(n for n in overlays if n.startswith("fastv_b8_ex0"))) as im:
        assert im.width > im.height          # the input panel and the stage's panel side by side


def test_default_budgets_are_llava_fractions():
    assert default_budgets(576) == (144, 64, 32)
    assert default_budgets(256) == (64, 28, 14)


def test_plan_configs_validates_against_the_model():
    from feather_export.models.geometry import ModelGeometry

    geo = ModelGeometry(4, 256, 16)
    configs = plan_configs(("fastv", "none"), (64, 14), geo)
    assert configs == [EvalConfig("none", None), EvalConfig("fastv", 64), EvalConfig("fastv", 14)]
    with pytest.raises(FeatherError, match="fastv@300"):
        plan_configs(("fastv",), (300,), geo)
    configs = plan_configs(("none",), (64,), geo, (("fastv", "1:26"), ("feather", "1:40,3:9")))
    assert [c.name for c in configs] == ["none", "fastv[1:26]", "feather[1:40,3:9]"]
    assert configs[1] == EvalConfig("fastv", 26, "1:26")            # budget = the first keep
    assert configs[2].file_name == "feather_s1-40_3-9"
    with pytest.raises(FeatherError, match=r"fastv\[9:10\]"):
        plan_configs((), (64,), geo, (("fastv", "9:10"),))
    # BTP: its default schedule once (refused on 4 layers, with a schedule to use), or a schedule
    with pytest.raises(FeatherError, match=r"btp: .*--schedule 1:128,2:64,3:0"):
        plan_configs(("btp",), (64, 14), geo)
    assert plan_configs(("btp",), (64,), ModelGeometry(8, 256, 16)) == [EvalConfig("btp", 128)]
    assert plan_configs((), (64,), geo, (("btp", "1:128,2:64,3:0"),)) == [
        EvalConfig("btp", 128, "1:128,2:64,3:0")]


def test_schedule_parsing():
    assert parse_schedules(["feather=1:136", "feather = 1:40, 3:9", "feather=1:136"]) == (
        ("feather", "1:136"), ("feather", "1:40,3:9"))
    assert parse_schedules(None) == ()
    assert parse_schedules(["btp=1:128,2:64,3:0"]) == (("btp", "1:128,2:64,3:0"),)
    for bad in ("feather", "none=1:3", "magic=1:3", "feather="):
        with pytest.raises(FeatherError, match="METHOD=LAYER:KEEP"):
            parse_schedules([bad])


@pytest.mark.parametrize("call", [lambda: parse_methods("feather,magic"), lambda: parse_methods(" , "),
                                  lambda: parse_budgets("64,x"), lambda: parse_budgets("0"),
                                  lambda: parse_engines("trt")])
def test_bad_option_strings_are_user_errors(call):
    with pytest.raises(FeatherError):
        call()


def test_option_parsing():
    assert parse_methods("FastV, none,fastv") == ("fastv", "none")
    assert parse_budgets("64, 28,64") == (64, 28)
    assert parse_engines("both") == ("onnx", "reference")


def test_scoring_helpers():
    samples = make_samples("test", 40)
    assert all(is_correct(s, f" {s.answer}. ") for s in samples)
    assert not is_correct(samples[0], samples[0].answer + " x")
    table = accuracy_table(samples, [s.qtype != "count" for s in samples])
    assert table["by_type"]["count"]["accuracy"] == 0.0 and table["by_type"]["where"]["accuracy"] == 1.0
    assert sum(v["n"] for v in table["by_type"].values()) == 40
    assert sum(v["n"] for v in table["by_band"].values()) == sum(s.band is not None for s in samples)
    assert [patch_band(i, 16) for i in (0, 5 * 16, 6 * 16, 10 * 16, 11 * 16, 255)] == \
        ["top", "middle", "middle", "middle", "bottom", "bottom"]
    for s in samples:
        if s.target is not None:
            patches = object_patches(s, 16)
            rows = {p // 16 for p in patches}
            obj = s.scene.objects[s.target]
            assert obj.cy // 14 in rows and {obj.cx // 14} <= {p % 16 for p in patches}


def test_kept_diagnostics_shift_past_a_cls_image_token():
    """With a CLS before the raster (raster_offset 1), image token i is patch i - 1 and the CLS
    lies in no band: the same patches give the same survival, shares count the CLS as kept."""
    samples = [s for s in make_samples("test", 40) if s.target is not None][:3]
    patches = [sorted(object_patches(s, 16))[:2] + [255] for s in samples]
    plain = kept_diagnostics(samples, [Prediction("", [], [p]) for p in patches], 16)
    full = kept_diagnostics(samples, [Prediction("", [], [[0] + [i + 1 for i in p]]) for p in patches],
                            16, raster_offset=1)
    assert full["object_kept_by_band"] == plain["object_kept_by_band"]
    assert all(v is None or v == 1.0 for v in full["object_kept_by_band"].values())
    for band, share in plain["kept_share_by_band"].items():
        assert abs(full["kept_share_by_band"][band] - share * 3 / 4) < 1e-12
    assert full["last_stage_kept"] == 4


def test_eval_through_the_feather_export_cli(random_model, tmp_path, capsys):
    from feather_export.cli.main import main

    assert main(["eval", "--model", str(random_model), "--methods", "none,fastv", "--budgets", "8",
                 "--n", "2", "--engine", "reference", "--out", str(tmp_path / "o"), "--overlays", "0",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "fastv@8" in printed and "reference" in printed
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["command"].startswith("feather-export eval ")
    assert [c["name"] for c in results["configs"]] == ["none", "fastv@8"]
    assert not np.any([p.name == "overlays" for p in (tmp_path / "o").iterdir()])


def test_eval_schedules_both_engines(random_model, tmp_path, capsys):
    """Explicit schedules go through export and the reference alike (same tokens, same kept sets),
    are costed from their own stages, named in the table and skipped by the budget plot."""
    from feather_export.cli.main import main

    assert main(["eval", "--model", str(random_model), "--methods", "none,fastv", "--budgets", "8",
                 "--schedule", "feather=1:24,2:6", "--schedule", "fastv=1:10", "--n", "3",
                 "--out", str(tmp_path / "o"), "--overlays", "1", "--threads", "1"]) == 0
    assert "feather[1:24,2:6]" in capsys.readouterr().out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["schedules"] == ["feather=1:24,2:6", "fastv=1:10"]
    rows = {c["name"]: c for c in results["configs"]}
    assert list(rows) == ["none", "fastv@8", "feather[1:24,2:6]", "fastv[1:10]"]
    for row in rows.values():
        assert row["onnx_reference_agreement"] == {"token_ids": 1.0, "kept": 1.0}
    assert rows["feather[1:24,2:6]"]["image_tokens_per_layer"] == [64, 24, 6, 6]
    assert rows["fastv[1:10]"]["image_tokens_per_layer"] == [64, 10, 10, 10]
    assert rows["fastv[1:10]"]["budget"] == 10 and rows["fastv[1:10]"]["schedule"] == "1:10"
    names = sorted(p.name for p in (tmp_path / "o" / "overlays").iterdir())
    assert any(n.startswith("feather_s1-24_2-6_ex0") for n in names), names


@pytest.mark.parametrize("argv, phrase", [(["--methods", "none,magic"], "unknown method"),
                                          (["--methods", "btp"], "--schedule 1:32,2:16,3:0"),
                                          (["--schedule", "fastv"], "METHOD=LAYER:KEEP"),
                                          (["--budgets", "64,x"], "not a comma-separated list"),
                                          (["--n", "0"], "--n must be a positive integer")])
def test_eval_cli_user_errors_are_one_line(random_model, capsys, argv, phrase):
    from feather_export.cli.main import main

    assert main(["eval", "--model", str(random_model), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("feather-export: error:") and phrase in err[0]


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(FeatherError):
        evaluate(EvalOptions(model=str(tmp_path / "nope"), n=1), progress=lambda m: None)


def test_format_table_marks_empty_cells():
    from feather_export.quality.evaluate import BANDS

    row = {"name": "none", "method": "none", "budget": None, "engines": {"onnx": {
        "all": {"accuracy": 0.5, "n": 2},
        "by_type": {t: {"accuracy": None, "n": 0} for t in ("colour", "count", "where")},
        "by_band": {b: {"accuracy": None, "n": 0} for b in BANDS}, "seconds": 0.1}}}
    text = format_table({"n": 2, "split": "test", "num_image_tokens": 64, "budget_note": "x",
                         "configs": [row]})
    assert " 50.0 " in text and "  -  " in text
