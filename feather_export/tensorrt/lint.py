"""TensorRT compatibility lint for exported ONNX segments (``feather-export check OUT``).

Static checks only: nothing here imports TensorRT. The target is the ONNX parser of TensorRT 10.3
(JetPack 6); newer server TensorRT accepts a superset of what passes here.

Where the facts come from (read, not copied; the table below is our own wording):
  * onnx/onnx-tensorrt ``docs/operators.md`` at the 10.1 GA release (commit 96e7811, tag 10.1-GA):
    "opset 9 to opset 20", the data-type notes and the per-operator Y/N + restriction table.
    That header line was still "9 to 20" on main in Feb 2025 (TensorRT 10.8), so 10.3 is 9..20.
  * onnx/onnx-tensorrt ``docs/Changelog.md`` for 10.2/10.3 (tensor ``axes`` for Slice in 10.3; dynamic
    Squeeze/Unsqueeze axes only from 10.7; tensor Pad ``axes`` from 10.4; plugins preferred over
    local functions from 10.7) and 8.6 EA (TopK with dynamic K).
  * the 10.1 GA importer sources (``onnxOpImporters.cpp``, ``onnxOpCheckers.cpp``, ``ModelImporter.cpp``,
    ``importerUtils.cpp::convertDtype``) for the exact checks: which inputs must be initializers, Cast
    targets, Range input types, Loop scan outputs, local-function and plugin-fallback dispatch.
  * onnx-tensorrt ``docs/operators.md`` (TopK row): "`sorted` must be 1. `K` input must be less than
    3840" (TensorRT 10.x and 11.x tables).
  * TensorRT's TopK does not document its order among equal values (ONNX: the lower index first),
    which the selection's function body relies on for exact ties (docs/design.md §4): flagged on the
    ``feather::SelectTokens`` call (a warning).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from feather_export.errors import FeatherError

TRT_VERSION = "10.3"
OPSET_MIN, OPSET_MAX = 9, 20
TOPK_MAX_K = 3840                     # exclusive: K must be < 3840
ERROR, WARNING = "error", "warning"
_DEFAULT_DOMAINS = ("", "ai.onnx")
TIE_ORDER_WARNING = (
    "where TensorRT runs this function body (TensorRT <= 10.6 always, even with the plugin loaded; "
    "10.7+ when the plugin is not loaded) it selects with TensorRT's TopK, whose order among equal "
    "scores is not documented: on exact ties it may keep other tokens than ONNX Runtime and the "
    "reference (lower index first). For the documented order, export with --trt-plugin-only and "
    "build with the plugin (libfeather_plugin.so)")
_STANDARD_NON_TRT_DOMAINS = ("ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training")


@dataclass(frozen=True)
class LintFinding:
    segment: str  # segment name, e.g. "decoder_0_2" or "select_2"
    node: str  # node name ("" for graph-level findings)
    op_type: str  # "" for graph-level
    reason: str  # human readable, actionable
    severity: str  # "error" | "warning"


# ---------------------------------------------------------------------------------------------
# Operator table: default-domain ops the TensorRT 10.3 ONNX parser imports, with the restrictions
# that matter (enforced by the checkers below). Any default-domain op not listed is unsupported.
# ---------------------------------------------------------------------------------------------
_PLAIN_OPS = """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh BatchNormalization CastLike Ceil Celu
Concat ConstantOfShape Conv ConvTranspose Cos Cosh DepthToSpace Div Einsum Elu Equal Erf Exp Expand
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity ImageScaler IsInf IsNaN
LeakyRelu Less LessOrEqual Log LogSoftmax LRN LpNormalization MatMul Max Mean
MeanVarianceNormalization Min Mish Mod Mul Neg Not Or ParametricSoftplus Pow PRelu RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Reciprocal Relu Reshape ReverseSequence Round
ScaledTanh Scan Scatter ScatterElements Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Sub Sum Tan Tanh ThresholdedRelu Tile Transpose Trilu
Upsample Where Xor InstanceNormalization
"""
_REDUCE_OPS = [f"Reduce{x}" for x in "L1 L2 LogSum LogSumExp Max Mean Min Prod Sum SumSquare".split()]

SUPPORTED_OPS: dict[str, str] = {
    **{op: "" for op in _PLAIN_OPS.split()},
    **{op: "`axes` input must be constant" for op in _REDUCE_OPS},
    "AveragePool": "2D/3D only; dilations must be 1",
    "MaxPool": "2D/3D only; dilations must be 1; no `Indices` output",
    "LpPool": "dilations must be 1",
    "Cast": "`to` must be a TensorRT type (no uint16/32/64, int16, string, complex; double becomes float32)",
    "Clip": "`min`/`max` inputs must be constants",
    "Constant": "no sparse_value / value_string(s)",
    "CumSum": "`axis` input must be constant",
    "DeformConv": "1D/2D spatial dims; symmetric pads",
    "DequantizeLinear": "zero point must be 0",
    "QuantizeLinear": "zero point must be 0",
    "Dropout": "`training_mode` must be a constant False",
    "EyeLike": "input must have static dims",
    "GridSample": "4D input only",
    "GRU": "bidirectional: same activations both directions",
    "LSTM": "bidirectional: same activations; input_forget=0; layout=0",
    "RNN": "bidirectional: same activations both directions",
    "Hardmax": "the `axis` dimension must be a build-time constant",
    "If": "branches must have the same number of outputs, of the same rank",
    "Loop": "scan outputs need a trip count; loop-carried shapes must not change across iterations",
    "LayerNormalization": "only the first output `Y`",
    "NonMaxSuppression": "data-dependent output shape (see DATA_DEPENDENT_OPS)",
    "NonZero": "data-dependent output shape (see DATA_DEPENDENT_OPS)",
    "OneHot": "`depth` must be a build-time constant",
    "Pad": "`axes` input must be constant (tensor axes only from 10.4)",
    "Range": "start/limit/delta must share one type: int32, int64 or float32",
    "Resize": "modes nearest/linear/cubic; no antialias; keep_aspect_ratio_policy=stretch",
    "RoiAlign": "mode avg|max",
    "ScatterND": "no `reduction` attribute",
    "Squeeze": "`axes` input must be constant (dynamic axes only from 10.7)",
    "Unsqueeze": "`axes` input must be constant (dynamic axes only from 10.7)",
    "TopK": f"K must be a build-time constant < {TOPK_MAX_K}; `sorted` must be 1",
}

# Unsupported ops with a more specific hint than "not supported".
UNSUPPORTED_HINTS: dict[str, str] = {
    "Unique": "data-dependent output shape and not supported by TensorRT; use a fixed-size TopK/Gather formulation",
    "Compress": "data-dependent output shape and not supported by TensorRT; use Gather with fixed-size indices",
    "MatMulInteger": "use QuantizeLinear/DequantizeLinear around a float MatMul (explicit quantization)",
    "ConvInteger": "use QuantizeLinear/DequantizeLinear around a float Conv (explicit quantization)",
    "DynamicQuantizeLinear": "use static QuantizeLinear/DequantizeLinear scales",
    **{op: "sequence types are not supported by TensorRT" for op in (
        "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
        "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence")},
    **{op: "optional types are not supported by TensorRT" for op in (
        "Optional", "OptionalGetElement", "OptionalHasElement")},
}

# Supported by the parser (INonZeroLayer / INMSLayer) but the output shape is only known after
# execution. Project policy: feather engines must have shapes fixed by the optimization profile.
DATA_DEPENDENT_OPS: dict[str, str] = {
    "NonZero": "output shape depends on tensor values (data-dependent shape); feather segments must have "
    "profile-bounded shapes — use a fixed-size TopK/Gather or a mask multiply instead",
    "NonMaxSuppression": "output shape depends on tensor values (data-dependent shape); feather segments must "
    "have profile-bounded shapes — use a fixed-size TopK-based selection instead",
}

# (input index, label) pairs that the 10.3 importer requires to be initializers / Constant outputs.
CONST_INPUTS: dict[str, tuple[tuple[int, str], ...]] = {
    "Clip": ((1, "min"), (2, "max")),
    "CumSum": ((1, "axis"),),
    "Squeeze": ((1, "axes"),),
    "Unsqueeze": ((1, "axes"),),
    "Pad": ((3, "axes"),),
    "Dropout": ((2, "training_mode"),),
    "OneHot": ((1, "depth"),),
    **{op: ((1, "axes"),) for op in _REDUCE_OPS},
}

# Tensor element types. _QUANT: only as quantized types through Q/DQ; UINT8: only network I/O.
_OK_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32,
             TensorProto.INT64, TensorProto.BOOL}
_QUANT_TYPES = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}
_CAST_TARGETS = _OK_TYPES | _QUANT_TYPES | {TensorProto.UINT8}


def _tname(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type#{elem_type}"


# ---------------------------------------------------------------------------------------------
# Constant resolution
# ---------------------------------------------------------------------------------------------
class _Scope:
    """Constant names visible in one graph, subgraph or function body.

    ``consts`` maps a name to its value (None: constant, but the value is not stored inline).
    Subgraphs see their ``parent``; a function body sees only its own names, and its inputs
    resolve through ``aliases`` in the ``caller`` scope (the parser maps them to the outer tensors).
    """

    def __init__(self, parent=None, caller=None, aliases=None, attrs=None):
        self.parent, self.caller = parent, caller
        self.aliases = aliases or {}
        self.attrs = attrs or {}  # calling node's attributes (name -> AttributeProto), for ref_attr_name
        self.consts: dict[str, np.ndarray | None] = {}

    def add_graph(self, graph) -> "_Scope":
        for init in graph.initializer:
            self.consts[init.name] = _tensor_value(init)
        self.add_nodes(graph.node)
        return self

    def add_nodes(self, nodes) -> "_Scope":
        for node in nodes:
            if node.domain not in _DEFAULT_DOMAINS or not node.output:
                continue
            if node.op_type == "Constant":
                self.consts[node.output[0]] = self._constant_value(node)
            elif node.op_type in _SHAPE_ONLY_OPS and node.input:
                # TensorRT folds these at build time: a reshaped constant is still a constant
                known = [self.lookup(name) for name in node.input if name]
                if all(is_const for is_const, _ in known):
                    self.consts[node.output[0]] = _fold_shape_op(node, [v for _, v in known])
        return self

    def _constant_value(self, node) -> np.ndarray | None:
        for attr in node.attribute:
            if attr.ref_attr_name:
                attr = self.attrs.get(attr.ref_attr_name)
                if attr is None:
                    return None
            value = _attr_value(attr)
            if value is not None:
                return value
        return None

    def lookup(self, name: str) -> tuple[bool, np.ndarray | None]:
        """(is_constant, value)."""
        scope = self
        while scope is not None:
            if name in scope.consts:
                return True, scope.consts[name]
            if name in scope.aliases:
                return scope.caller.lookup(scope.aliases[name])
            scope = scope.parent
        return False, None


_SHAPE_ONLY_OPS = {"Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast"}


def _fold_shape_op(node, values) -> np.ndarray | None:
    """The folded value of a shape-only op on constants (None when a value is not stored inline)."""
    if any(v is None for v in values):
        return None
    data = values[0]
    if node.op_type in ("Identity", "Cast"):
        return data
    if node.op_type == "Reshape":
        return data.reshape(values[1])
    if node.op_type == "Unsqueeze":
        for axis in sorted(int(a) for a in values[1].reshape(-1)):
            data = np.expand_dims(data, axis)
        return data
    return np.squeeze(data, tuple(int(a) for a in values[1].reshape(-1))) if len(values) > 1 \
        else np.squeeze(data)


def _tensor_value(t: TensorProto) -> np.ndarray | None:
    if t.data_location == TensorProto.EXTERNAL:
        return None
    try:
        return numpy_helper.to_array(t)
    except Exception:
        return None


def _attr_value(attr: onnx.AttributeProto) -> np.ndarray | None:
    A = onnx.AttributeProto
    if attr.type == A.TENSOR:
        return _tensor_value(attr.t)
    if attr.type == A.INT:
        return np.array(attr.i, dtype=np.int64)
    if attr.type == A.INTS:
        return np.array(list(attr.ints), dtype=np.int64)
    if attr.type == A.FLOAT:
        return np.array(attr.f, dtype=np.float32)
    if attr.type == A.FLOATS:
        return np.array(list(attr.floats), dtype=np.float32)
    return None


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input(node, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


# ---------------------------------------------------------------------------------------------
# Per-op checkers: (node, scope, linter) -> iterable of (severity, reason)
# ---------------------------------------------------------------------------------------------
def _check_topk(node, scope, lint):
    if not _attr(node, "sorted", 1):
        yield ERROR, "sorted=0 is not supported by the TensorRT ONNX parser; export TopK with sorted=1"
    k_name = _input(node, 1)
    if k_name:
        known, k = scope.lookup(k_name)
        if not known:
            yield ERROR, (f"K input '{k_name}' is not a build-time constant (not an initializer or Constant output). "
                          f"TensorRT 10.x would take it as a runtime shape tensor, so the K < {TOPK_MAX_K} limit "
                          "cannot be checked and output shapes depend on it; export K as a constant")
            return
    else:  # opset < 10: attribute
        k = _attr(node, "k")
    if k is None:
        yield WARNING, f"K value is not stored inline (external data?); cannot verify K < {TOPK_MAX_K}"
    elif np.asarray(k).size != 1:
        yield ERROR, f"K must be a single value, got shape {np.asarray(k).shape}"
    elif int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
        yield ERROR, (f"K = {int(np.asarray(k).reshape(-1)[0])} exceeds TensorRT's TopK limit (K must be less "
                      f"than {TOPK_MAX_K}); split the selection (e.g. TopK per chunk, then TopK over the chunk "
                      "winners)")


def _check_const_inputs(node, scope, lint):
    for idx, label in CONST_INPUTS.get(node.op_type, ()):
        name = _input(node, idx)
        if not name:
            continue
        known, value = scope.lookup(name)
        if not known:
            yield ERROR, (f"input `{label}` ('{name}') must be an initializer or Constant output for the "
                          f"TensorRT {TRT_VERSION} parser; fold it to a constant at export")
        elif node.op_type == "Dropout" and value is not None and bool(np.asarray(value).reshape(-1)[0]):
            yield ERROR, "Dropout in training mode is not supported; export in eval mode"


def _check_cast(node, scope, lint):
    to = _attr(node, "to")
    if to is not None and to not in _CAST_TARGETS:
        hint = "TensorRT has no FP64; the parser would silently cast to float32" if to == TensorProto.DOUBLE else \
            "not a TensorRT type"
        yield ERROR, f"Cast to {_tname(to)}: {hint}; cast to float32/float16/int32/int64/bool instead"


def _check_range(node, scope, lint):
    types = [lint.types.get(n) for n in node.input[:3]]
    if None in types or len(types) < 3:
        return
    if len(set(types)) != 1:
        yield ERROR, f"start/limit/delta have different types {[_tname(t) for t in types]}; TensorRT requires one type"
    elif types[0] not in (TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT):
        yield ERROR, f"Range on {_tname(types[0])} is not supported; use int32, int64 or float32"


def _check_loop(node, scope, lint):
    body = _attr(node, "body")
    if body is None:
        return
    n_scan = len(body.output) - 1 - max(len(node.input) - 2, 0)
    if n_scan <= 0:
        return
    trip = _input(node, 0)
    known, value = scope.lookup(trip) if trip else (True, None)
    if not trip or (known and value is not None and int(np.asarray(value).reshape(-1)[0]) >= 2**31 - 1):
        yield ERROR, ("Loop has scan outputs but no trip count (M); TensorRT then gives the scan outputs a dummy "
                      "length and they must not be used. Pass an explicit trip count")


def _check_if(node, scope, lint):
    then_g, else_g = _attr(node, "then_branch"), _attr(node, "else_branch")
    if then_g is not None and else_g is not None and len(then_g.output) != len(else_g.output):
        yield ERROR, "then/else branches have different numbers of outputs"


def _check_first_output_only(node, scope, lint):
    if any(node.output[1:]):
        yield ERROR, f"TensorRT only supports the first output of {node.op_type}; drop the extra outputs"


def _check_pool(node, scope, lint):
    if any(d != 1 for d in _attr(node, "dilations", [])):
        yield ERROR, "pooling dilations other than 1 are not supported"
    if node.op_type == "MaxPool":
        yield from _check_first_output_only(node, scope, lint)


def _check_attrs(node, scope, lint):
    op = node.op_type
    if op == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings") for a in node.attribute):
        yield ERROR, "Constant with sparse_value/value_string(s) is not supported"
    if op == "BatchNormalization" and _attr(node, "training_mode", 0):
        yield ERROR, "BatchNormalization training_mode=1 is not supported"
    if op == "ScatterND":
        red = _attr(node, "reduction")
        if red not in (None, b"none"):
            yield ERROR, f"ScatterND reduction={red.decode()} is not supported; only plain assignment"
        elif red is not None:
            yield WARNING, ("ScatterND carries an explicit reduction='none'; the 10.x parser rejected any `reduction` "
                            "attribute until a later fix — drop the attribute")
    if op == "Resize":
        mode = _attr(node, "mode", b"nearest").decode()
        ctm = _attr(node, "coordinate_transformation_mode", b"half_pixel").decode()
        if mode not in ("nearest", "linear", "cubic"):
            yield ERROR, f"Resize mode '{mode}' is not supported"
        if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
            yield ERROR, f"Resize coordinate_transformation_mode '{ctm}' is not supported"
        if _attr(node, "antialias", 0):
            yield ERROR, "Resize antialias=1 is not supported"
        if _attr(node, "keep_aspect_ratio_policy", b"stretch") != b"stretch":
            yield ERROR, "Resize keep_aspect_ratio_policy must be 'stretch'"


_CHECKERS = {
    "TopK": [_check_topk], "Cast": [_check_cast], "Range": [_check_range], "Loop": [_check_loop],
    "If": [_check_if], "LayerNormalization": [_check_first_output_only],
    "AveragePool": [_check_pool], "MaxPool": [_check_pool], "LpPool": [_check_pool],
    **{op: [_check_const_inputs] for op in CONST_INPUTS},
    **{op: [_check_attrs] for op in ("Constant", "BatchNormalization", "ScatterND", "Resize")},
}


# ---------------------------------------------------------------------------------------------
# Graph walk
# ---------------------------------------------------------------------------------------------
class _Linter:
    def __init__(self, model: onnx.ModelProto, segment: str):
        self.segment = segment
        self.findings: list[LintFinding] = []
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.types: dict[str, int] = {}
        self._call_stack: list[tuple[str, str]] = []

    def add(self, node: str, op_type: str, reason: str, severity: str) -> None:
        self.findings.append(LintFinding(self.segment, node, op_type, reason, severity))

    def check_opsets(self, opset_imports, where: str, node_path: str = "", op_type: str = "") -> None:
        versions = [o.version for o in opset_imports if o.domain in _DEFAULT_DOMAINS]
        if not versions:
            if not node_path:  # a function may rely on the model's opset
                self.add("", "", "model has no default-domain (ai.onnx) opset_import", ERROR)
            return
        v = versions[0]
        if not OPSET_MIN <= v <= OPSET_MAX:
            self.add(node_path, op_type, f"{where} uses ai.onnx opset {v}; the TensorRT {TRT_VERSION} parser "
                     f"supports opsets {OPSET_MIN}..{OPSET_MAX} — re-export with opset_version={OPSET_MAX} or lower",
                     ERROR)

    def graph(self, graph, scope: _Scope, prefix: str, top: bool = False, plugin_note: str = "") -> None:
        self.check_types(graph, prefix, top)
        for i, node in enumerate(graph.node):
            self.node(node, f"{prefix}{node.name or f'{node.op_type}#{i}'}", scope, plugin_note)

    def node(self, node, path: str, scope: _Scope, plugin_note: str = "") -> None:
        op, domain = node.op_type, node.domain
        add = lambda reason, sev: self.add(path, op, reason + plugin_note, sev)  # noqa: E731
        function = self.functions.get((domain, op))
        if domain in _DEFAULT_DOMAINS and function is None:
            if op not in SUPPORTED_OPS:
                hint = UNSUPPORTED_HINTS.get(op, "no importer for this op; the parser would look for a plugin of "
                                                 "the same name and fail")
                add(f"{op} is not supported by the TensorRT {TRT_VERSION} ONNX parser: {hint}", ERROR)
                return
            if op in DATA_DEPENDENT_OPS:
                add(DATA_DEPENDENT_OPS[op], ERROR)
            for check in _CHECKERS.get(op, ()):
                for sev, reason in check(node, scope, self):
                    add(reason, sev)
            for attr in node.attribute:  # If/Loop/Scan bodies
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    self.graph(sub, _Scope(parent=scope).add_graph(sub), f"{path}/", plugin_note=plugin_note)
            return
        if op in SUPPORTED_OPS:  # builtin importers are looked up before local functions and plugins
            add(f"custom-domain op '{domain}::{op}' has the name of a built-in ONNX op: the TensorRT parser "
                f"dispatches on op_type only and would import it as the built-in {op}; rename the op", WARNING)
        if function is not None:
            self.function_call(node, path, function, scope)
        elif domain in _STANDARD_NON_TRT_DOMAINS:
            add(f"{domain} ops are not supported by TensorRT", ERROR)
        else:
            version = _attr(node, "plugin_version", b"1").decode()
            namespace = _attr(node, "plugin_namespace", b"").decode()
            add(f"custom op '{domain}::{op}' has no local function body, so TensorRT imports it as a plugin: a "
                f"plugin creator named '{op}' (version '{version}', namespace '{namespace}') must be registered "
                "when building the engine (e.g. trtexec --dynamicPlugins=libfeather_plugin.so)", WARNING)

    def function_call(self, node, path: str, function: onnx.FunctionProto, scope: _Scope) -> None:
        key = (function.domain, function.name)
        if key in self._call_stack:
            self.add(path, node.op_type, f"local function {function.name} calls itself recursively", ERROR)
            return
        if len(node.input) != len(function.input):
            self.add(path, node.op_type, f"node has {len(node.input)} inputs but local function {function.name} "
                     f"declares {len(function.input)}; the TensorRT parser requires them to match", ERROR)
        self.check_opsets(function.opset_import, f"local function {function.name}", path, node.op_type)
        # Calling node's attributes override the function's defaults (as in the parser).
        attrs = {a.name: a for a in function.attribute_proto} | {a.name: a for a in node.attribute}
        aliases = {inner: outer for inner, outer in zip(function.input, node.input) if outer}
        body_scope = _Scope(caller=scope, aliases=aliases, attrs=attrs).add_nodes(function.node)
        namespace = _attr(node, "plugin_namespace")
        if (node.domain, node.op_type) == ("feather", "SelectTokens") and \
                any(n.op_type == "TopK" for n in function.node):
            self.add(path, node.op_type, TIE_ORDER_WARNING, WARNING)
        note = "" if namespace is None else (
            f" (TensorRT >= 10.7 uses plugin '{node.op_type}' from namespace '{namespace.decode()}' instead of "
            f"this function body when that plugin is registered; {TRT_VERSION} inlines the body)")
        self._call_stack.append(key)
        try:
            for i, inner in enumerate(function.node):
                self.node(inner, f"{path}/{inner.name or f'{inner.op_type}#{i}'}", body_scope, note)
        finally:
            self._call_stack.pop()

    def check_types(self, graph, prefix: str, top: bool) -> None:
        producers = {out: (n.name or f"{n.op_type}#{i}", n.op_type)
                     for i, n in enumerate(graph.node) for out in n.output}
        qdq = {name for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for name in list(n.input) + list(n.output)}
        io = {v.name for v in graph.input} | {v.name for v in graph.output} if top else set()
        entries = [(v.name, v.type) for v in (*graph.input, *graph.output, *graph.value_info)]
        entries += [(t.name, t.data_type) for t in graph.initializer]
        seen = set()
        for name, typ in entries:
            if name in seen:
                continue
            seen.add(name)
            node, op = producers.get(name, ("", ""))
            where = f"{prefix}{node}" if node else ""
            if isinstance(typ, int):
                elem = typ
            elif typ.HasField("tensor_type"):
                elem = typ.tensor_type.elem_type
            else:
                self.add(where, op, f"tensor '{name}' is a {typ.WhichOneof('value')}; TensorRT supports tensors only",
                         ERROR)
                continue
            if not elem:
                continue
            self.types[name] = elem
            if elem in _OK_TYPES or (op == "Cast" and elem not in _CAST_TARGETS):  # reported by _check_cast
                continue
            if elem == TensorProto.DOUBLE:
                self.add(where, op, f"tensor '{name}' is DOUBLE: TensorRT has no FP64 and the parser silently "
                         "downcasts to float32 (clamped, I/O binding types change); export it as float32", ERROR)
            elif elem == TensorProto.UINT8:
                if name not in io:
                    self.add(where, op, f"tensor '{name}' is UINT8, which TensorRT supports only as a network input "
                             "or output; cast to int32/float at the boundary", ERROR)
            elif elem in _QUANT_TYPES:
                if name not in qdq:
                    self.add(where, op, f"tensor '{name}' is {_tname(elem)}, a quantized type that TensorRT "
                             "supports only through QuantizeLinear/DequantizeLinear", WARNING)
            else:
                self.add(where, op, f"tensor '{name}' has type {_tname(elem)}, which TensorRT does not support; "
                         "use float32/float16/bfloat16/int32/int64/bool", ERROR)


def lint_model(model: onnx.ModelProto, segment: str = "model") -> list[LintFinding]:
    """Lint one ONNX model against the TensorRT 10.3 ONNX parser. Returns findings in graph order."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # tolerate models shape inference cannot handle: lint the original
        inferred = model
    lint = _Linter(inferred, segment)
    lint.check_opsets(inferred.opset_import, "the model")
    lint.graph(inferred.graph, _Scope().add_graph(inferred.graph), "", top=True)
    return lint.findings


def check_artifact(out_dir: str | os.PathLike) -> list[LintFinding]:
    """Lint every segment listed in OUT/feather.json (weights are not loaded)."""
    out = Path(out_dir)
    manifest_path = out / "feather.json"
    if not manifest_path.is_file():
        raise FeatherError(f"no manifest at {manifest_path}: is {out} a feather-export output directory?")
    try:
        manifest = json.loads(manifest_path.read_text())
        segments = manifest["segments"]
        entries = [(str(s["name"]), str(s["file"])) for s in segments]
    except (ValueError, KeyError, TypeError) as e:
        raise FeatherError(f"{manifest_path} is not a valid manifest (need 'segments': [{{'name', 'file'}}, ...]): "
                           f"{e}") from e
    findings: list[LintFinding] = []
    for name, rel in entries:
        path = out / rel
        if not path.is_file():
            raise FeatherError(f"segment '{name}': file {path} listed in {manifest_path} does not exist")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise FeatherError(f"segment '{name}': {path} is not a readable ONNX model ({e})") from e
        findings += lint_model(model, segment=name)
    return findings


def format_findings(findings) -> str:
    """A readable report grouped by segment (segments in first-seen order, errors first)."""
    findings = list(findings)
    if not findings:
        return f"TensorRT {TRT_VERSION} lint: no findings."
    by_segment: dict[str, list[LintFinding]] = {}
    for f in findings:
        by_segment.setdefault(f.segment, []).append(f)
    lines = []
    for segment, items in by_segment.items():
        n_err = sum(f.severity == ERROR for f in items)
        lines.append(f"segment {segment}: {n_err} error(s), {len(items) - n_err} warning(s)")
        for f in sorted(items, key=lambda f: f.severity != ERROR):
            where = f"node {f.node} ({f.op_type})" if f.node else (f"({f.op_type})" if f.op_type else "graph")
            lines.append(f"  {f.severity.upper():7} {where}: {f.reason}")
    total_err = sum(f.severity == ERROR for f in findings)
    lines.append(f"TensorRT {TRT_VERSION} lint: {total_err} error(s), {len(findings) - total_err} warning(s) "
                 f"in {len(by_segment)} segment(s)")
    return "\n".join(lines)
