"""The OpenVINO export adapter of the peer benchmark (benchmarks/peers/export_openvino.py)."""
import importlib.util
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from feather_export.models.checkpoint import TINY_SHAPES_DIR

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "export_openvino.py"


def _adapter():
    spec = importlib.util.spec_from_file_location("export_openvino", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weight_names_follow_the_llava_hf_layout():
    rename = _adapter().rename_key
    assert rename("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == \
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert rename("model.vision_tower.vision_model.post_layernorm.bias") == \
        "vision_tower.vision_model.post_layernorm.bias"
    assert rename("model.multi_modal_projector.linear_1.weight") == "multi_modal_projector.linear_1.weight"
    assert rename("model.language_model.layers.3.self_attn.q_proj.weight") == \
        "language_model.model.layers.3.self_attn.q_proj.weight"
    assert rename("lm_head.weight") == "language_model.lm_head.weight"


def test_metaspace_rewrite_keeps_plain_text_ids(tmp_path):
    shutil.copy2(TINY_SHAPES_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    assert _adapter().stage_tokenizer(tmp_path) is True
    before = Tokenizer.from_file(str(TINY_SHAPES_DIR / "tokenizer.json"))
    after = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["USER: What colour is the square? ASSISTANT:", "Describe the image in detail."]:
        assert after.encode(text).ids == before.encode(text).ids
    assert _adapter().stage_tokenizer(tmp_path) is False       # already rewritten: left alone
