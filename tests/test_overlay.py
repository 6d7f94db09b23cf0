"""Kept-token overlays: panels per stage, kept patches bright and outlined, dropped ones dimmed."""
import numpy as np
import pytest
from PIL import Image

from feather_export.errors import FeatherError
from feather_export.quality.overlay import (PANEL, _stage_label, draw_overlay, square_view,
                                            view_from_pixels)

LABEL = 18      # label strip above each panel


def _panel(sheet, i):
    return np.asarray(sheet)[LABEL:LABEL + PANEL, i * (PANEL + 4):i * (PANEL + 4) + PANEL].astype(int)


def test_overlay_panels_show_kept_and_dropped_patches(tmp_path):
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    out = draw_overlay(image, [[0, 5, 15], [5]], 4, tmp_path / "o.png")
    sheet = Image.open(out)
    assert sheet.size == (3 * PANEL + 2 * 4, PANEL + LABEL)
    cell = PANEL // 4
    centre = lambda idx: (idx // 4 * cell + cell // 2, idx % 4 * cell + cell // 2)   # noqa: E731
    inp, stage1, stage2 = (_panel(sheet, i) for i in range(3))
    assert (inp[centre(3)] == 200).all()                        # the input panel is untouched
    for idx in (0, 5, 15):
        assert (stage1[centre(idx)] == 200).all()               # kept: original brightness
    assert (stage1[centre(3)] < 100).all()                      # dropped: dimmed
    assert (stage2[centre(5)] == 200).all() and (stage2[centre(0)] < 100).all()
    r, c = divmod(5, 4)
    assert tuple(stage1[r * cell, c * cell + cell // 2]) == (255, 40, 200)   # outline of a kept patch


def test_a_cls_image_token_is_labelled_not_drawn(tmp_path):
    """raster_offset 1 (strategy full): index 0 is the CLS, index i >= 1 is patch i - 1."""
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    out = draw_overlay(image, [[0, 1, 6, 16], [6]], 4, tmp_path / "o.png", raster_offset=1)
    cell = PANEL // 4
    centre = lambda idx: (idx // 4 * cell + cell // 2, idx % 4 * cell + cell // 2)   # noqa: E731
    stage1, stage2 = (_panel(Image.open(out), i) for i in (1, 2))
    for patch in (0, 5, 15):                                    # image tokens 1, 6, 16
        assert (stage1[centre(patch)] == 200).all()
    assert (stage1[centre(3)] < 100).all() and (stage1[centre(1)] < 100).all()
    assert (stage2[centre(5)] == 200).all() and (stage2[centre(0)] < 100).all()
    assert _stage_label(0, np.array([0, 1, 6, 16]), 17, 1) == "stage 1: 4/17 kept, CLS kept"
    assert _stage_label(1, np.array([6]), 17, 1) == "stage 2: 1/17 kept, CLS dropped"
    assert _stage_label(0, np.array([0, 5]), 16, 0) == "stage 1: 2/16 kept"
    with pytest.raises(FeatherError, match=r"17 image tokens \(1 before the 4 x 4 grid\)"):
        draw_overlay(image, [[17]], 4, tmp_path / "p.png", raster_offset=1)
    with pytest.raises(FeatherError, match="raster_offset"):
        draw_overlay(image, [[1]], 4, tmp_path / "p.png", raster_offset=-1)


def test_no_pruning_draws_only_the_input(tmp_path):
    out = draw_overlay(np.zeros((30, 50, 3), np.uint8), [], 8, tmp_path / "o.png", title="none")
    assert Image.open(out).size == (PANEL, PANEL + 2 * LABEL)


def test_square_view_frames_like_the_clip_preprocessor():
    wide = Image.new("RGB", (300, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (100, 0, 200, 100))                  # the centre third is red
    view = square_view(wide, 50)
    assert view.size == (50, 50)
    assert np.asarray(view)[25, 25].tolist() == [255, 0, 0]


def test_view_from_pixels_inverts_the_preprocessor(tmp_path):
    from feather_runtime.preprocess import ImagePreprocessor, write_preprocessor_config

    write_preprocessor_config(tmp_path, 28)
    pre = ImagePreprocessor.from_dir(tmp_path)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    view = view_from_pixels(pre(image), pre.image_mean, pre.image_std)
    assert np.abs(np.asarray(view).astype(int) - image).max() <= 1


@pytest.mark.parametrize("kept, side", [([[16]], 4), ([[-1]], 4), ([[0]], 0)])
def test_bad_indices_or_grid_are_user_errors(tmp_path, kept, side):
    with pytest.raises(FeatherError):
        draw_overlay(Image.new("RGB", (8, 8)), kept, side, tmp_path / "o.png")


def test_missing_output_directory_is_a_user_error(tmp_path):
    with pytest.raises(FeatherError, match="does not exist"):
        draw_overlay(Image.new("RGB", (8, 8)), [[0]], 2, tmp_path / "nope" / "o.png")
