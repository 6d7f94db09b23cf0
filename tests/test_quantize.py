"""Weight-only quantization: the numpy quantizer, the graph form, ONNX Runtime on it."""
import numpy as np
import pytest

from feather_export.errors import FeatherError
from feather_export.onnx.quantize import (WeightQuant, pack_int4, quantize, stored_bytes,
                                          unpack_int4)


def test_int8_exact_round_trip_on_a_representable_weight():
    # column j: codes times a power-of-two scale, each column reaching +-127 -> dequantizes exactly
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, size=(10, 6)).astype(np.int8)
    codes[3] = 127                                   # every column's absmax is 127
    scale = np.float32(2.0) ** -np.arange(6, dtype=np.float32)
    w = codes.astype(np.float32) * scale
    qw = quantize(w, "int8")
    assert qw.block is None and qw.scales.shape == (6,) and qw.scales.dtype == np.float32
    np.testing.assert_array_equal(qw.codes, codes)
    np.testing.assert_array_equal(qw.scales, scale)
    np.testing.assert_array_equal(qw.dequantize(), w)


def test_int4_blocks_and_a_short_last_block():
    # K = 40, block 16 -> blocks rows [0,16), [16,32), [32,40): the last one is short
    k, n = 40, 4
    codes = np.tile(np.array([[-7], [3], [7], [0], [-1]], np.int8), (8, n))
    scale = np.array([[0.5, 1, 2, 4], [0.25, 0.5, 1, 2], [8, 8, 8, 8]], np.float32)
    w = codes.astype(np.float32) * np.repeat(scale, 16, axis=0)[:k]
    qw = quantize(w, "int4", block_size=16)
    assert qw.block == 16 and qw.scales.shape == (3, n)
    np.testing.assert_array_equal(qw.codes, codes)
    np.testing.assert_array_equal(qw.scales, scale)
    np.testing.assert_array_equal(qw.dequantize(), w)


def test_block_edges_are_independent():
    # one large value in block 1 must not change block 0's scale
    w = np.full((32, 1), 0.7, np.float32)
    w[16] = 70.0
    qw = quantize(w, "int4", block_size=16)
    np.testing.assert_allclose(qw.scales[:, 0], [0.1, 10.0], rtol=1e-6)
    np.testing.assert_array_equal(qw.codes[:16, 0], 7)
    np.testing.assert_array_equal(qw.codes[16:, 0], [7] + [0] * 15)


def test_block_capped_at_the_input_width():
    w = np.linspace(-1, 1, 48 * 3, dtype=np.float32).reshape(48, 3)
    qw = quantize(w, "int4", block_size=128)
    assert qw.block == 128 and qw.scales.shape == (1, 3)     # one block: the whole width
    np.testing.assert_allclose(qw.scales[0], np.abs(w).max(axis=0) / 7)


def test_round_to_nearest_error_bound_and_symmetry():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    for kind, qmax in (("int8", 127), ("int4", 7)):
        qw = quantize(w, kind, block_size=64)
        assert qw.codes.min() >= -qmax and qw.codes.max() <= qmax      # -128 / -8 never used
        step = np.repeat(qw.scales, 64, axis=0) if qw.block else qw.scales[None, :]
        assert np.all(np.abs(qw.dequantize() - w) <= step / 2 * (1 + 1e-6))
    # symmetric: negating the weight negates the codes, same scales
    a, b = quantize(w, "int4", 64), quantize(-w, "int4", 64)
    np.testing.assert_array_equal(a.codes, -b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)


def test_ties_round_to_even_like_quantize_linear():
    w = np.array([[7.0], [0.5], [1.5], [2.5], [-0.5]], np.float32)   # scale 1: ties at .5
    np.testing.assert_array_equal(quantize(w, "int4", 16).codes[:, 0], [7, 0, 2, 2, 0])


def test_zero_blocks_and_fp16_scales():
    w = np.zeros((32, 2), np.float32)
    w[20:, 1] = 0.3
    qw = quantize(w, "int4", block_size=16, scale_dtype=np.float16)
    assert qw.scales.dtype == np.float16
    np.testing.assert_array_equal(qw.scales[0], [1, 1])               # all-zero blocks: scale 1
    np.testing.assert_array_equal(qw.dequantize()[:20], 0)
    # codes are rounded against the stored fp16 scale: error within half a stored step
    step = np.float32(qw.scales[1, 1])
    assert np.all(np.abs(qw.dequantize()[16:, 1] - w[16:, 1]) <= step / 2)


def test_bad_input_refused():
    with pytest.raises(FeatherError, match="power of two"):
        quantize(np.ones((64, 2), np.float32), "int4", block_size=48)
    with pytest.raises(FeatherError, match="not one of"):
        quantize(np.ones((4, 2), np.float32), "int3")
    with pytest.raises(FeatherError, match="2-D"):
        quantize(np.ones(4, np.float32), "int8")
    with pytest.raises(FeatherError, match="NaN"):
        quantize(np.array([[np.nan, 1.0]], np.float32), "int8")


def test_int4_packing_round_trip_and_layout():
    codes = np.array([-7, 7, -1, 0, 3], np.int8)
    raw = pack_int4(codes)
    assert raw[0] == (0x9 | (0x7 << 4))              # -7 = 0b1001 low nibble first, 7 high
    assert len(raw) == 3
    np.testing.assert_array_equal(unpack_int4(raw, 5), codes)


def test_stored_bytes():
    assert stored_bytes("int8", 256, 64, 128, 4) == 256 * 64 + 64 * 4
    assert stored_bytes("int4", 256, 64, 128, 2) == 256 * 64 // 2 + 2 * 64 * 2
    assert stored_bytes("int4", 48, 3, 128, 4) == 48 * 3 // 2 + 1 * 3 * 4


def _linear_graph(k, n, quant, et=1):
    """x [2, K] @ W^T through ``linear`` with a real torch Linear."""
    import torch

    from feather_export.models.weights import TensorWeights
    from feather_export.onnx.graph import OPSET, QUANT_OPSET, GraphBuilder
    from feather_export.onnx.layers import linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=True)
    w = TensorWeights({f"lin.{name}": t for name, t in lin.state_dict().items()})
    g = GraphBuilder("lin", OPSET if quant is None else QUANT_OPSET)
    x = g.input("x", et, [2, k])
    g.output(linear(g, x, w, "lin", "proj", et, quant), "y", et, [2, n])
    return g.model(), lin


@pytest.mark.parametrize("kind,k", [("int8", 64), ("int4", 64), ("int4", 176), ("int4", 48)])
def test_graph_form_runs_in_onnx_runtime_and_equals_the_dequantized_weight(kind, k):
    import onnx
    import onnxruntime as ort
    import torch

    quant = WeightQuant(kind, 32 if k == 176 else 128)
    model, lin = _linear_graph(k, 24, quant)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 21 and model.ir_version == 10
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and dq[0].output[0] == "proj.weight"
    attrs = {a.name: a.i for a in dq[0].attribute}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert matmul.input[1] == "proj.weight"          # DequantizeLinear feeds the MatMul directly
    inits = {t.name: t for t in model.graph.initializer}
    codes = inits["proj.weight_quantized"]
    assert codes.data_type == (3 if kind == "int8" else 22) and list(codes.dims) == [k, 24]
    if kind == "int8":
        assert attrs == {"axis": 1}
    else:
        assert attrs == {"axis": 0, "block_size": quant.block_size}
        assert len(codes.raw_data) == k * 24 // 2                      # two values per byte
    w = lin.weight.detach().t().numpy()
    expected_w = quantize(w, kind, quant.block_size).dequantize()
    x = np.random.default_rng(2).standard_normal((2, k)).astype(np.float32)
    expected = x @ expected_w + lin.bias.detach().numpy()
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        sess = ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"x": x})
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        float_y = lin(torch.from_numpy(x)).numpy()
    assert not np.allclose(y, float_y, atol=1e-6)     # the weight really is quantized


def test_float_graphs_stay_at_opset_17():
    model, _ = _linear_graph(64, 8, None)
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    assert all(n.op_type != "DequantizeLinear" for n in model.graph.node)


# ---- artifacts: every tiny family model, manifest, check, runtime ------------------------------

def _export(model, out, weights, **kw):
    from feather_export.export.artifact import ExportOptions, export

    return export(model, out, ExportOptions(method="feather", max_text_tokens=64, max_new_tokens=8,
                                            weights=weights, **kw), progress=lambda m: None)


@pytest.mark.parametrize("model", ["tiny", "tiny-gqa"])
def test_quantized_artifacts_of_tiny_models_build_check_and_run(model, tmp_path):
    import onnx
    from feather_runtime import Pipeline

    from feather_export.tensorrt.lint import check_artifact

    float_art = _export(model, tmp_path / "float", "float")
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ref = Pipeline.load(float_art).generate(image=image, prompt="what?", max_new_tokens=4)
    for weights in ("int8", "int4"):
        art = _export(model, tmp_path / weights, weights)
        manifest = __import__("json").loads((art / "feather.json").read_text())
        assert manifest["opset"] == 21
        assert manifest["quantization"]["weights"] == weights
        assert manifest["quantization"]["lm_head"] == "float"
        for seg in manifest["segments"]:
            m = onnx.load(str(art / seg["file"]))
            dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
            if seg["kind"] == "decoder":
                layers = seg["layers"][1] - seg["layers"][0]
                assert len(dq) == 4 * layers and m.opset_import[0].version == 21
                assert "lm_head.weight" in {t.name for t in m.graph.initializer} or \
                    "logits" not in [o.name for o in m.graph.output]
            else:                                    # vision, embed, select stay float, opset 17
                assert not dq and m.opset_import[0].version == 17
        assert not [f for f in check_artifact(art) if f.severity == "error"]
        res = Pipeline.load(art).generate(image=image, prompt="what?", max_new_tokens=4)
        assert len(res.token_ids) >= 1 and len(res.kept) == len(ref.kept)


def test_lm_head_quantized_and_float_artifacts_unchanged(tmp_path):
    import json

    import onnx

    art = _export("tiny", tmp_path / "head", "float", lm_head_weights="int8")
    manifest = json.loads((art / "feather.json").read_text())
    assert manifest["quantization"]["lm_head"] == "int8" and manifest["opset"] == 21
    last = onnx.load(str(art / manifest["segments"][-1]["file"]))
    assert [n.output[0] for n in last.graph.node if n.op_type == "DequantizeLinear"] == \
        ["lm_head.weight"]
    float_art = _export("tiny", tmp_path / "float", "float")
    manifest = json.loads((float_art / "feather.json").read_text())
    assert manifest["opset"] == 17 and manifest["quantization"] == {"weights": "float",
                                                                    "lm_head": "float"}


def test_bad_weight_options_refused_before_loading(tmp_path):
    from feather_export.cli.main import main

    cases = [(["--weights", "int4", "--block-size", "100"], "power of two"),
             (["--weights", "int8", "--dtype", "bf16"], "fp32 or fp16"),
             (["--block-size", "64"], "only applies to int4")]
    for extra, _ in cases:
        assert main(["export", "--model", "tiny", "--out", str(tmp_path / "x"), *extra]) == 2
        assert not (tmp_path / "x").exists()


def test_golden_tokens_on_tiny_shapes(tmp_path):
    """The trained model answers as the float artifact does with int8 and int4 weights (ORT's
    MatMulNBits at accuracy level 4); benchmarks/results/quality_weights has the 300-sample rates."""
    from feather_runtime import Pipeline

    from feather_export.models.checkpoint import checkpoint_path
    from feather_export.quality.evaluate import is_correct
    from feather_export.quality.synthetic import make_samples

    samples = make_samples("test", 12, seed=0)
    tokens = {}
    for weights in ("float", "int8", "int4"):
        art = _export(str(checkpoint_path("tiny-shapes")), tmp_path / weights, weights)
        pipe = Pipeline.load(art)
        tokens[weights] = [pipe.generate(image=s.image(), prompt=s.question,
                                         max_new_tokens=4).token_ids for s in samples]
        if weights == "float":
            accuracy = np.mean([is_correct(s, pipe.generate(image=s.image(), prompt=s.question,
                                                            max_new_tokens=4).text)
                                for s in samples])
            assert accuracy >= 0.9
    assert tokens["int8"] == tokens["float"]
    assert tokens["int4"] == tokens["float"]


def test_lint_weight_only_rules():
    from onnx import TensorProto, helper

    from feather_export.tensorrt.lint import lint_model

    model, _ = _linear_graph(176, 24, WeightQuant("int4", 32))
    findings = lint_model(model)
    assert not [f for f in findings if f.severity == "error"]
    reasons = " ".join(f.reason for f in findings)
    assert "opset 21" in reasons and "--weights float" in reasons      # the 10.3 risk, the fallback
    assert "block_size 32" in reasons and "not a multiple of block_size" in reasons
    # odd last dim, non-zero zero point: errors
    model, _ = _linear_graph(64, 7, WeightQuant("int4", 64))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    model.graph.initializer.append(helper.make_tensor("zp", TensorProto.INT4, [1, 7], [1] * 7))
    dq.input.append("zp")
    errors = [f.reason for f in lint_model(model) if f.severity == "error"]
    assert any("odd last dimension 7" in r for r in errors)
    assert any("symmetric" in r for r in errors)


def test_perf_model_counts_stored_weight_bytes():
    from feather_export.bench.perf_model import (LlmGeometry, WeightFormat, linear_bytes,
                                                 span_cost)

    assert linear_bytes(2048, 5632, "int4", 128, 4) == 2048 * 5632 / 2 + 16 * 5632 * 4
    assert linear_bytes(2048, 5632, "int8", 128, 2) == 2048 * 5632 + 5632 * 2
    llm = LlmGeometry(layers=2, hidden=256, heads=4, kv_heads=4, head_dim=64, intermediate=512,
                      vocab=1000)
    costs = {k: span_cost(llm, 2, 1, 0, True, 4, weights=WeightFormat(k)) for k in
             ("float", "int8", "int4")}
    assert costs["float"].bytes == span_cost(llm, 2, 1, 0, True, 4).bytes
    linears = 256 * 768 + 256 * 256 + 256 * 1024 + 512 * 256            # per layer
    assert costs["float"].bytes - costs["int4"].bytes == pytest.approx(
        2 * (linears * 4 - linears / 2 - (2 * 768 + 2 * 256 + 2 * 1024 + 4 * 256) * 4))
    assert costs["int4"].flops == costs["float"].flops
    assert WeightFormat.from_manifest({"weights": "int4", "block_size": 64}).label == "+int4"
    assert WeightFormat.from_manifest(None).label == ""


def test_validate_quantized_artifact_against_the_dequantized_model(tmp_path):
    from feather_export.export.validate import validate_artifact

    art = _export("tiny", tmp_path / "int4", "int4", block_size=16)
    checks = validate_artifact(art)
    assert checks and all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    decoder = [c for c in checks if c.segment.startswith("decoder")]
    assert all(c.tolerance == 3e-2 for c in decoder)
    assert all(c.tolerance == 1e-4 for c in checks
               if not c.segment.startswith("decoder") and c.output != "kept")


def test_tensorrt_plans_build_quantized_artifacts_strongly_typed(tmp_path):
    import json

    from feather_export.tensorrt.plans import plan_engines

    art = _export("tiny", tmp_path / "int4", "int4")
    manifest = json.loads((art / "feather.json").read_text())
    plans = plan_engines(manifest)
    assert plans and all(p.strongly_typed and p.precision == "fp32" for p in plans)
    with pytest.raises(FeatherError, match="strongly typed"):
        plan_engines(manifest, "fp16")
