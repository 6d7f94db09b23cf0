"""The PyTorch reference against transformers and against the method contract (docs/design.md §4)."""
import math

import numpy as np
import pytest
import torch

from conftest import TINY_NAMES, hf_generate, tiny_inputs
from feather_export.methods.config import grid_size
from feather_export.errors import FeatherError
from feather_export.models.geometry import geometry_of
from feather_export.methods.reference import reference_generate
from feather_export.methods.selection import grid_mask, select_tokens


@pytest.mark.parametrize("name", TINY_NAMES)
def test_none_equals_transformers_generate(tiny_models, name):
    model = tiny_models[name]
    for seed in (0, 1):
        pixels, ids = tiny_inputs(model, seed)
        expected = hf_generate(model, pixels, ids, 16)
        got = reference_generate(model, pixels, ids, method="none", max_new_tokens=16)
        assert got.token_ids == expected
        assert got.kept == []


@pytest.mark.parametrize("name", TINY_NAMES)
def test_budgets_that_keep_everything_equal_transformers(tiny_models, name):
    model = tiny_models[name]
    geo = geometry_of(model.config)
    n, layers = geo.num_image_tokens, geo.num_layers
    pixels, ids = tiny_inputs(model, 2)
    expected = hf_generate(model, pixels, ids, 16)
    for kwargs in (dict(method="feather", schedule=f"{layers // 4}:{n},{layers // 2}:{n}", stride=0),
                   dict(method="feather", schedule=f"1:{n}"),   # grid forced, rest fills budget
                   dict(method="fastv", budget=n),
                   dict(method="fastervlm", budget=n)):
        got = reference_generate(model, pixels, ids, max_new_tokens=16, **kwargs)
        assert got.token_ids == expected, kwargs
        assert all(k == list(range(n)) for k in got.kept)


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("fraction", [4, 9])
def test_feather_stages_contract(tiny_models, name, fraction):
    model = tiny_models[name]
    geo = geometry_of(model.config)
    b1 = geo.num_image_tokens // fraction
    pixels, ids = tiny_inputs(model, 3)
    res = reference_generate(model, pixels, ids, method="feather", budget=b1, max_new_tokens=2)
    stage1, stage2 = res.kept
    stride = _stride_for(geo, b1)
    grid = set(np.flatnonzero(grid_mask(geo.num_image_tokens, geo.grid_side, stride)))
    assert stride >= 3 and 2 * len(grid) <= b1
    assert len(stage1) == b1 and stage1 == sorted(set(stage1))
    assert grid <= set(stage1)
    b2 = max(1, math.floor(0.09 * b1 + 0.5))
    assert len(stage2) == b2 and stage2 == sorted(stage2) and set(stage2) <= set(stage1)
    # stage 2 keeps the top scorers among the stage-1 survivors (scores indexed by current set)
    scores2 = res.scores[1]
    rel = [stage1.index(i) for i in stage2]
    assert min(scores2[rel]) >= max(np.delete(scores2, rel))


def _stride_for(geo, budget):
    from feather_export.methods.config import default_grid_stride
    return default_grid_stride(geo.grid_side, budget)


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("method", ["fastv", "fastervlm"])
def test_single_stage_budgets(tiny_models, name, method):
    model = tiny_models[name]
    geo = geometry_of(model.config)
    pixels, ids = tiny_inputs(model, 4)
    for budget in (1, 37, geo.num_image_tokens // 4):
        res = reference_generate(model, pixels, ids, method=method, budget=budget, max_new_tokens=1)
        (kept,) = res.kept
        assert len(kept) == budget and kept == sorted(set(kept))
        scores = res.scores[0]
        assert min(scores[kept]) >= max(np.delete(scores, kept))


def test_fastervlm_scores_are_cls_probabilities(tiny_models):
    model = tiny_models["tiny"]
    pixels, ids = tiny_inputs(model, 5)
    res = reference_generate(model, pixels, ids, method="fastervlm", budget=10, max_new_tokens=1)
    # softmax over CLS + 576 patches, patch columns only: below 1 in sum, all positive
    total = float(res.scores[0].sum())
    assert 0 < total < 1 and (res.scores[0] > 0).all()


def test_selection_ties_go_to_lower_index():
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.9, 0.1], np.float32)
    assert select_tokens(scores, 3).tolist() == [0, 1, 4]
    assert select_tokens(np.zeros(6, np.float32), 2).tolist() == [0, 1]
    forced = np.array([0, 0, 0, 0, 0, 1], bool)
    assert select_tokens(scores, 3, forced).tolist() == [1, 4, 5]
    assert select_tokens(scores, 6).tolist() == list(range(6))


def test_grid_mask_counts():
    assert grid_mask(576, 24, 3).sum() == grid_size(24, 3) == 64
    assert grid_mask(256, 16, 3).sum() == 36
    assert np.flatnonzero(grid_mask(16, 4, 3)).tolist() == [0, 3, 12, 15]


def _hand_layer(rope_theta=1.0):
    """A Llama layer with 2 heads of dim 2, identity norm/q/k weights."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4, intermediate_size=8, num_attention_heads=2,
                      num_key_value_heads=2, rms_norm_eps=0.0,
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        layer.input_layernorm.weight.fill_(1.0)
        layer.self_attn.q_proj.weight.copy_(torch.eye(4))
        layer.self_attn.k_proj.weight.copy_(torch.eye(4))
    return layer, LlamaRotaryEmbedding(cfg)


# rows with RMS 1, so the RMSNorm is the identity: text, image x3, last text token
HAND_HIDDEN = [[1, 1, 1, 1], [1, -1, 1, -1], [-1, 1, 1, 1], [1, 1, -1, -1], [1, 1, 1, -1]]


def test_feather_scores_match_hand_computation():
    from feather_export.methods.scoring import feather_scores

    layer, _ = _hand_layer()
    hidden = torch.tensor([HAND_HIDDEN], dtype=torch.float32)
    got = feather_scores(layer, hidden, image_start=1, num_image=3).detach().numpy()
    # head 0 uses dims 0-1, head 1 dims 2-3; q = last row, keys = rows 1..3; scale 1/sqrt(2)
    q = [(1, 1), (1, -1)]
    keys = [[(1, -1), (1, -1)], [(-1, 1), (1, 1)], [(1, 1), (-1, -1)]]
    expected = np.zeros(3)
    for h in range(2):
        logits = [(q[h][0] * k[h][0] + q[h][1] * k[h][1]) / math.sqrt(2) for k in keys]
        exps = [math.exp(x) for x in logits]
        expected += np.array(exps) / sum(exps) / 2
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_fastv_scores_match_hand_computation_and_differ_from_rope_free():
    from feather_export.methods.scoring import fastv_scores, feather_scores

    layer, rotary = _hand_layer(rope_theta=1.0)   # head_dim 2: one frequency, angle = position
    hidden = torch.tensor([HAND_HIDDEN], dtype=torch.float32)
    positions = torch.arange(5)[None]
    got = fastv_scores(layer, rotary, hidden, positions, image_start=1, num_image=3).detach().numpy()

    def rot(v, p):
        return (v[0] * math.cos(p) - v[1] * math.sin(p), v[1] * math.cos(p) + v[0] * math.sin(p))

    expected = np.zeros(5)
    for h in range(2):
        q = rot(HAND_HIDDEN[4][2 * h:2 * h + 2], 4)
        logits = []
        for p, row in enumerate(HAND_HIDDEN):
            k = rot(row[2 * h:2 * h + 2], p)
            logits.append((q[0] * k[0] + q[1] * k[1]) / math.sqrt(2))
        exps = np.exp(logits)
        expected += exps / exps.sum() / 2
    np.testing.assert_allclose(got, expected[1:4], rtol=1e-5)
    rope_free = feather_scores(layer, hidden, 1, 3).detach().numpy()
    assert np.abs(rope_free / rope_free.sum() - got / got.sum()).max() > 0.05


def test_rope_changes_scores_on_tiny_model(tiny_models):
    from feather_export.methods.scoring import fastv_scores, feather_scores

    model = tiny_models["tiny-gqa"]
    lm = model.model.language_model
    pixels, ids = tiny_inputs(model, 6)
    hidden = lm.embed_tokens(torch.as_tensor(ids))
    with torch.no_grad():
        free = feather_scores(lm.layers[0], hidden, 4, 256).numpy()
        roped = fastv_scores(lm.layers[0], lm.rotary_emb, hidden, torch.arange(ids.shape[1])[None],
                             4, 256).numpy()
    assert np.abs(free / free.sum() - roped / roped.sum()).max() > 1e-3
    assert set(np.argsort(-free)[:32]) != set(np.argsort(-roped)[:32])


def test_reference_refuses_prompt_without_image_block(tiny_models):
    model = tiny_models["tiny"]
    pixels, _ = tiny_inputs(model)
    with pytest.raises(FeatherError, match="contiguous block of 576"):
        reference_generate(model, pixels, np.array([[1, 5, 6]]), method="none")


def test_reference_uses_current_transformers_api_without_warnings(tiny_models):
    """The reference calls transformers' current API (no deprecation/future warnings on any run)."""
    import warnings

    model = tiny_models["tiny"]
    pixels, ids = tiny_inputs(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in ("none", "feather", "fastv", "fastervlm"):
            reference_generate(model, pixels, ids, method=method, max_new_tokens=2)
    assert [str(w.message) for w in caught] == []
