"""BTP through the ONNX artifacts (docs/design.md §4): kept indices and tokens equal the PyTorch reference on
both tiny configs, default and explicit schedules (one ending in 0); the select graphs pass the
TensorRT 10.3 lint and validation; the function body equals the numpy oracle on hand-made inputs."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import tiny_inputs
from feather_export.errors import FeatherError
from feather_export.export.artifact import ExportOptions, export
from feather_export.export.validate import validate_artifact
from feather_export.methods.reference import reference_generate
from feather_export.methods.selection import btp_select, farthest_point_seed
from feather_export.onnx.btp_op import balanced_function, balanced_node, seed_priority
from feather_export.onnx.graph import GraphBuilder
from feather_export.tensorrt.lint import check_artifact
from feather_runtime import Pipeline

# (model, schedule, lambda): None = the default schedule (tiny's 4 layers refuse it: tested below)
CASES = [("tiny-gqa", None, None), ("tiny-gqa", "2:100,5:40", "0.5"),
         ("tiny-gqa", "1:200,3:90,6:0", "0.3,0.9"),
         ("tiny", "1:288,2:144,3:0", None), ("tiny", "1:300,3:17", "0,1"), ("tiny", "2:96", "1.0")]


def _id(case):
    return f"{case[0]}-{case[1] or 'default'}-{case[2] or 'lambda-default'}"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("btp")
    out = {}
    for i, (name, schedule, lam) in enumerate(CASES):
        out[CASES[i]] = export(name, root / f"btp-{i}",
                               ExportOptions(method="btp", schedule=schedule, btp_lambda=lam),
                               progress=lambda m: None)
    return out


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_generation_matches_reference(artifacts, tiny_models, case):
    name, schedule, lam = case
    model = tiny_models[name]
    pipe = Pipeline.load(artifacts[case])
    for seed in (0, 7):
        pixels, ids = tiny_inputs(model, seed, text=(5, 6, 7, 8, 9)[: 2 + seed % 4])
        got = pipe.generate_ids(pixels, ids, max_new_tokens=4)
        ref = reference_generate(model, pixels, ids, method="btp", schedule=schedule,
                                 btp_lambda=lam, max_new_tokens=4)
        assert got.kept == ref.kept
        assert got.token_ids == ref.token_ids
        assert np.abs(got.first_logits - ref.first_logits.numpy()).max() < 1e-4
        assert [len(k) for k in got.kept] == [s.keep for s in pipe_stages(pipe)]


def pipe_stages(pipe):
    from feather_export.methods.config import PruneConfig

    return PruneConfig.from_dict(pipe.manifest["prune"]).stages


def test_default_schedule_on_tiny_gqa_and_refusal_on_tiny(artifacts, tmp_path):
    m = json.loads((artifacts[CASES[0]] / "feather.json").read_text())
    assert [(s["layer"], s["keep"]) for s in m["prune"]["stages"]] == [(1, 128), (2, 64), (4, 21), (6, 0)]
    with pytest.raises(FeatherError, match="--schedule 1:288,2:144,3:0"):
        export("tiny", tmp_path / "x", ExportOptions(method="btp"), progress=lambda m: None)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_lint_and_validation(artifacts, tiny_models, case):
    assert [f for f in check_artifact(artifacts[case]) if f.severity == "error"] == []
    checks = validate_artifact(artifacts[case], model=tiny_models[case[0]])
    assert checks and all(c.ok for c in checks), [c.line() for c in checks if not c.ok]


def test_span_after_a_zero_count_stage_carries_no_image_tokens(artifacts):
    path = artifacts[("tiny", "1:288,2:144,3:0", None)]
    m = json.loads((path / "feather.json").read_text())
    select3 = next(s for s in m["segments"] if s["name"] == "select_3")
    assert {i["name"] for i in select3["inputs"]} == {"hidden_states", "position_ids", "image_start"}
    decoder = next(s for s in m["segments"] if s["name"] == "decoder_2_3")
    assert not any(o["name"].startswith("score_") for o in decoder["outputs"])
    sess = ort.InferenceSession(str(path / select3["file"]), providers=["CPUExecutionProvider"])
    hidden = np.random.default_rng(0).standard_normal((1, 3 + 144 + 4, 64)).astype(np.float32)
    pos = np.arange(151, dtype=np.int64)[None] * 3
    kept, h, p = sess.run(None, {"hidden_states": hidden, "position_ids": pos,
                                 "image_start": np.asarray(3, np.int64)})
    rows = [0, 1, 2, 147, 148, 149, 150]
    assert kept.shape == (0,) and h.shape == (1, 7, 64) and np.array_equal(h[0], hidden[0, rows])
    assert p[0].tolist() == [r * 3 for r in rows]


def test_one_balanced_op_per_scored_stage_with_a_standard_body(artifacts):
    path = artifacts[("tiny-gqa", "1:200,3:90,6:0", "0.3,0.9")]
    m = json.loads((path / "feather.json").read_text())
    for seg in (s for s in m["segments"] if s["kind"] == "select"):
        model = onnx.load(path / seg["file"])
        feather = [n for n in model.graph.node if n.domain == "feather"]
        if seg["name"] == "select_6":
            assert feather == [] and model.functions == []
            continue
        assert [n.op_type for n in feather] == ["SelectBalanced"]
        assert [(f.domain, f.name) for f in model.functions] == [("feather", "SelectBalanced")]
        assert all(n.domain == "" for n in model.functions[0].node)
        assert [n.op_type for n in model.functions[0].node].count("Loop") == 1


# ---- the op on hand-made inputs -------------------------------------------------------------------

def _session(n, d, keep, m, pool, fill="loop"):
    g = GraphBuilder("btp")
    for name, t, shape in (("logits", 1, [n]), ("features", 1, [n, d]), ("seed", 1, [n]),
                           ("hidden", 1, [1, "S", d]), ("position_ids", 7, [1, "S"]),
                           ("image_start", 7, [])):
        g.input(name, t, shape)
    balanced_node(g, "logits", "features", "seed", "hidden", "position_ids", "image_start",
                  budget=keep, num_image_tokens=n, attention_count=m, candidate_count=pool,
                  outputs=["kept", "h", "p"], name="btp")
    g.outputs += [helper.make_tensor_value_info("kept", 7, [keep]),
                  helper.make_tensor_value_info("h", 1, [1, "S2", d]),
                  helper.make_tensor_value_info("p", 7, [1, "S2"])]
    model = g.model([balanced_function(fill, keep - m)])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _op_cases():
    rng = np.random.default_rng(3)
    # name, logits, features, keep, m, pool, seed
    yield "random", rng.standard_normal(64), rng.standard_normal((64, 8)), 20, 6, 22, farthest_point_seed(8, 10)
    yield "no-seed", rng.standard_normal(64), rng.standard_normal((64, 8)), 20, 6, 22, []
    yield "empty-a", rng.standard_normal(64), rng.standard_normal((64, 8)), 9, 0, 0, []
    yield "empty-a-seed", rng.standard_normal(64), rng.standard_normal((64, 8)), 9, 0, 0, [5, 3, 60]
    yield "all-a", rng.standard_normal(64), rng.standard_normal((64, 8)), 12, 12, 14, []
    yield "logit-ties", np.round(rng.random(64) * 3), rng.standard_normal((64, 8)), 16, 8, 29, []
    # exact ties in D: +-1 entries (norm 2) make every unit vector and dot product exact in fp32,
    # whatever the summation order (near-ties of general values depend on rounding, as in TopK)
    signs = np.array([[1 - 2 * ((k >> b) & 1) for b in range(4)] for k in range(8)], np.float32)
    yield "duplicate-features", rng.standard_normal(64), np.repeat(signs, 8, axis=0), 24, 3, 11, []
    yield "tied-features", np.zeros(64), np.tile(signs, (8, 1)), 30, 2, 5, []
    yield "zero-row", rng.standard_normal(16), np.vstack([np.zeros((1, 4)), rng.standard_normal((15, 4))]), 6, 1, 3, []
    yield "keep-all", rng.standard_normal(16), rng.standard_normal((16, 4)), 16, 4, 14, [0, 15]


@pytest.mark.parametrize("fill", ["loop", "unrolled"])
@pytest.mark.parametrize("case", list(_op_cases()), ids=lambda c: c[0])
def test_function_body_matches_oracle(case, fill):
    _, logits, features, keep, m, pool, seed = case
    logits, features = logits.astype(np.float32), features.astype(np.float32)
    n, d = features.shape
    sess = _session(n, d, keep, m, pool, fill)
    start, seq = 2, 2 + n + 3
    hidden = np.random.default_rng(1).standard_normal((1, seq, d)).astype(np.float32)
    hidden[0, start:start + n] = features
    pos = np.arange(seq, dtype=np.int64)[None] * 2
    kept, h, p = sess.run(None, {"logits": logits, "features": features,
                                 "seed": seed_priority(n, seed), "hidden": hidden,
                                 "position_ids": pos, "image_start": np.asarray(start, np.int64)})
    expected = btp_select(logits, features, keep, m, pool, np.asarray(seed, np.int64))
    assert kept.tolist() == expected.tolist()
    rows = np.concatenate([np.arange(start), start + expected, np.arange(start + n, seq)])
    assert np.array_equal(h[0], hidden[0, rows]) and np.array_equal(p[0], pos[0, rows])


def test_fp16_artifact_validates_and_keeps_nearly_the_same_tokens(tmp_path, tiny_models):
    model = tiny_models["tiny-gqa"]
    path = export("tiny-gqa", tmp_path / "fp16", ExportOptions(method="btp", dtype="fp16"),
                  progress=lambda m: None)
    checks = validate_artifact(path, model=model)
    assert all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    pixels, ids = tiny_inputs(model, 0)
    got = Pipeline.load(path).generate_ids(pixels, ids, max_new_tokens=1)
    ref = reference_generate(model, pixels, ids, method="btp", max_new_tokens=1)
    assert [len(k) for k in got.kept] == [len(k) for k in ref.kept] == [128, 64, 21, 0]
    assert min(len(set(a) & set(b)) / len(b) for a, b in zip(got.kept[:3], ref.kept[:3])) >= 0.9


def test_plugin_only_export_keeps_the_op_without_a_body(tmp_path):
    path = export("tiny", tmp_path / "p", ExportOptions(method="btp", schedule="1:288,2:0",
                                                        trt_plugin_only=True), progress=lambda m: None)
    model = onnx.load(path / "onnx" / "select_1.onnx")
    assert len(model.functions) == 0
    assert [n.op_type for n in model.graph.node if n.domain == "feather"] == ["SelectBalanced"]
    findings = check_artifact(path)
    assert any("plugin" in f.reason and f.severity == "warning" for f in findings)
