"""BTP (docs/design.md §4): the schedule defaults, the lambda rules and the selection rules on hand-made inputs."""
import numpy as np
import pytest

from feather_export.errors import FeatherError
from feather_export.methods.config import (PruneConfig, btp_default_counts, btp_default_layers,
                                           parse_btp_lambda)
from feather_export.methods.selection import (btp_attention_set, btp_select, cosine_distance,
                                              farthest_point_seed)
from feather_export.models.geometry import ModelGeometry

LLAVA = ModelGeometry(num_layers=32, num_image_tokens=576, grid_side=24)


# ---- configuration --------------------------------------------------------------------------------

def test_default_schedule_is_the_7b_reference_on_llava():
    cfg = PruneConfig.create("btp", LLAVA)
    assert [(s.layer, s.keep, s.num_in) for s in cfg.stages] == [
        (3, 288, 576), (6, 144, 288), (14, 48, 144), (22, 0, 48)]
    # m = floor(lambda B); pool = floor(rho m) capped at n; |F| = round(B1/2) at stage 1 only
    assert [(s.attention_count, s.candidate_count, s.seed_count) for s in cfg.stages] == [
        (86, 318, 144), (129, 193, 0), (48, 57, 0), (0, 0, 0)]
    assert [s.weight for s in cfg.stages] == ["0.3", "0.9", "1.0", ""]
    assert cfg.budget == 288 and cfg.prune_layers == (3, 6, 14, 22)


def test_default_layers_scale_round_half_up_and_increase():
    assert btp_default_layers(32, 576) == (3, 6, 14, 22)
    assert btp_default_layers(8, 256) == (1, 2, 4, 6)        # 0.75, 1.5, 3.5, 5.5 -> half up
    assert btp_default_layers(40, 576) == (4, 8, 18, 28)     # 3.75, 7.5, 17.5, 27.5
    assert btp_default_layers(6, 576) == (1, 2, 3, 4)        # 0.56->1, 1.1->1 raised to 2, 2.6->3, 4.1->4
    assert btp_default_counts(576) == (288, 144, 48, 0)
    assert btp_default_counts(256) == (128, 64, 21, 0)       # 21.33
    assert btp_default_counts(90) == (45, 23, 8, 0)          # 22.5 -> 23, 7.5 -> 8 (half up)


def test_default_refused_when_it_passes_the_last_layer_with_a_schedule_suggested():
    with pytest.raises(FeatherError, match=r"--schedule 1:288,2:144,3:0") as err:
        PruneConfig.create("btp", ModelGeometry(4, 576, 24))
    assert "4-layer" in str(err.value)
    suggested = str(err.value).rsplit("--schedule ", 1)[1]
    cfg = PruneConfig.create("btp", ModelGeometry(4, 576, 24), schedule=suggested)   # taken as is
    assert [s.keep for s in cfg.stages] == [288, 144, 0]


def test_schedule_ending_in_zero_and_lambda_rules():
    cfg = PruneConfig.create("btp", LLAVA, schedule="2:100,5:0", btp_lambda="0.55")
    s1, s2 = cfg.stages
    assert (s1.attention_count, s1.candidate_count, s1.seed_count) == (55, 203, 50)  # 3.7*55 = 203.5
    assert s2.keep == 0 and s2.attention_count == 0
    # stages beyond the list reuse the last weight; floor on exact decimals (0.3 * 10 = 3, not 2.999)
    cfg = PruneConfig.create("btp", LLAVA, schedule="1:10,2:5,3:3", btp_lambda="0.3,0.6")
    assert [(s.weight, s.attention_count) for s in cfg.stages] == [("0.3", 3), ("0.6", 3), ("0.6", 1)]
    assert [s.candidate_count for s in cfg.stages] == [11, 4, 1]             # 3.7*3, 1.5*3, 1.2*1
    assert parse_btp_lambda("0.3, 0.9,1.0") == parse_btp_lambda(("0.3", "0.9", "1.0"))


def test_btp_config_roundtrips_through_the_manifest_dict():
    cfg = PruneConfig.create("btp", LLAVA, schedule="3:288,6:144,14:0")
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg


# ---- selection rules on hand-made inputs ---------------------------------------------------------

def test_farthest_point_seed_manhattan_from_zero_ties_low():
    # 3x3: start 0; farthest is 8 (distance 4); then 2 and 6 tie at 2 from {0, 8}: 2 (lower);
    # then 4 and 6 tie at 2 from {0, 8, 2}: 4 (lower); then 6 (2); then 1, 3, 5, 7 tie at 1
    assert farthest_point_seed(3, 5).tolist() == [0, 8, 2, 4, 6]
    assert farthest_point_seed(3, 9).tolist() == [0, 8, 2, 4, 6, 1, 3, 5, 7]
    seed = farthest_point_seed(24, 144)
    assert len(set(seed.tolist())) == 144 and seed[:2].tolist() == [0, 575]
    # a CLS image token before the raster (strategy full): the same raster points, shifted by 1
    assert farthest_point_seed(3, 5, 1).tolist() == [1, 9, 3, 5, 7]
    assert farthest_point_seed(3, 20, 1).tolist() == list(farthest_point_seed(3, 9) + 1)


def test_attention_set_front_priority_and_ties():
    a = np.array([5.0, 1.0, 9.0, 9.0, 7.0, 8.0, 0.0, 6.0], np.float32)
    # by a: 2, 3 (tie -> lower first), 5, 4, 7, 0, 1, 6; pool of 5: [2, 3, 5, 4, 7];
    # keep 4: ranks < 4 first ([2, 3]), then [5, 4, 7]; m = 3 -> {2, 3, 5}
    assert btp_attention_set(a, keep=4, attention_count=3, candidate_count=5).tolist() == [2, 3, 5]
    # ranks < keep outrank higher logits beyond it: keep 3 -> [2] then [3, 5, 4, 7]
    assert btp_attention_set(a, keep=3, attention_count=3, candidate_count=5).tolist() == [2, 3, 5]
    assert btp_attention_set(a, keep=5, attention_count=4, candidate_count=6).tolist() == [2, 3, 4, 0]
    assert btp_attention_set(a, keep=4, attention_count=0, candidate_count=0).tolist() == []


def _unit(deg):
    r = np.deg2rad(deg)
    return [np.cos(r), np.sin(r)]


def test_fill_is_greedy_max_min_cosine_after_the_seed():
    # 2-D directions: cosine distance grows with the angle between them
    features = np.array([_unit(d) for d in (0, 10, 90, 100, 180, 45)], np.float32)
    a = np.array([9, 0, 0, 0, 0, 0], np.float32)
    # A = {0}; farthest from 0 is 4 (180 deg); then min distance to {0, 4}: 2 and 3 are 90/80 deg
    # away -> 2 (90 from 0, 90 from 180)
    assert btp_select(a, features, keep=3, attention_count=1, candidate_count=2).tolist() == [0, 2, 4]
    # the seed goes first, in its order, skipping members already in A, while |S| < keep
    got = btp_select(a, features, keep=3, attention_count=1, candidate_count=2, seed=[0, 1, 5])
    assert got.tolist() == [0, 1, 5]
    got = btp_select(a, features, keep=4, attention_count=1, candidate_count=2, seed=[1])
    assert got.tolist() == [0, 1, 2, 4]                 # A={0}, F adds 1, then 4 (180), then 2
    # empty A and no seed: min over an empty S is +inf, so the first pick is index 0 (ties low)
    assert btp_select(a, features, keep=2, attention_count=0, candidate_count=0).tolist() == [0, 4]
    assert btp_select(a, features, keep=0, attention_count=0, candidate_count=0).tolist() == []


def test_fill_ties_go_to_the_lower_index():
    features = np.array([[1, 0], [0, 1], [0, 1], [-1, 0]], np.float32)
    a = np.array([0, 0, 0, 9], np.float32)
    # A = {3}; 0 is farthest (2); then 1 and 2 tie (distance 1 to both) -> 1
    assert btp_select(a, features, keep=3, attention_count=1, candidate_count=1).tolist() == [0, 1, 3]


def test_cosine_distance_is_fp32_and_zero_safe():
    d = cosine_distance(np.array([[3, 4], [6, 8], [0, 0]], np.float32))
    assert d.dtype == np.float32 and abs(d[0, 1]) < 1e-6 and d[2, 2] == 1.0
