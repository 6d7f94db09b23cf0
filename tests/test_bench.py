"""``feather-export bench`` on tiny artifacts: report fields, the final JSON line, speed-ups against
``none``, the step timeline, refusals, and shape-only models (a small ShapeSpec stands in for the
real geometries). No timed assertions: speed targets live in benchmarks/."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from feather_export.bench.run import (BenchOptions, decode_tokens_per_s, parse_gen_lengths,
                                      split_timeline, stats)
from feather_export.cli.bench import add_bench_parser
from feather_export.export.artifact import ExportOptions, export
from feather_runtime import FeatherError

REPEATS, WARMUP, GEN = 2, 1, (1, 3)


def _cli(argv):
    """The bench command through a tiny argparse wrapper (cli.py wires it the same way)."""
    parser = argparse.ArgumentParser(prog="feather-export")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    quiet = dict(progress=lambda m: None)
    return {
        "none": export("tiny", root / "none", ExportOptions(method="none", max_new_tokens=8),
                       **quiet),
        "feather": export("tiny", root / "feather",
                          ExportOptions(method="feather", budget=144, max_new_tokens=8), **quiet),
        "fastervlm": export("tiny", root / "fastervlm",
                            ExportOptions(method="fastervlm", budget=64, max_new_tokens=8),
                            **quiet),
        "none_fp16": export("tiny", root / "none16",
                            ExportOptions(method="none", dtype="fp16", max_new_tokens=8), **quiet),
        "gqa": export("tiny-gqa", root / "gqa", ExportOptions(method="none", max_new_tokens=8),
                      **quiet),
    }


def test_bench_cli_writes_report_table_plots_and_a_final_json_line(arts, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    argv = ["bench", str(arts["none"]), str(arts["feather"]), str(arts["fastervlm"]),
            "--repeats", str(REPEATS), "--warmup", str(WARMUP), "--gen-lengths", "1,3",
            "--json", str(report_path), "--device", "h100-sxm", "--no-verify"]
    pytest.importorskip("matplotlib")
    argv += ["--plot", str(tmp_path / "plots")]
    assert _cli(argv) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    head = json.loads(lines[-1])                                  # the last line is one object
    assert head["model"] == "tiny" and head["dtype"] == "fp32" and head["json"] == str(report_path)
    targets = {r["target"] for r in head["results"]}
    assert targets == {"feather@144/13", "fastervlm@64"}
    for r in head["results"]:
        for key in ("ttft_s", "ttft_speedup", "flops_predicted_speedup",
                    "speedup_vs_flops_prediction", "selection_share_of_prefill",
                    "decode_tokens_per_s"):
            assert r[key] is not None, key
    assert "ttft (prefill)" in out and "meas/pred" in out              # the table
    assert "repeat 2/2" in err and "warm-up" in err                    # progress
    for name in ("latency_vs_budget.png", "speedup_vs_budget.png", "decode_step_vs_cache.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000

    report = json.loads(report_path.read_text())
    assert report["machine"]["cpu"] and report["machine"]["onnxruntime"]
    assert report["device"]["key"] == "h100-sxm"
    assert len(report["samples"]) == (REPEATS + WARMUP) * 3
    sample = report["samples"][-1]
    assert {"target", "repeat", "warmup", "timings", "steps", "tokens"} <= set(sample)
    assert sample["tokens"] == 3 and len(sample["steps"]) == 2
    assert {"vision", "embed", "ttft", "selection", "decode"} <= set(sample["timings"])
    # every row carries FLOPs and measured/predicted where it has a prediction
    for row in report["rows"]:
        if row["kind"] in ("vision", "decoder", "select", "ttft", "llm_prefill"):
            assert row["flops"] is not None and row["ratio"] is not None, row
    # interleaving: the order rotates between repeats
    firsts = [s["target"] for s in report["samples"] if s["order"] == 0]
    assert len(set(firsts)) > 1


def test_speedup_is_computed_against_none_paired_by_repeat(arts, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    assert _cli(["bench", str(arts["feather"]), str(arts["none"]), "--repeats", "3",
                 "--warmup", "0", "--gen-lengths", "2", "--json", str(report_path),
                 "--device", "a100", "--no-verify"]) == 0
    capsys.readouterr()
    report = json.loads(report_path.read_text())
    runs = {(s["target"], s["repeat"]): s for s in report["samples"]}
    ratios = [runs[("none", r)]["timings"]["ttft"] / runs[("feather@144/13", r)]["timings"]["ttft"]
              for r in range(3)]
    row = next(r for r in report["rows"]
               if r["target"] == "feather@144/13" and r["row"] == "ttft (prefill)")
    assert row["speedup"] == pytest.approx(float(np.median(ratios)))
    none_row = next(r for r in report["rows"] if r["target"] == "none" and r["kind"] == "ttft")
    assert "speedup" not in none_row
    assert row["flops_speedup"] == pytest.approx(none_row["flops"] / row["flops"])


def test_bench_refuses_artifacts_that_cannot_be_compared(arts):
    from feather_export.bench.run import run_bench

    opts = BenchOptions(repeats=1, warmup=0, gen_lengths=(1,), device="h100-sxm", verify=False)
    with pytest.raises(FeatherError, match="different model"):
        run_bench([arts["none"], arts["gqa"]], opts, progress=lambda m: None)
    with pytest.raises(FeatherError, match="one precision"):
        run_bench([arts["none"], arts["none_fp16"]], opts, progress=lambda m: None)
    with pytest.raises(FeatherError, match="twice"):
        run_bench([arts["none"], arts["none"]], opts, progress=lambda m: None)
    with pytest.raises(FeatherError, match="max-new-tokens"):
        run_bench([arts["none"]], BenchOptions(repeats=1, gen_lengths=(64,), device="a100"),
                  progress=lambda m: None)


def test_cli_prints_user_errors_as_feather_errors(arts):
    with pytest.raises(FeatherError, match="gen-lengths"):
        _cli(["bench", str(arts["none"]), "--gen-lengths", "a,b"])
    with pytest.raises(FeatherError, match="repeats"):
        _cli(["bench", str(arts["none"]), "--repeats", "0"])
    with pytest.raises(FeatherError, match="unknown device"):
        _cli(["bench", str(arts["none"]), "--device", "tpu", "--repeats", "1",
              "--gen-lengths", "1"])


def test_parse_gen_lengths():
    assert parse_gen_lengths("64,1,16,16") == (1, 16, 64)
    with pytest.raises(FeatherError):
        parse_gen_lengths("0,4")


def test_split_timeline_and_decode_rate():
    # prefill: vision, embed(seq 10), decoder; then two decode steps of embed + decoder
    log = [("vision", 0.0, 1.0, None, None), ("embed", 1.0, 1.1, 10, None),
           ("decoder_0_4", 1.1, 2.0, 10, 0),
           ("embed", 2.1, 2.2, 1, None), ("decoder_0_4", 2.2, 2.5, 1, 10),
           ("embed", 2.6, 2.7, 1, None), ("decoder_0_4", 2.7, 3.0, 1, 11)]
    end, steps = split_timeline(log, prompt_len=10)
    assert end == 2.0
    assert [s["past"] for s in steps] == [10, 11]
    assert [round(s["seconds"], 6) for s in steps] == [0.5, 0.5]
    assert steps[1]["spans"] == {"decoder_0_4": 11}
    assert decode_tokens_per_s(steps, 3) == pytest.approx(2 / 1.0)
    assert decode_tokens_per_s(steps, 1) is None and decode_tokens_per_s(steps, 5) is None


def test_stats():
    s = stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["median"] == 3.0 and s["p10"] == pytest.approx(1.4) and s["q3"] == 4.0
    assert stats([]) is None


def test_shape_models_export_and_generate_exactly_the_tokens_asked(tmp_path, monkeypatch):
    from feather_export.export.shapes import export_shape_artifacts
    from feather_export.models import shapes
    from feather_export.bench.perf_model import shape_from_manifest
    from feather_runtime import Pipeline
    from feather_runtime.manifest import load_manifest

    spec = shapes.ShapeSpec("test shape", image_size=56, patch_size=14, vision_hidden=32,
                            vision_intermediate=64, vision_layers=3, vision_heads=2, hidden=64,
                            layers=4, heads=4, kv_heads=2, intermediate=96, vocab=600)
    monkeypatch.setitem(shapes.SHAPE_MODELS, "shape-test", spec)
    outs = export_shape_artifacts(
        "shape-test", [(tmp_path / "none", ExportOptions(method="none", max_new_tokens=8)),
                       (tmp_path / "f", ExportOptions(method="feather", budget=8,
                                                      max_new_tokens=8))],
        progress=lambda m: None)
    manifest = load_manifest(outs[1])
    assert manifest["model"]["id"] == "shape-test" and manifest["model"]["eos_token_ids"] == []
    shape = shape_from_manifest(manifest)
    assert (shape.vision.layers, shape.vision.hidden, shape.llm.kv_heads) == (2, 32, 2)
    pipe = Pipeline.load(outs[1])
    pixels = np.zeros((1, 3, 56, 56), np.float32)
    ids = pipe.prompt_builder.build("Describe the image.", 16)
    res = pipe.generate_ids(pixels, ids, 6)
    assert len(res.token_ids) == 6 and [len(k) for k in res.kept] == [8, 1]


def test_shape_configs_have_the_documented_geometry():
    from feather_export.models.shapes import SHAPE_MODELS, shape_llava_config

    cfg = shape_llava_config("shape-llava-1.5-13b")
    assert (cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size,
            cfg.text_config.intermediate_size) == (40, 5120, 13824)
    assert cfg.vision_config.num_hidden_layers == 24 and cfg.vision_feature_layer == -2
    assert SHAPE_MODELS["shape-llava-1b"].num_image_tokens == 576
    with pytest.raises(FeatherError, match="unknown shape"):
        shape_llava_config("shape-nope")


@pytest.mark.parametrize("method", ["none", "feather", "fastv", "fastervlm"])
def test_gpu_script_torch_segments_match_the_reference(tiny_models, method):
    """benchmarks/gpu_torch.py (the GPU fallback) runs the same computation as the reference:
    checked here on CPU, fp32, token for token."""
    import sys
    from pathlib import Path

    from feather_export.methods.config import PruneConfig
    from feather_export.models.geometry import geometry_of
    from feather_export.methods.reference import reference_generate
    from feather_export.models.tokenizer import build_tiny_tokenizer
    from feather_runtime.prompt import PromptBuilder

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_torch import TorchSegments

    model = tiny_models["tiny-gqa"]
    geo = geometry_of(model.config)
    ids = PromptBuilder(build_tiny_tokenizer()).build("Where is the red square?",
                                                      geo.num_image_tokens)
    size = model.config.vision_config.image_size
    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    cfg = (PruneConfig.create(method, geo) if method == "none"
           else PruneConfig.create(method, geo, budget=geo.num_image_tokens // 4))
    timings, steps, tokens = TorchSegments(model, "cpu").generate(cfg, pixels, ids, 6,
                                                                  geo.grid_side)
    assert tokens == reference_generate(model, pixels, ids, config=cfg,
                                        max_new_tokens=6).token_ids
    assert len(steps) == 5 and timings["ttft"] > 0
    assert set(timings) >= {"vision", "embed", "ttft", "selection", "decode"}


def test_ort_config_and_threads_reach_the_sessions(arts, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    assert _cli(["bench", str(arts["none"]), "--repeats", "1", "--warmup", "0",
                 "--gen-lengths", "2", "--device", "a100", "--no-verify", "--threads", "1",
                 "--ort-config", "session.intra_op.allow_spinning=0",
                 "--json", str(report_path)]) == 0
    capsys.readouterr()
    report = json.loads(report_path.read_text())
    assert report["options"]["ort_config"] == {"session.intra_op.allow_spinning": "0"}
    assert report["machine"]["ort_intra_op_threads"] == 1
    assert report["contention"]["process_cpu_per_wall_s"]["n"] == 1
    with pytest.raises(FeatherError, match="KEY=VALUE"):
        _cli(["bench", str(arts["none"]), "--ort-config", "nonsense", "--gen-lengths", "1"])


def test_cache_sweep_compares_decode_cost_per_cached_token(arts, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    assert _cli(["bench", str(arts["none"]), str(arts["feather"]), "--repeats", "1",
                 "--warmup", "0", "--gen-lengths", "2", "--device", "a100", "--no-verify",
                 "--cache-sweep", "16,64,256", "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    sweep = report["per_target"]["feather@144/13"]["cache_sweep"]
    assert sweep["lengths"] == [16, 64, 256]
    assert set(sweep["spans"]) == {"decoder_0_1", "decoder_1_2", "decoder_2_4"}
    assert len(sweep["measured_s"]) == 3 and sweep["predicted_s"][2] > sweep["predicted_s"][0]
    assert sweep["ok"] in (True, False) and "decode step vs cache length" in out
    head = json.loads(out.strip().splitlines()[-1])
    assert "decode_cache_cost_over_attention_term" in head["results"][0]
    with pytest.raises(FeatherError, match="--cache-sweep"):
        _cli(["bench", str(arts["none"]), "--cache-sweep", "x", "--gen-lengths", "1"])


def test_decode_rows_of_a_model_that_stops_at_eos(tmp_path, capsys):
    """tiny-shapes answers in a few tokens: decode rows it never reached say "not measured"
    (no rate, no prediction, no slope); --ignore-eos measures them."""
    art = export("tiny-shapes", tmp_path / "shapes",
                 ExportOptions(method="feather", max_new_tokens=16), progress=lambda m: None)
    argv = ["bench", str(art), "--repeats", "2", "--warmup", "0", "--gen-lengths", "1,16",
            "--device", "h100-sxm", "--no-verify", "--json", str(tmp_path / "r.json")]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    row = next(r for r in report["rows"] if r["row"] == "decode tok/s @16")
    assert row["n"] == 0 and "median" not in row and "predicted_tokens_per_s" not in row
    assert "--ignore-eos" in row["not_measured"]
    assert "not measured" in out and "t/s" not in out.split("decode tok/s @16")[1].splitlines()[0]
    assert all(s["tokens"] < 16 for s in report["samples"])
    assert report["per_target"]["feather@64/6"]["decode_scaling"] is None

    assert _cli(argv + ["--ignore-eos"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "r.json").read_text())
    row = next(r for r in report["rows"] if r["row"] == "decode tok/s @16")
    assert row["n"] == 2 and row["median"] > 0 and "not_measured" not in row
    assert all(s["tokens"] == 16 for s in report["samples"])
