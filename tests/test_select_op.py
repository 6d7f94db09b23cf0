"""feather::SelectTokens function body in ONNX Runtime vs the numpy oracle, adversarial cases."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from feather_export.onnx.graph import GraphBuilder
from feather_export.onnx.select_op import select_function, select_node
from feather_export.methods.selection import grid_mask, select_tokens


def _session(n, side, budget, stride, d=3, offset=0):
    g = GraphBuilder("select")
    g.input("scores", 1, [n])
    g.input("hidden", 1, [1, "S", d])
    g.input("position_ids", 7, [1, "S"])
    g.input("image_start", 7, [])
    select_node(g, "scores", "hidden", "position_ids", "image_start", budget=budget,
                num_image_tokens=n, grid_side=side, grid_stride=stride, criterion="test",
                outputs=["kept", "h", "p"], name="sel", raster_offset=offset)
    g.outputs += [helper.make_tensor_value_info("kept", 7, [budget]),
                  helper.make_tensor_value_info("h", 1, [1, "S2", d]),
                  helper.make_tensor_value_info("p", 7, [1, "S2"])]
    model = g.model([select_function()])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _cases():
    """(name, scores, budget, stride, raster offset): offset 1 = a CLS token before the raster."""
    rng = np.random.default_rng(0)
    yield "random", rng.random(576).astype(np.float32), 144, 3, 0
    yield "all-equal", np.full(576, 0.25, np.float32), 144, 3, 0
    yield "coarse-ties", (np.round(rng.random(576) * 4) / 4).astype(np.float32), 100, 4, 0
    yield "budget-is-n", rng.random(576).astype(np.float32), 576, 0, 0
    yield "grid-only", rng.random(576).astype(np.float32), 64, 3, 0
    yield "no-grid", rng.random(256).astype(np.float32), 23, 0, 0
    yield "budget-1", rng.random(256).astype(np.float32), 1, 0, 0
    yield "grid-tokens-score-low", np.where(grid_mask(576, 24, 3), 0.0, 1.0).astype(np.float32), 100, 3, 0
    inf = rng.random(576).astype(np.float32)
    inf[[1, 2, 5]] = np.inf
    yield "inf-scores", inf, 70, 3, 0
    yield "cls-random", rng.random(577).astype(np.float32), 144, 3, 1
    yield "cls-all-equal", np.full(577, 0.5, np.float32), 100, 4, 1          # CLS wins the tie
    yield "cls-grid-only", rng.random(577).astype(np.float32), 64, 3, 1
    yield "cls-budget-is-n", rng.random(257).astype(np.float32), 257, 2, 1
    low = np.where(grid_mask(577, 24, 3, 1), 0.0, 1.0).astype(np.float32)
    low[0] = -1.0                                                   # CLS lowest: never forced
    yield "cls-scores-lowest", low, 100, 3, 1
    yield "two-before-raster", rng.random(66).astype(np.float32), 20, 3, 2


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("image_start", [0, 5])
def test_function_body_matches_oracle(case, image_start):
    _, scores, budget, stride, offset = case
    n = scores.size
    side = int(round((n - offset) ** 0.5))
    sess = _session(n, side, budget, stride, offset=offset)
    seq = image_start + n + 4
    hidden = np.random.default_rng(1).standard_normal((1, seq, 3)).astype(np.float32)
    positions = np.arange(seq, dtype=np.int64)[None] * 2
    kept, h, p = sess.run(None, {"scores": scores, "hidden": hidden, "position_ids": positions,
                                 "image_start": np.asarray(image_start, np.int64)})
    expected = select_tokens(scores, budget, grid_mask(n, side, stride, offset))
    assert kept.tolist() == expected.tolist()
    rows = np.concatenate([np.arange(image_start), image_start + expected,
                           np.arange(image_start + n, seq)])
    np.testing.assert_array_equal(h, hidden[:, rows])
    np.testing.assert_array_equal(p, positions[:, rows])


def test_grid_sits_on_the_raster_after_the_offset():
    """Offset 1: token 0 (the CLS) is never forced; the grid is raster (r, c) -> 1 + r * side + c."""
    grid = np.flatnonzero(grid_mask(17, 4, 2, 1))
    assert grid.tolist() == [1, 3, 9, 11]
    assert np.flatnonzero(grid_mask(16, 4, 2)).tolist() == [0, 2, 8, 10]
    scores = np.zeros(17, np.float32)
    scores[0] = -1.0
    assert 0 not in select_tokens(scores, 16, grid_mask(17, 4, 2, 1)).tolist()
