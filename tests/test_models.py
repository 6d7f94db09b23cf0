"""Tiny registry, checkpoint directories and their refusals."""
import json

import pytest
import torch

from conftest import tiny_inputs
from feather_export.errors import FeatherError
from feather_export.models.tiny import TINY_MODELS, build_tiny_model, make_tiny
from feather_export.models.checkpoint import check_checkpoint_dir, load_checkpoint
from feather_export.models.geometry import ModelGeometry, geometry_of


def test_registry_geometry(tiny_models):
    tiny, gqa = (geometry_of(tiny_models[n].config) for n in ("tiny", "tiny-gqa"))
    assert (tiny.num_image_tokens, tiny.grid_side, tiny.num_layers) == (576, 24, 4)
    assert (gqa.num_image_tokens, gqa.grid_side, gqa.num_layers) == (256, 16, 8)
    text = tiny_models["tiny-gqa"].config.text_config
    assert text.num_key_value_heads < text.num_attention_heads
    assert text.rope_parameters["rope_theta"] != tiny_models["tiny"].config.text_config.rope_parameters["rope_theta"]
    assert tiny_models["tiny"].config.vision_config.num_hidden_layers == 2


def test_weights_are_deterministic():
    a, b = build_tiny_model("tiny"), build_tiny_model("tiny")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_make_tiny_roundtrip(tmp_path, tiny_models):
    path = make_tiny("tiny-gqa", tmp_path / "ckpt")
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (path / name).is_file()
    loaded = load_checkpoint(path)
    pixels, ids = tiny_inputs(loaded, 0)
    with torch.no_grad():
        x = loaded(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels)).logits
        y = tiny_models["tiny-gqa"](input_ids=torch.as_tensor(ids),
                                    pixel_values=torch.as_tensor(pixels)).logits
    assert torch.equal(x, y)


def test_make_tiny_refuses_non_empty_dir(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(FeatherError, match="not empty"):
        make_tiny("tiny", tmp_path / "x")
    with pytest.raises(FeatherError, match="unknown tiny model"):
        make_tiny("huge", tmp_path / "y")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny("tiny", tmp_path_factory.mktemp("ck") / "tiny")


def _copy(checkpoint, tmp_path, drop=(), config=None):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(checkpoint, dst)
    for name in drop:
        (dst / name).unlink()
    if config is not None:
        (dst / "config.json").write_text(config)
    return dst


@pytest.mark.parametrize("drop, config, message", [
    ((), None, None),
    (("config.json",), None, "no config.json"),
    ((), "{not json", "not valid JSON"),
    ((), "[1, 2]", "JSON object"),
    ((), json.dumps({"model_type": "llama"}), "only 'llava'"),
    ((), json.dumps({"model_type": "llava", "text_config": {"model_type": "gemma"}}),
     "text model 'gemma' is not supported \\(supported: llama, mistral, qwen2\\)"),
    ((), json.dumps({"model_type": "llava", "vision_config": {"model_type": "dinov2"}}),
     "vision model 'dinov2' is not supported"),
    ((), json.dumps({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}}),
     "no CLS token.*use 'full'"),
    (("model.safetensors",), None, "no \\*.safetensors"),
    (("tokenizer.json",), None, "no tokenizer.json"),
    (("preprocessor_config.json",), None, "no preprocessor_config.json"),
])
def test_checkpoint_dir_checks(checkpoint, tmp_path, drop, config, message):
    path = _copy(checkpoint, tmp_path, drop, config)
    if message is None:
        assert check_checkpoint_dir(path) == path
    else:
        with pytest.raises(FeatherError, match=message):
            check_checkpoint_dir(path)


def test_corrupt_weights_refused(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(FeatherError, match="could not load"):
        load_checkpoint(path)


def test_missing_and_non_directory(tmp_path):
    with pytest.raises(FeatherError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FeatherError, match="not a directory"):
        load_checkpoint(tmp_path / "file")


def test_full_strategy_on_clip_puts_the_cls_before_the_raster(tiny_models):
    """Strategy full on a CLIP tower: N = 1 + side x side image tokens, the raster at offset 1."""
    import copy

    config = copy.deepcopy(tiny_models["tiny"].config)
    assert geometry_of(config) == ModelGeometry(4, 576, 24, 0)
    config.vision_feature_select_strategy = "full"
    geo = geometry_of(config)
    assert (geo.num_image_tokens, geo.grid_side, geo.raster_offset, geo.raster_tokens) == (577, 24, 1, 576)
    with pytest.raises(FeatherError, match="square grid"):
        ModelGeometry(4, 576, 24, 1)
    assert set(TINY_MODELS) >= {"tiny", "tiny-gqa"}
