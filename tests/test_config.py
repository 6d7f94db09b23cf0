import pytest

from feather_export.models.geometry import ModelGeometry
from feather_export.methods.config import (PruneConfig, default_grid_stride, feather_stage2_keep,
                                           grid_size, parse_schedule)
from feather_export.errors import FeatherError

LLAVA = ModelGeometry(num_layers=32, num_image_tokens=576, grid_side=24)


def test_feather_defaults_follow_design():
    cfg = PruneConfig.create("feather", LLAVA, budget=144)
    s1, s2 = cfg.stages
    assert (s1.layer, s1.keep, s1.num_in, s1.grid_stride) == (8, 144, 576, 3)
    assert (s2.layer, s2.keep, s2.num_in, s2.grid_stride) == (16, 13, 144, 0)
    assert cfg.budget == 144 and cfg.prune_layers == (8, 16)


def test_stride_rule():
    assert grid_size(24, 3) == 64
    assert default_grid_stride(24, 144) == 3        # 64 <= 72
    assert default_grid_stride(24, 100) == 4        # 64 > 50, 36 <= 50
    assert default_grid_stride(24, 16) == 12        # strides 3..11 give |G| > 8; 12 gives 4
    assert grid_size(24, default_grid_stride(24, 16)) * 2 <= 16
    assert default_grid_stride(24, 1) == 0


def test_stage2_default_rounds_half_up():
    assert feather_stage2_keep(144) == 13
    assert feather_stage2_keep(50) == 5
    assert feather_stage2_keep(5) == 1


def test_schedule_string_overrides_layers_and_counts():
    cfg = PruneConfig.create("feather", LLAVA, schedule="8:144,16:13")
    assert [(s.layer, s.keep) for s in cfg.stages] == [(8, 144), (16, 13)]
    assert parse_schedule("3:288, 6:144,14:48") == ((3, 288), (6, 144), (14, 48))


def test_raster_offset_lives_on_the_first_stage_only():
    """Strategy full on CLIP: N = 1 + 24 x 24; the first stage (every image token) records that the
    raster starts at index 1; the grid stride is computed on the raster alone."""
    full = ModelGeometry(num_layers=32, num_image_tokens=577, grid_side=24, raster_offset=1)
    cfg = PruneConfig.create("feather", full, budget=144)
    assert [(s.keep, s.num_in, s.grid_stride, s.raster_offset) for s in cfg.stages] == \
        [(144, 577, 3, 1), (13, 144, 0, 0)]
    assert PruneConfig.create("feather", full).budget == 577 // 4
    btp = PruneConfig.create("btp", full, schedule="3:289,6:144,14:0")
    assert [s.raster_offset for s in btp.stages] == [1, 0, 0] and btp.stages[0].seed_count == 145
    assert PruneConfig.from_dict(btp.to_dict()) == btp
    assert PruneConfig.create("fastervlm", full, budget=577).stages[0].raster_offset == 1
    assert PruneConfig.create("feather", LLAVA, budget=144).stages[0].raster_offset == 0


def test_roundtrip_dict():
    cfg = PruneConfig.create("fastv", LLAVA, budget=64)
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg


def test_fastv_and_fastervlm():
    fastv = PruneConfig.create("fastv", LLAVA, budget=64)
    assert [(s.layer, s.keep) for s in fastv.stages] == [(2, 64)]
    fvlm = PruneConfig.create("fastervlm", LLAVA, budget=58)
    assert fvlm.stages[0].criterion == "fastervlm" and fvlm.budget == 58 and fvlm.prune_layers == ()


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="feather", budget=0), "between 1 and 576"),
    (dict(method="fastv", budget=577), "between 1 and 576"),
    (dict(method="feather", schedule="16:144,8:13"), "increase"),
    (dict(method="feather", schedule="8:144,40:13"), "between 1 and 31"),
    (dict(method="fastv", schedule="0:100"), "between 1 and 31"),
    (dict(method="feather", schedule="8:144,16:200"), "between 1 and 144"),
    (dict(method="feather", budget=60, stride=2), "more than the budget"),
    (dict(method="feather", budget=1), "too small"),
    (dict(method="feather", schedule="8-144"), "LAYER:COUNT"),
    (dict(method="feather", budget=100, schedule="8:144"), "disagrees"),
    (dict(method="none", budget=144), "keeps every token"),
    (dict(method="fastv", budget=10, stride=3), "only applies"),
    (dict(method="fastervlm", schedule="2:10"), "before the LLM"),
    (dict(method="magic"), "unknown --method"),
    (dict(method="btp", schedule="3:288,6:0,14:48"), "only the last stage may keep 0"),
    (dict(method="btp", schedule="3:288,6:300"), "must decrease"),
    (dict(method="btp", schedule="3:288,6:288"), "must decrease"),
    (dict(method="btp", schedule="6:288,3:144"), "increase"),
    (dict(method="btp", budget=144), "disagrees with BTP"),
    (dict(method="btp", btp_lambda="0.3,1.5"), "between 0 and 1"),
    (dict(method="btp", btp_lambda="x"), "between 0 and 1"),
    (dict(method="feather", budget=144, btp_lambda="0.3"), "only applies to --method btp"),
])
def test_bad_configs_raise_project_error(kwargs, message):
    method = kwargs.pop("method")
    with pytest.raises(FeatherError, match=message):
        PruneConfig.create(method, LLAVA, **kwargs)


def test_config_is_frozen():
    cfg = PruneConfig.create("feather", LLAVA, budget=144)
    with pytest.raises(Exception):
        cfg.method = "fastv"
