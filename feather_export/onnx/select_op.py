"""``feather::SelectTokens``: the one custom op between segments, with a standard-ONNX function body.

Inputs:  scores f32 [N]; hidden T [1, S, D]; position_ids i64 [1, S]; image_start i64 [] (scalar).
Outputs: kept i64 [B] (indices into the current image set, ascending);
         hidden_out T [1, S-N+B, D]; position_ids_out i64 [1, S-N+B].
Attributes: budget (B), num_image_tokens (N), grid_side, grid_stride (0 = no forced grid),
            raster_offset (index of the first raster token: 1 when a CLS image token precedes the
            raster, else 0), criterion (informational), plugin_namespace / plugin_version (for
            TensorRT >= 10.7).

Semantics (docs/design.md §4): grid tokens (token i is raster token r = i - raster_offset; on the grid
when r >= 0 and r's row and column, on the grid_side-wide raster, are multiples of grid_stride) are
always kept; the rest of the budget goes to the top-scoring
non-grid tokens, ties to the lower index (ONNX TopK's documented tie rule; NaN scores are
outside the contract: the CUDA kernel ranks them last, ONNX TopK leaves them unspecified); the image rows of
``hidden`` are replaced by the kept rows in ascending order, text rows are untouched.
"""
from __future__ import annotations

import numpy as np

from feather_export.onnx.graph import FEATHER_DOMAIN, OPSET, GraphBuilder

OP_TYPE = "SelectTokens"
PLUGIN_VERSION = "1"
ATTRIBUTES = ("budget", "num_image_tokens", "grid_side", "grid_stride", "raster_offset", "criterion",
              "plugin_namespace", "plugin_version")


class FunctionBody:
    """Collects the nodes of a function body: ``op`` (one output), ``attr_int`` (a Constant
    bound to an int attribute of the calling node), ``const``."""

    def __init__(self):
        self.nodes = []

    def op(self, op_type, inputs, output, **attrs):
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def attr_int(self, name):
        from onnx import AttributeProto, helper

        attr = helper.make_attribute_ref("value_int", AttributeProto.INT)
        attr.ref_attr_name = name
        node = helper.make_node("Constant", [], [f"attr_{name}"])
        node.attribute.append(attr)
        self.nodes.append(node)
        return f"attr_{name}"

    def const(self, name, value, dtype=np.int64):
        from onnx import numpy_helper

        return self.op("Constant", [], name, value=numpy_helper.from_array(np.asarray(value, dtype)))


def select_function():
    """The FunctionProto of ``feather::SelectTokens``."""
    from onnx import helper

    body = FunctionBody()
    nodes, op, attr_int, const = body.nodes, body.op, body.attr_int, body.const
    budget, side, stride = attr_int("budget"), attr_int("grid_side"), attr_int("grid_stride")
    zero, one = const("zero", 0), const("one", 1)
    budget_1d = op("Unsqueeze", [budget, const("axis0", [0])], "budget_1d")
    n = op("Squeeze", [op("Shape", ["scores"], "scores_shape"), const("axes0", [0])], "n")
    idx = op("Range", [zero, n, one], "idx")
    # raster index r = i - raster_offset; tokens before the raster (r < 0) are never on the grid
    raster = op("Sub", [idx, attr_int("raster_offset")], "raster_raw")
    on_raster = op("GreaterOrEqual", [raster, zero], "on_raster")
    raster = op("Max", [raster, zero], "raster")
    side1, stride1 = op("Max", [side, one], "side1"), op("Max", [stride, one], "stride1")
    on_row = op("Equal", [op("Mod", [op("Div", [raster, side1], "row"), stride1], "row_m"), zero], "on_row")
    on_col = op("Equal", [op("Mod", [op("Mod", [raster, side1], "col"), stride1], "col_m"), zero], "on_col")
    grid = op("And", [op("And", [op("And", [on_row, on_col], "grid_raw"), on_raster], "grid_raster"),
                      op("Greater", [stride, zero], "has_grid")], "grid")
    # grid tokens rank first; finite scores only below them (a +inf score is clamped to FLT_MAX)
    finite = op("Min", ["scores", const("flt_max", np.finfo(np.float32).max, np.float32)], "finite")
    ranked = op("Where", [grid, const("pos_inf", np.inf, np.float32), finite], "ranked")
    nodes.append(helper.make_node("TopK", [ranked, budget_1d], ["top_values", "top"],
                                  axis=0, largest=1, sorted=1))
    top_f = op("Cast", ["top"], "top_f", to=1)
    nodes.append(helper.make_node("TopK", [top_f, budget_1d], ["sorted_f", "sorted_order"],
                                  axis=0, largest=0, sorted=1))
    op("Cast", ["sorted_f"], "kept", to=7)

    gather_rows(op, n, budget, zero, one)

    return helper.make_function(
        FEATHER_DOMAIN, OP_TYPE, ["scores", "hidden", "position_ids", "image_start"],
        ["kept", "hidden_out", "position_ids_out"], nodes,
        opset_imports=[helper.make_opsetid("", OPSET)], attributes=list(ATTRIBUTES))


def gather_rows(op, n: str, budget: str, zero: str, one: str) -> None:
    """Function-body nodes shared by the selection ops: ``hidden_out`` / ``position_ids_out`` from
    ``kept`` (ascending ranks into the current image set), ``image_start``, ``hidden``,
    ``position_ids``; ``op(op_type, inputs, output, **attrs)`` appends one node."""
    # output row j <- source row: text before, kept image rows, text after (shifted by N - B)
    seq = op("Gather", [op("Shape", ["hidden"], "hidden_shape"), one], "s", axis=0)
    dropped = op("Sub", [n, budget], "dropped")
    j = op("Range", [zero, op("Sub", [seq, dropped], "out_len"), one], "j")
    offset = op("Sub", [j, "image_start"], "offset")
    in_image = op("And", [op("GreaterOrEqual", [offset, zero], "after_start"),
                          op("Less", [offset, budget], "before_end")], "in_image")
    clipped = op("Min", [op("Max", [offset, zero], "offset_lo"), op("Sub", [budget, one], "b_1")],
                 "offset_clip")
    from_image = op("Add", [op("Gather", ["kept", clipped], "kept_at", axis=0), "image_start"],
                    "from_image")
    from_text = op("Where", [op("Less", [j, "image_start"], "before_image"), j,
                             op("Add", [j, dropped], "after_image")], "from_text")
    source = op("Where", [in_image, from_image, from_text], "source")
    op("Gather", ["hidden", source], "hidden_out", axis=1)
    op("Gather", ["position_ids", source], "position_ids_out", axis=1)


def select_node(g: GraphBuilder, scores: str, hidden: str, position_ids: str, image_start: str, *,
                budget: int, num_image_tokens: int, grid_side: int, grid_stride: int,
                criterion: str, outputs: list[str], name: str, raster_offset: int = 0) -> None:
    """Add one ``feather::SelectTokens`` node to ``g``."""
    g.op(OP_TYPE, scores, hidden, position_ids, image_start, outputs=outputs, name=name,
         domain=FEATHER_DOMAIN, budget=budget, num_image_tokens=num_image_tokens,
         grid_side=grid_side, grid_stride=grid_stride, raster_offset=raster_offset,
         criterion=criterion,
         plugin_namespace=FEATHER_DOMAIN, plugin_version=PLUGIN_VERSION)
