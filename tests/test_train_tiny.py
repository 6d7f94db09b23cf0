"""The trainer's pieces (no real training in CI): batches, the fast forward, a two-step smoke run."""
import json

import numpy as np
import pytest

from feather_export.errors import FeatherError
from feather_export.quality.synthetic import make_conversation, make_samples
from feather_export.quality.train import (Encoder, ModelSpec, TrainOptions, build_model,
                                          exact_match, forward, save_untrained,
                                          shapes_llava_config, sincos_2d, train)

SMALL = ModelSpec(image_size=56, patch_size=14, vision_hidden=16, hidden=16, intermediate=32)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return save_untrained(tmp_path_factory.mktemp("small") / "m", SMALL, seed=0)


def test_config_is_what_the_exporter_expects():
    from feather_export.models.geometry import geometry_of

    cfg = shapes_llava_config(ModelSpec())
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.text_config.rope_parameters["rope_type"] == "default"
    assert cfg.image_token_index == 498 and cfg.text_config.vocab_size == 500
    geo = geometry_of(cfg)
    assert (geo.num_layers, geo.num_image_tokens, geo.grid_side) == (4, 256, 16)


def test_same_seed_same_weights():
    a, b = build_model(SMALL, 7), build_model(SMALL, 7)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert np.array_equal(p.numpy(), q.numpy()), name


def test_sincos_positions():
    table = sincos_2d(4, 8)
    assert table.shape == (16, 8) and np.abs(table).max() <= 1
    assert len({row.tobytes() for row in table}) == 16          # every patch position differs
    with pytest.raises(FeatherError):
        sincos_2d(4, 6)


def test_batch_layout_and_fast_forward_match_transformers(small_dir):
    import torch

    from feather_export.models.checkpoint import load_checkpoint

    model = load_checkpoint(small_dir)
    enc = Encoder(small_dir, model.config.image_seq_length)
    convs = [make_conversation("train", i, 0, 3) for i in range(3)]
    batch = enc.batch(convs)
    tok = enc.builder.tokenizer
    # every supervised position predicts the next input token (or the final EOS)
    for r, c, t in zip(batch.rows.tolist(), batch.cols.tolist(), batch.targets.tolist()):
        nxt = batch.input_ids[r, c + 1] if c + 1 < batch.input_ids.shape[1] else None
        assert t == tok.token_to_id("</s>") or nxt == t
    assert len(batch.answer_len) == sum(len(c) for c in convs)
    assert batch.targets.tolist().count(tok.token_to_id("</s>")) == len(batch.answer_len)
    with torch.no_grad():
        logits, states, image = forward(model, batch)
        full = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits
        tower = model.model.vision_tower(batch.pixel_values, output_hidden_states=True)
    assert torch.allclose(logits, full[batch.rows, batch.cols], atol=1e-5)
    assert torch.allclose(states, tower.hidden_states[model.config.vision_feature_layer], atol=1e-6)
    assert states.shape == (3, 1 + 16, SMALL.vision_hidden)
    # teacher-forced exact match is per answer: force the right argmax everywhere -> all correct
    perfect = torch.nn.functional.one_hot(batch.targets, logits.shape[-1]).float()
    assert exact_match(perfect, batch).all()


def test_single_turn_batch_is_the_runtime_prompt(small_dir):
    from feather_runtime.prompt import PromptBuilder

    sample = make_samples("test", 1)[0]
    enc = Encoder(small_dir, 16)
    batch = enc.batch([sample])
    prompt = PromptBuilder.from_dir(small_dir).build(sample.question, 16)[0]
    assert batch.input_ids[0, :len(prompt)].tolist() == prompt.tolist()
    assert batch.cols[0] == len(prompt) - 1


def test_two_step_smoke_run_writes_a_loadable_checkpoint(tmp_path):
    from feather_export.models.checkpoint import load_checkpoint

    out = tmp_path / "ckpt"
    report = train(TrainOptions(out=str(out), steps=2, vision_steps=2, batch_size=2, eval_every=2,
                                eval_n=4, spec=SMALL),
                   log=lambda m: None)
    assert report["history"][-1]["step"] == 2
    assert json.loads((out / "training.json").read_text())["options"]["steps"] == 2
    model = load_checkpoint(out)
    assert model.config.image_seq_length == 16
    with pytest.raises(FeatherError, match="not empty"):
        train(TrainOptions(out=str(out), steps=1, spec=SMALL), log=lambda m: None)


def test_training_is_reproducible_from_the_seed(tmp_path):
    """Same options and seed -> byte-identical weights (the committed checkpoint's claim, small)."""
    opts = dict(steps=3, vision_steps=2, batch_size=2, eval_every=3, eval_n=2, spec=SMALL, threads=1)
    for name in ("a", "b"):
        train(TrainOptions(out=str(tmp_path / name), **opts), log=lambda m: None)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    train(TrainOptions(out=str(tmp_path / "c"), seed=1, **opts), log=lambda m: None)
    assert a != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_aux_targets_describe_the_scene():
    from feather_export.quality.synthetic import COLOURS, SHAPES
    from feather_export.quality.train_aux import SCENE_SIZE, patch_targets, scene_target

    for s in make_samples("train", 20):
        colour, shape, centre = patch_targets(s, 16)
        assert centre.sum() == len(s.scene.objects)                 # one centre patch per object
        assert ((colour > 0) == (shape > 0)).all()
        shown = {(list(COLOURS)[c - 1], SHAPES[k - 1]) for c, k in zip(colour, shape) if c}
        assert shown == {(o.colour, o.shape) for o in s.scene.objects}
        labels = s.scene.label_map()
        for i in np.flatnonzero(centre):                            # centre patches show an object
            r, c = divmod(int(i), 16)
            assert labels[14 * r:14 * r + 14, 14 * c:14 * c + 14].any()
        target = scene_target(s)
        assert target.shape == (SCENE_SIZE,) and target[-9:].sum() == len(s.scene.objects)


def test_committed_checkpoint_matches_this_code():
    """The committed tiny-shapes files are what train_tiny writes: same tokenizer, same config."""
    from feather_export.models.checkpoint import TINY_SHAPES_DIR as DEFAULT_MODEL_DIR
    from feather_export.models.checkpoint import load_config
    from feather_export.quality.tokenizer import build_shapes_tokenizer

    report = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    assert (DEFAULT_MODEL_DIR / "tokenizer.json").read_text() == build_shapes_tokenizer().to_str(pretty=True)
    spec = ModelSpec(**report["options"]["spec"])
    expected, saved = shapes_llava_config(spec), load_config(DEFAULT_MODEL_DIR)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size", "rope_parameters"):
        assert getattr(saved.text_config, key) == getattr(expected.text_config, key), key
    for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
        assert getattr(saved.vision_config, key) == getattr(expected.vision_config, key), key
    # the saved weights are the best validation evaluation's, and that evaluation is in the history
    saved = [h for h in report["history"] if h.get("step") == report["saved_step"]]
    assert saved and saved[0]["val"]["all"] == report["saved_val"]
    assert report["history"][-1]["val"]["all"] >= 0.95 and report["saved_val"] >= 0.95
