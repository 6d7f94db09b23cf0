"""Tests for feather_export.tensorrt.lint (pure ONNX, no TensorRT needed)."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from feather_export.tensorrt.lint import LintFinding, check_artifact, format_findings, lint_model
from feather_runtime.errors import FeatherError

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opset=17, functions=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=10)


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _topk_model(k_value=None, k_from_input=False, **attrs):
    """x[1,4096] -> TopK(k) -> values, indices."""
    inputs = [helper.make_tensor_value_info("x", F, [1, 4096])]
    inits = []
    if k_from_input:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    else:
        inits.append(_i64("k", [k_value]))
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1, **attrs)
    outputs = [helper.make_tensor_value_info("v", F, None), helper.make_tensor_value_info("i", TensorProto.INT64, None)]
    return _model([node], inputs, outputs, inits)


def _errors(findings):
    return [f for f in findings if f.severity == "error"]


def test_clean_graph_has_no_errors():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Softmax", ["h"], ["p"], name="sm", axis=-1),
        helper.make_node("Constant", [], ["k"], name="kconst",
                         value=helper.make_tensor("kv", TensorProto.INT64, [1], [8])),
        helper.make_node("TopK", ["p", "k"], ["v", "idx"], name="topk", axis=-1),
        helper.make_node("Gather", ["h", "idx"], ["g"], name="gather", axis=1),
        helper.make_node("ReduceSum", ["g", "axes"], ["s"], name="rsum", keepdims=0),
    ]
    inputs = [helper.make_tensor_value_info("x", F, [1, 16, 32])]
    outputs = [helper.make_tensor_value_info("s", F, [1, 1, 16, 8]), helper.make_tensor_value_info("v", F, [1, 16, 8])]
    inits = [numpy_helper.from_array(np.zeros((32, 64), np.float32), "w"), _i64("axes", [-1])]
    model = _model(nodes, inputs, outputs, inits)
    onnx.checker.check_model(model, full_check=True)
    assert lint_model(model, "clean") == []


def test_nonzero_is_an_error_naming_node_and_reason():
    node = helper.make_node("NonZero", ["x"], ["nz"], name="find_tokens")
    model = _model([node], [helper.make_tensor_value_info("x", F, [4, 4])],
                   [helper.make_tensor_value_info("nz", TensorProto.INT64, None)])
    errors = _errors(lint_model(model, "select_2"))
    assert len(errors) == 1
    e = errors[0]
    assert (e.segment, e.node, e.op_type) == ("select_2", "find_tokens", "NonZero")
    assert "data-dependent" in e.reason


def test_unsupported_op_is_an_error():
    node = helper.make_node("Unique", ["x"], ["u"], name="uniq")
    model = _model([node], [helper.make_tensor_value_info("x", F, [8])], [helper.make_tensor_value_info("u", F, None)])
    errors = _errors(lint_model(model))
    assert [(e.node, e.op_type) for e in errors] == [("uniq", "Unique")]
    assert "not supported" in errors[0].reason


def test_topk_constant_k_within_limit_is_clean():
    assert lint_model(_topk_model(3839)) == []


def test_topk_k_must_be_less_than_3840():
    """onnx-tensorrt docs/operators.md: "`K` input must be less than 3840"."""
    errors = _errors(lint_model(_topk_model(3840)))
    assert len(errors) == 1 and errors[0].node == "topk"
    assert "K = 3840" in errors[0].reason and "less than 3840" in errors[0].reason


def test_topk_unsorted_is_an_error():
    errors = _errors(lint_model(_topk_model(8, sorted=0)))
    assert [(e.node, e.op_type) for e in errors] == [("topk", "TopK")] and "sorted=1" in errors[0].reason


def test_topk_k_above_limit_is_an_error():
    errors = _errors(lint_model(_topk_model(5000)))
    assert len(errors) == 1 and errors[0].node == "topk"
    assert "5000" in errors[0].reason and "3840" in errors[0].reason


def test_topk_k_from_graph_input_is_an_error():
    errors = _errors(lint_model(_topk_model(k_from_input=True)))
    assert len(errors) == 1 and errors[0].op_type == "TopK"
    assert "constant" in errors[0].reason and "'k'" in errors[0].reason


@pytest.mark.parametrize("opset", [8, 21, 22])
def test_opset_outside_supported_range_is_an_error(opset):
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = _model([node], [helper.make_tensor_value_info("x", F, [2])], [helper.make_tensor_value_info("y", F, None)],
                   opset=opset)
    errors = _errors(lint_model(model))
    assert len(errors) == 1
    assert errors[0].node == "" and errors[0].op_type == ""
    assert f"opset {opset}" in errors[0].reason and "9..20" in errors[0].reason


def test_double_tensor_is_an_error():
    node = helper.make_node("Add", ["x", "x"], ["y"], name="add64")
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])])
    errors = _errors(lint_model(model))
    assert errors and all("DOUBLE" in e.reason for e in errors)
    assert {"'x'", "'y'"} <= {w for e in errors for w in e.reason.split() if w.startswith("'")}
    assert any(e.node == "add64" for e in errors)  # y is attributed to its producer


def test_unsupported_integer_type_and_cast_target():
    nodes = [helper.make_node("Cast", ["x"], ["y"], name="to_u32", to=TensorProto.UINT32),
             helper.make_node("Cast", ["y"], ["z"], name="back", to=F)]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2])], [helper.make_tensor_value_info("z", F, None)])
    errors = _errors(lint_model(model))
    assert [(e.node, e.op_type) for e in errors] == [("to_u32", "Cast")]
    assert "UINT32" in errors[0].reason


def _feather_function(body_nodes, name="Select", inputs=("x",), outputs=("y",), attributes=()):
    return helper.make_function("feather", name, list(inputs), list(outputs), body_nodes,
                                [helper.make_opsetid("", 17)], attributes=list(attributes))


def test_local_function_body_is_linted_as_outer_slash_inner():
    body = [helper.make_node("NonZero", ["x"], ["y"], name="nz")]
    fn = _feather_function(body)
    call = helper.make_node("Select", ["x"], ["y"], name="select_tokens", domain="feather")
    model = _model([call], [helper.make_tensor_value_info("x", F, [4])],
                   [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
                   functions=[fn], extra_opsets=[helper.make_opsetid("feather", 1)])
    errors = _errors(lint_model(model, "select_2"))
    assert [(e.segment, e.node, e.op_type) for e in errors] == [("select_2", "select_tokens/nz", "NonZero")]


def test_function_topk_k_via_ref_attr_name():
    # Constant(value_int := @k) inside the function; the calling node sets k.
    k_const = helper.make_node("Constant", [], ["k"], name="kc")
    k_const.attribute.append(onnx.AttributeProto(name="value_ints", ref_attr_name="k", type=onnx.AttributeProto.INTS))
    body = [k_const, helper.make_node("TopK", ["x", "k"], ["y", "i"], name="tk", axis=-1)]
    fn = _feather_function(body, outputs=("y", "i"), attributes=["k"])

    def run(k):
        call = helper.make_node("Select", ["x"], ["y", "i"], name="sel", domain="feather", k=[k])
        model = _model([call], [helper.make_tensor_value_info("x", F, [1, 8192])],
                       [helper.make_tensor_value_info("y", F, None),
                        helper.make_tensor_value_info("i", TensorProto.INT64, None)],
                       functions=[fn], extra_opsets=[helper.make_opsetid("feather", 1)])
        return _errors(lint_model(model))

    assert run(576) == []
    errors = run(4096)
    assert [(e.node, e.op_type) for e in errors] == [("sel/tk", "TopK")] and "4096" in errors[0].reason


def test_function_topk_k_from_caller_initializer():
    body = [helper.make_node("TopK", ["x", "k"], ["y", "i"], name="tk", axis=-1)]
    fn = _feather_function(body, inputs=("x", "k"), outputs=("y", "i"))
    call = helper.make_node("Select", ["x", "kk"], ["y", "i"], name="sel", domain="feather")
    model = _model([call], [helper.make_tensor_value_info("x", F, [1, 64])],
                   [helper.make_tensor_value_info("y", F, None),
                    helper.make_tensor_value_info("i", TensorProto.INT64, None)],
                   initializers=[_i64("kk", [4])], functions=[fn], extra_opsets=[helper.make_opsetid("feather", 1)])
    assert lint_model(model) == []


def test_select_tokens_function_body_warns_about_tie_order(tmp_path):
    """Where the users meet it: `feather-export check` on an exported artifact names the tie-order
    risk of the function body (TensorRT's TopK) once per selection node; a --trt-plugin-only
    artifact has no body and no such warning."""
    from feather_export.export.artifact import ExportOptions, export

    art = export("tiny", tmp_path / "a", ExportOptions(method="feather"), progress=lambda m: None)
    ties = [f for f in check_artifact(art) if "equal scores" in f.reason]
    assert [(f.segment, f.op_type, f.severity) for f in ties] == [
        ("select_1", "SelectTokens", "warning"), ("select_2", "SelectTokens", "warning")]
    assert "TensorRT <= 10.6" in ties[0].reason and "--trt-plugin-only" in ties[0].reason
    plugin = export("tiny", tmp_path / "p", ExportOptions(method="feather", trt_plugin_only=True),
                    progress=lambda m: None)
    assert not any("equal scores" in f.reason for f in check_artifact(plugin))


def test_custom_domain_without_function_is_a_plugin_warning():
    node = helper.make_node("FeatherAttnPlugin", ["x"], ["y"], name="attn", domain="trt.plugins")
    model = _model([node], [helper.make_tensor_value_info("x", F, [2])], [helper.make_tensor_value_info("y", F, None)],
                   extra_opsets=[helper.make_opsetid("trt.plugins", 1)])
    findings = lint_model(model)
    assert [(f.node, f.op_type, f.severity) for f in findings] == [("attn", "FeatherAttnPlugin", "warning")]
    assert "plugin" in findings[0].reason and "FeatherAttnPlugin" in findings[0].reason


def test_if_subgraph_is_recursed():
    then_g = helper.make_graph([helper.make_node("NonZero", ["x"], ["t"], name="nz")], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.INT64, None)])
    else_g = helper.make_graph([helper.make_node("Shape", ["x"], ["e"], name="shp")], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.INT64, None)])
    node = helper.make_node("If", ["c"], ["o"], name="branch", then_branch=then_g, else_branch=else_g)
    model = _model([node], [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                            helper.make_tensor_value_info("x", F, [3])],
                   [helper.make_tensor_value_info("o", TensorProto.INT64, None)])
    errors = _errors(lint_model(model))
    assert [(e.node, e.op_type) for e in errors] == [("branch/nz", "NonZero")]


def test_squeeze_axes_must_be_constant():
    node = helper.make_node("Squeeze", ["x", "axes"], ["y"], name="sq")
    model = _model([node], [helper.make_tensor_value_info("x", F, [1, 3]),
                            helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                   [helper.make_tensor_value_info("y", F, None)])
    errors = _errors(lint_model(model))
    assert [(e.node, e.op_type) for e in errors] == [("sq", "Squeeze")] and "axes" in errors[0].reason


def _write_segment(path, model):
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def test_check_artifact_reports_segment_names(tmp_path):
    _write_segment(tmp_path / "onnx" / "vision.onnx", _topk_model(8))
    nz = helper.make_node("NonZero", ["x"], ["nz"], name="find_tokens")
    _write_segment(tmp_path / "onnx" / "select_2.onnx",
                   _model([nz], [helper.make_tensor_value_info("x", F, [4])],
                          [helper.make_tensor_value_info("nz", TensorProto.INT64, None)]))
    (tmp_path / "feather.json").write_text(json.dumps({"segments": [
        {"name": "vision", "file": "onnx/vision.onnx"},
        {"name": "select_2", "file": "onnx/select_2.onnx"},
    ]}))
    findings = check_artifact(tmp_path)
    assert [(f.segment, f.node) for f in findings] == [("select_2", "find_tokens")]

    report = format_findings(findings)
    assert "select_2" in report and "find_tokens" in report and "data-dependent" in report


def test_check_artifact_missing_manifest(tmp_path):
    with pytest.raises(FeatherError, match="feather.json"):
        check_artifact(tmp_path)


def test_check_artifact_missing_or_broken_segment(tmp_path):
    (tmp_path / "feather.json").write_text(json.dumps({"segments": [{"name": "vision", "file": "onnx/vision.onnx"}]}))
    with pytest.raises(FeatherError, match="vision"):
        check_artifact(tmp_path)
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "vision.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(FeatherError, match="vision"):
        check_artifact(tmp_path)
    (tmp_path / "feather.json").write_text("{not json")
    with pytest.raises(FeatherError, match="manifest"):
        check_artifact(tmp_path)


def test_format_findings_groups_by_segment():
    findings = [
        LintFinding("decoder_0_2", "topk", "TopK", "K = 5000 exceeds", "error"),
        LintFinding("decoder_0_2", "", "", "opset 22", "error"),
        LintFinding("select_2", "attn", "MyPlugin", "plugin must be loaded", "warning"),
    ]
    report = format_findings(findings)
    assert report.index("decoder_0_2") < report.index("select_2")
    for text in ("topk", "TopK", "K = 5000 exceeds", "opset 22", "attn", "plugin must be loaded", "WARNING", "ERROR"):
        assert text in report
    assert "no findings" in format_findings([])
