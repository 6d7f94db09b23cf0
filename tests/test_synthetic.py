"""The synthetic shapes task: determinism, answers that match the drawn image, disjoint splits, bands."""
import numpy as np
import pytest

from feather_export.errors import FeatherError
from feather_export.quality.synthetic import (COLOURS, GRID_CELLS, IMAGE_SIZE, ROWS, SHAPES,
                                              SPLITS, answer_vocabulary, make_conversation,
                                              make_sample, make_samples, split_of)

CELL = IMAGE_SIZE / GRID_CELLS


@pytest.fixture(scope="module")
def test_samples():
    return make_samples("test", 150, seed=0)


def test_same_seed_same_samples_and_pixels():
    a, b = make_samples("train", 20, seed=3), make_samples("train", 20, seed=3)
    assert a == b
    assert all(np.array_equal(np.asarray(x.image()), np.asarray(y.image())) for x, y in zip(a, b))
    assert make_samples("train", 5, seed=3, start=7) == a[7:12]        # random access
    assert make_samples("train", 20, seed=4) != a


def _inside(sample_obj, x, y):
    x0, y0, x1, y1 = sample_obj.bbox()
    return x0 <= x < x1 and y0 <= y < y1


def test_objects_are_drawn_where_and_as_recorded(test_samples):
    for s in test_samples:
        pixels = np.asarray(s.image())
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        for o in s.scene.objects:
            x0, y0, x1, y1 = o.bbox()
            # fully inside its own grid cell, so region and band are unambiguous
            assert o.col * CELL <= x0 and x1 <= (o.col + 1) * CELL
            assert o.row * CELL <= y0 and y1 <= (o.row + 1) * CELL
            # the object's colour is at its centroid, the background at its cell's corner
            cy = (y0 + 2 * (y1 - 1)) // 3 if o.shape == "triangle" else o.cy
            assert tuple(pixels[cy, o.cx]) == o.rgb
            corner = pixels[int(o.row * CELL) + 1, int(o.col * CELL) + 1]
            assert tuple(corner) == s.scene.background
            assert o.colour in COLOURS and o.shape in SHAPES
            assert np.abs(np.subtract(o.rgb, COLOURS[o.colour])).max() <= 20
            if o.shape == "square":          # a square fills its bounding box's corners
                assert tuple(pixels[y0, x0]) == o.rgb
            else:                            # circle / triangle leave the top-left corner empty
                assert tuple(pixels[y0, x0]) == s.scene.background


def test_answers_follow_from_the_scene(test_samples):
    vocab = answer_vocabulary()
    for s in test_samples:
        objs = s.scene.objects
        assert s.answer in vocab[s.qtype]
        if s.qtype == "count":
            shape = next(sh for sh in SHAPES if f" {sh}s " in s.question)
            assert int(s.answer) == sum(o.shape == shape for o in objs)
            assert s.target is None and s.band is None
            continue
        target = objs[s.target]
        if s.qtype == "colour":
            assert s.question == f"What colour is the {target.shape}?"
            assert sum(o.shape == target.shape for o in objs) == 1        # unambiguous
            assert s.answer == target.colour
        else:
            assert s.question == f"Where is the {target.colour} {target.shape}?"
            assert sum((o.colour, o.shape) == (target.colour, target.shape) for o in objs) == 1
            row, col = int(target.cy // CELL), int(target.cx // CELL)
            assert s.answer == f"{ROWS[row]} {('left', 'centre', 'right')[col]}"
        assert s.band == ROWS[int(target.cy // CELL)]


def test_every_question_type_answer_and_band_occurs(test_samples):
    assert {s.qtype for s in test_samples} == {"colour", "count", "where"}
    assert {s.band for s in test_samples} == {None, "top", "middle", "bottom"}
    counts = {s.answer for s in test_samples if s.qtype == "count"}
    assert {"0", "1", "2"} <= counts
    top_rows = [o for s in test_samples for o in s.scene.objects if o.band == "top"]
    assert top_rows and all(o.bbox()[3] <= CELL for o in top_rows)       # top rows are used


def test_splits_are_disjoint_by_construction():
    keys = {}
    for split in SPLITS:
        samples = make_samples(split, 200, seed=0)
        assert all(split_of(s.scene) == split for s in samples)
        keys[split] = {s.scene.key() for s in samples}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["val"]
    assert not keys["val"] & keys["test"]


def test_conversation_shares_the_scene_with_distinct_questions():
    conv = make_conversation("train", 5, seed=0, turns=3)
    assert conv[0] == make_sample("train", 5, seed=0)
    assert all(c.scene == conv[0].scene for c in conv)
    assert len({c.question for c in conv}) == len(conv) >= 2


@pytest.mark.parametrize("call", [lambda: make_sample("dev", 0), lambda: make_sample("test", -1),
                                  lambda: make_samples("test", -2)])
def test_bad_arguments_are_user_errors(call):
    with pytest.raises(FeatherError):
        call()


def test_shapes_tokenizer_answers_are_short_and_ids_fixed():
    from feather_export.quality.tokenizer import build_shapes_tokenizer

    tok = build_shapes_tokenizer()
    assert tok.to_str() == build_shapes_tokenizer().to_str()
    assert tok.get_vocab_size(with_added_tokens=True) == 500
    assert (tok.token_to_id("<image>"), tok.token_to_id("<pad>"), tok.token_to_id("</s>")) == (498, 499, 2)
    for answers in answer_vocabulary().values():
        for answer in answers:
            ids = tok.encode(" " + answer, add_special_tokens=False).ids
            assert 1 <= len(ids) <= 2, answer
            assert tok.decode(ids) == answer
    assert tok.decode(tok.encode("Where is the big purple star?").ids, skip_special_tokens=True) \
        == "Where is the big purple star?"                                # byte fallback round-trips


def test_label_map_marks_exactly_the_drawn_pixels(test_samples):
    for s in test_samples[:30]:
        labels = s.scene.label_map()
        pixels = np.asarray(s.image())
        drawn = (pixels != np.asarray(s.scene.background, np.uint8)).any(axis=-1)
        assert np.array_equal(labels > 0, drawn)
        for i, o in enumerate(s.scene.objects):
            assert tuple(pixels[labels == i + 1][0]) == o.rgb
