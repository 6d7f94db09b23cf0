"""``feather::SelectBalanced``: one BTP stage (docs/design.md §4) as a sibling of ``feather::SelectTokens``,
with a standard-ONNX function body.

Inputs:  logits f32 [N] (pre-softmax last-token logits, mean over heads); features f32 [N, D'] (the
         image rows of the hidden states entering layer K); seed_priority f32 [N] (N - rank in the
         spatial seed F for members of F, -1 otherwise: a constant of the model, all -1 after stage
         1); hidden T [1, S, D]; position_ids i64 [1, S]; image_start i64 [].
Outputs: kept i64 [B] (ranks in the current image set, ascending); hidden_out T [1, S-N+B, D];
         position_ids_out i64 [1, S-N+B] (the rows exactly as ``SelectTokens`` gathers them).
Attributes: budget (B >= 1), num_image_tokens (N), attention_count (m = |A|), candidate_count
         (floor(rho m), capped at N), plugin_namespace / plugin_version.

The body: A = the first m of [pool ranks < B by logit] + [the rest by logit] (pool = the top
``candidate_count`` by logit, ties to the lower index: ONNX TopK's rule); D = 1 - cosine
similarity (fp32); then exactly B - m fill steps, each taking the next seed member not yet chosen
if one is left, else argmax over unchosen j of min_{i in S} D[i, j] (ArgMax takes the first
maximum: ties to the lower index). The fill is an ONNX ``Loop`` with a constant trip count
(``fill="loop"``) or the same step unrolled B - m times (``fill="unrolled"``, a body specialised
to one node's attributes); the README's BTP section says which is exported and why.
"""
from __future__ import annotations

import numpy as np

from feather_export.onnx.graph import FEATHER_DOMAIN, OPSET, GraphBuilder
from feather_export.onnx.select_op import PLUGIN_VERSION, FunctionBody, gather_rows

OP_TYPE = "SelectBalanced"
ATTRIBUTES = ("budget", "num_image_tokens", "attention_count", "candidate_count",
              "plugin_namespace", "plugin_version")
INPUTS = ["logits", "features", "seed_priority", "hidden", "position_ids", "image_start"]
FILL_MODES = ("loop", "unrolled")
COSINE_EPS = np.float32(1e-12)       # methods.selection.COSINE_EPS


def seed_priority(num_tokens: int, seed) -> np.ndarray:
    """The ``seed_priority`` input: N - rank for members of the seed (first member highest)."""
    priority = np.full(num_tokens, -1.0, np.float32)
    priority[np.asarray(seed, np.int64)] = num_tokens - np.arange(len(seed), dtype=np.float32)
    return priority


def balanced_function(fill: str = "loop", fill_steps: int | None = None):
    """The FunctionProto of ``feather::SelectBalanced`` (``fill_steps`` = B - m for "unrolled")."""
    from onnx import helper

    body = FunctionBody()
    op, const = body.op, body.const
    budget, m = body.attr_int("budget"), body.attr_int("attention_count")
    pool = body.attr_int("candidate_count")
    zero, one, axis0 = const("zero", 0), const("one", 1), const("axis0", [0])
    n = op("Squeeze", [op("Shape", ["logits"], "logits_shape"), axis0], "n")
    idx = op("Range", [zero, n, one], "idx")
    idx_f = op("Cast", [idx], "idx_f", to=1)

    # attention set A: the pool by logit, front priority for ranks < B, the first m
    body.nodes.append(helper.make_node("TopK", ["logits", op("Unsqueeze", [pool, axis0], "pool_1d")],
                                       ["pool_values", "pool_idx"], axis=0, largest=1, sorted=1))
    back = op("Cast", [op("GreaterOrEqual", ["pool_idx", budget], "beyond_b")], "beyond_f", to=1)
    pool_f = op("Cast", [pool], "pool_f", to=1)
    pool_pos = op("Cast", [op("Range", [zero, pool, one], "pool_range")], "pool_pos", to=1)
    key = op("Add", [op("Mul", [back, pool_f], "back_key"), pool_pos], "front_key")
    body.nodes.append(helper.make_node("TopK", [key, op("Unsqueeze", [m, axis0], "m_1d")],
                                       ["a_keys", "a_pos"], axis=0, largest=0, sorted=1))
    a_set = op("Gather", ["pool_idx", "a_pos"], "a_set", axis=0)
    ones_m = op("Expand", [const("one_f", 1.0, np.float32), op("Shape", [a_set], "a_shape")], "ones_m")
    zeros_n = op("Expand", [const("zero_f", 0.0, np.float32), op("Shape", ["logits"], "n_shape")],
                 "zeros_n")
    chosen0 = op("Cast", [op("ScatterElements", [zeros_n, a_set, ones_m], "a_scatter", axis=0)],
                 "chosen0", to=9)

    # D = 1 - cosine similarity; nearest0[j] = min over A of D[i, j] (+inf for an empty A)
    norm = op("Max", [op("Sqrt", [op("ReduceSum", [op("Mul", ["features", "features"], "sq"),
                                                    const("axes_last", [-1])], "sq_sum",
                                     keepdims=1)], "norm"),
                      const("eps", COSINE_EPS, np.float32)], "norm_eps")
    unit = op("Div", ["features", norm], "unit")
    sim = op("MatMul", [unit, op("Transpose", [unit], "unit_t", perm=[1, 0])], "sim")
    dist = op("Sub", [const("one_f32", 1.0, np.float32), sim], "dist")
    inf = const("inf", np.inf, np.float32)
    in_a_rows = op("Unsqueeze", [chosen0, const("axis1", [1])], "in_a_rows")
    nearest0 = op("ReduceMin", [op("Where", [in_a_rows, dist, inf], "dist_from_a")], "nearest0",
                  axes=[0], keepdims=0)

    step_constants = {"idx": idx, "dist": dist, "neg_inf": const("neg_inf", -np.inf, np.float32),
                      "minus_one": const("minus_one", -1.0, np.float32),
                      "zero_f": const("zero_f0", 0.0, np.float32), "axis0": axis0}
    if fill == "loop":
        steps = op("Sub", [budget, m], "fill_steps")
        loop_body = _loop_body(step_constants)
        body.nodes.append(helper.make_node("Loop", [steps, "", chosen0, nearest0],
                                           ["chosen", "nearest_final"], body=loop_body))
        chosen = "chosen"
    elif fill == "unrolled":
        chosen, nearest = chosen0, nearest0
        for i in range(int(fill_steps)):
            chosen, nearest = _fill_step(body.op, chosen, nearest, step_constants, f"_{i}")
    else:
        raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}")

    # kept = the chosen ranks ascending: TopK of -rank over the chosen (-inf elsewhere)
    order = op("Where", [chosen, op("Neg", [idx_f], "neg_idx"), step_constants["neg_inf"]], "order")
    body.nodes.append(helper.make_node("TopK", [order, op("Unsqueeze", [budget, axis0], "budget_1d")],
                                       ["kept_neg", "kept_order"], axis=0, largest=1, sorted=1))
    op("Cast", [op("Neg", ["kept_neg"], "kept_f")], "kept", to=7)
    gather_rows(op, n, budget, zero, one)
    return helper.make_function(
        FEATHER_DOMAIN, OP_TYPE, INPUTS, ["kept", "hidden_out", "position_ids_out"], body.nodes,
        opset_imports=[helper.make_opsetid("", OPSET)], attributes=list(ATTRIBUTES))


def _fill_step(op, chosen: str, nearest: str, c: dict, sfx: str) -> tuple[str, str]:
    """One fill step: the next seed member not chosen, else the farthest unchosen token."""
    seed_left = op("Where", [chosen, c["minus_one"], "seed_priority"], f"seed_left{sfx}")
    has_seed = op("Greater", [op("ReduceMax", [seed_left], f"seed_best{sfx}", keepdims=0),
                              c["zero_f"]], f"has_seed{sfx}")
    from_seed = op("ArgMax", [seed_left], f"from_seed{sfx}", axis=0, keepdims=0)
    far = op("Where", [chosen, c["neg_inf"], nearest], f"far{sfx}")
    farthest = op("ArgMax", [far], f"farthest{sfx}", axis=0, keepdims=0)
    t = op("Where", [has_seed, from_seed, farthest], f"pick{sfx}")
    chosen = op("Or", [chosen, op("Equal", [c["idx"], t], f"is_pick{sfx}")], f"chosen{sfx}")
    row = op("Gather", [c["dist"], t], f"dist_row{sfx}", axis=0)
    return chosen, op("Min", [nearest, row], f"nearest{sfx}")


def _loop_body(c: dict):
    """The Loop body graph: (iteration, cond, chosen, nearest) -> (cond, chosen, nearest)."""
    from onnx import TensorProto, helper

    body = FunctionBody()
    chosen, nearest = _fill_step(body.op, "chosen_in", "nearest_in", c, "")
    body.op("Identity", ["cond_in"], "cond_out")
    body.op("Identity", [chosen], "chosen_out")
    body.op("Identity", [nearest], "nearest_out")
    return helper.make_graph(
        body.nodes, "fill_step",
        [helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("chosen_in", TensorProto.BOOL, ["n"]),
         helper.make_tensor_value_info("nearest_in", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("chosen_out", TensorProto.BOOL, ["n"]),
         helper.make_tensor_value_info("nearest_out", TensorProto.FLOAT, ["n"])])


def balanced_node(g: GraphBuilder, logits: str, features: str, seed: str, hidden: str,
                  position_ids: str, image_start: str, *, budget: int, num_image_tokens: int,
                  attention_count: int, candidate_count: int, outputs: list[str], name: str) -> None:
    """Add one ``feather::SelectBalanced`` node to ``g``."""
    g.op(OP_TYPE, logits, features, seed, hidden, position_ids, image_start, outputs=outputs,
         name=name, domain=FEATHER_DOMAIN, budget=budget, num_image_tokens=num_image_tokens,
         attention_count=attention_count, candidate_count=candidate_count,
         plugin_namespace=FEATHER_DOMAIN, plugin_version=PLUGIN_VERSION)
