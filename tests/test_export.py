"""Export contract (issue #3): segments, the selection op, manifest, lint, validation, refusals."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import TINY_NAMES, tiny_inputs
from feather_export.errors import FeatherError
from feather_export.export.artifact import ExportOptions, export
from feather_export.models.geometry import geometry_of
from feather_export.methods.reference import reference_generate
from feather_export.tensorrt.lint import check_artifact
from feather_export.export.validate import validate_artifact
from feather_runtime import Pipeline


def _budgets(n):
    return {"none": [None], "feather": [n // 4, n // 9, 37], "fastv": [n // 4, n // 9, 37],
            "fastervlm": [n // 4, n // 9, 37]}


CASES = [(name, method, i) for name in TINY_NAMES
         for method in ("none", "feather", "fastv", "fastervlm")
         for i in range(1 if method == "none" else 3)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_models):
    """Every (model, method, budget) artifact exported once for the module."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for name, method, i in CASES:
        n = geometry_of(tiny_models[name].config).num_image_tokens
        budget = _budgets(n)[method][i]
        stride = 0 if method == "feather" and budget == 37 else None   # grid off on one case
        path = root / f"{name}-{method}-{i}"
        export(name, path, ExportOptions(method=method, budget=budget, stride=stride),
               progress=lambda m: None)
        out[(name, method, i)] = (path, budget, stride)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_prefill_matches_reference(artifacts, tiny_models, case):
    """Kept indices identical and last-token logits within 1e-4 (fp32) of reference_generate."""
    name, method, _ = case
    path, budget, stride = artifacts[case]
    model = tiny_models[name]
    pipe = Pipeline.load(path)
    for seed in (0, 7):
        pixels, ids = tiny_inputs(model, seed, text=(5, 6, 7, 8, 9)[: 2 + seed % 4])
        got = pipe.generate_ids(pixels, ids, max_new_tokens=1)
        ref = reference_generate(model, pixels, ids, method=method, budget=budget, stride=stride,
                                 max_new_tokens=1)
        assert got.kept == ref.kept
        assert np.abs(got.first_logits - ref.first_logits.numpy()).max() < 1e-4
        assert got.token_ids == ref.token_ids


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_lint_passes_on_every_artifact(artifacts, case):
    findings = check_artifact(artifacts[case][0])
    assert [f for f in findings if f.severity == "error"] == []


def test_selection_node_once_per_prune_point_with_function_body(artifacts):
    for (name, method, i), (path, _, _) in artifacts.items():
        manifest = json.loads((path / "feather.json").read_text())
        stages = manifest["prune"]["stages"]
        selects = [s for s in manifest["segments"] if s["kind"] == "select"]
        assert len(selects) == len(stages)
        for seg in selects:
            model = onnx.load(path / seg["file"])
            nodes = [n for n in model.graph.node if n.domain == "feather"]
            assert len(nodes) == 1 and nodes[0].op_type == "SelectTokens"
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
            stage = stages[seg["stage"]]
            assert attrs["budget"] == stage["keep"] and attrs["num_image_tokens"] == stage["num_in"]
            assert attrs["plugin_namespace"] == b"feather" and attrs["plugin_version"] == b"1"
            assert [(f.domain, f.name) for f in model.functions] == [("feather", "SelectTokens")]
            assert all(n.domain == "" for n in model.functions[0].node)    # standard ops only
            # ONNX Runtime runs it with no custom-op library registered
            ort.InferenceSession(str(path / seg["file"]), providers=["CPUExecutionProvider"])


def test_decoder_segments_shared_by_prefill_and_decode(artifacts):
    """One decoder graph per span, with dynamic sequence length and cache capacity (no second copy)."""
    path = artifacts[("tiny", "feather", 0)][0]
    manifest = json.loads((path / "feather.json").read_text())
    decoders = [s for s in manifest["segments"] if s["kind"] == "decoder"]
    assert [s["layers"] for s in decoders] == [[0, 1], [1, 2], [2, 4]]
    first = decoders[0]
    shapes = {i["name"]: i["shape"] for i in first["inputs"]}
    assert shapes["inputs_embeds"] == [1, "seq", 64]
    assert shapes["past_key_values.0.key"] == [1, 4, "capacity", 16]      # static cache, heads-first
    assert shapes["past_length"] == []
    assert {o["name"] for o in first["outputs"]} == {"hidden_states", "score_query.0", "score_keys.0",
                                                    "present.0.key", "present.0.value"}
    assert len(list((path / "onnx").glob("decoder_*.onnx"))) == 3


def test_manifest_records_everything(artifacts):
    path = artifacts[("tiny-gqa", "fastv", 0)][0]
    m = json.loads((path / "feather.json").read_text())
    assert m["model"]["id"] == "tiny-gqa" and len(m["model"]["config_sha256"]) == 64
    assert m["prune"]["method"] == "fastv" and m["prune"]["stages"][0]["keep"] == 64
    assert m["max_text_tokens"] == 512 and m["opset"] <= 20
    assert set(m["tools"]) >= {"feather_export", "onnx", "torch", "transformers"}
    for seg in m["segments"]:
        assert len(seg["sha256"]) == 64 and (path / seg["file"]).is_file()
        assert all({"name", "shape", "dtype"} <= set(io) for io in seg["inputs"] + seg["outputs"])
    assert (path / "tokenizer" / "tokenizer.json").is_file()
    assert (path / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("key", [("tiny", "feather", 0), ("tiny-gqa", "fastervlm", 1),
                                 ("tiny-gqa", "fastv", 2)])
def test_validate_passes(artifacts, tiny_models, key):
    checks = validate_artifact(artifacts[key][0], model=tiny_models[key[0]])
    assert checks and all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    assert max(c.max_rel for c in checks) < 1e-4


def test_validate_catches_a_wrong_graph(artifacts, tiny_models, tmp_path):
    """Swap a weight in the ONNX file (and re-hash): validation must fail on that segment."""
    from feather_runtime.manifest import sha256_file, write_manifest

    src = artifacts[("tiny", "none", 0)][0]
    path = tmp_path / "broken"
    shutil.copytree(src, path)
    model = onnx.load(path / "onnx" / "decoder_0_4.onnx")
    init = next(t for t in model.graph.initializer if t.name == "layers.1.down_proj.weight")
    arr = onnx.numpy_helper.to_array(init) * 1.01
    init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
    onnx.save(model, path / "onnx" / "decoder_0_4.onnx")
    m = json.loads((path / "feather.json").read_text())
    for seg in m["segments"]:
        seg["sha256"] = sha256_file(path / seg["file"])
    write_manifest(path, m)
    checks = validate_artifact(path, model=tiny_models["tiny"])
    bad = {(c.segment, c.output) for c in checks if not c.ok}
    assert ("decoder_0_4", "logits") in bad


def test_fp16_export_validates_and_generates(tmp_path, tiny_models):
    model = tiny_models["tiny"]
    path = export("tiny", tmp_path / "fp16", ExportOptions(method="feather", dtype="fp16"),
                  progress=lambda m: None)
    checks = validate_artifact(path, model=model)
    assert all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    fp16 = [c for c in checks if c.output != "kept"]
    assert max(c.max_rel for c in fp16) < 1e-2
    pixels, ids = tiny_inputs(model, 0)
    got = Pipeline.load(path).generate_ids(pixels, ids, max_new_tokens=1)
    ref = reference_generate(model, pixels, ids, method="feather", max_new_tokens=1)
    overlap = [len(set(a) & set(b)) / len(b) for a, b in zip(got.kept, ref.kept)]
    assert min(overlap) >= 0.9
    scale = np.abs(ref.first_logits.numpy()).max()
    assert np.abs(got.first_logits - ref.first_logits.numpy()).max() < 2e-2 * scale


def test_bf16_export_is_valid_onnx_and_refused_by_cpu_runtime(tmp_path):
    path = export("tiny-gqa", tmp_path / "bf16", ExportOptions(method="feather", dtype="bf16"),
                  progress=lambda m: None)
    for file in sorted((path / "onnx").glob("*.onnx")):
        onnx.checker.check_model(onnx.load(file), full_check=True)
    assert [f for f in check_artifact(path) if f.severity == "error"] == []
    with pytest.raises(FeatherError, match="bf16"):
        Pipeline.load(path)


def test_trt_plugin_only_drops_the_function_body(tmp_path):
    path = export("tiny", tmp_path / "plugin", ExportOptions(method="fastv", trt_plugin_only=True),
                  progress=lambda m: None)
    model = onnx.load(path / "onnx" / "select_2.onnx")
    assert len(model.functions) == 0
    assert [n.op_type for n in model.graph.node if n.domain == "feather"] == ["SelectTokens"]
    findings = check_artifact(path)
    assert any("plugin" in f.reason and f.severity == "warning" for f in findings)


def test_external_data_above_threshold(tmp_path, monkeypatch):
    import feather_export.export.artifact as export_module

    monkeypatch.setattr(export_module, "INLINE_LIMIT", 1000)
    path = export("tiny", tmp_path / "ext", ExportOptions(method="none"), progress=lambda m: None)
    m = json.loads((path / "feather.json").read_text())
    decoder = next(s for s in m["segments"] if s["name"] == "decoder_0_4")
    assert decoder["data_files"][0]["file"] == "onnx/decoder_0_4.onnx.data"
    assert (path / "onnx" / "decoder_0_4.onnx").stat().st_size < 200_000
    pipe = Pipeline.load(path)
    assert len(pipe.generate_ids(*tiny_inputs_for("tiny"), max_new_tokens=2).token_ids) == 2


def tiny_inputs_for(name):
    from feather_export.models.tiny import TINY_MODELS

    size = TINY_MODELS[name].image_size
    n = (size // 14) ** 2
    pixels = np.zeros((1, 3, size, size), np.float32)
    return pixels, np.asarray([[1, 5] + [498] * n + [7]], np.int64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="feather", budget=0), "between 1 and 576"),
    (dict(method="fastv", budget=1000), "between 1 and 576"),
    (dict(method="feather", schedule="2:100,9:10"), "between 1 and 3"),
    (dict(method="feather", schedule="2:100,1:10"), "increase"),
    (dict(method="none", dtype="int8"), "--dtype"),
    (dict(method="none", max_text_tokens=0), "at least 1"),
])
def test_export_refuses_bad_options(tmp_path, kwargs, message):
    with pytest.raises(FeatherError, match=message):
        export("tiny", tmp_path / "out", ExportOptions(**kwargs), progress=lambda m: None)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_export_refuses_non_artifact_output_dir(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FeatherError, match="not a feather-export artifact"):
        export("tiny", out, ExportOptions(method="none"), progress=lambda m: None)
    assert (out / "notes.txt").read_text() == "mine"


def test_export_refuses_unsupported_model_type(tmp_path):
    ckpt = tmp_path / "bert"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FeatherError, match="only 'llava'"):
        export(ckpt, tmp_path / "out", ExportOptions(method="none"), progress=lambda m: None)
    with pytest.raises(FeatherError, match="does not exist"):
        export(tmp_path / "missing", tmp_path / "out", ExportOptions(), progress=lambda m: None)
