"""The in-process tiny Llama-style tokenizer: fixed ids, determinism, round trips, transformers loading."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tokenizers import Tokenizer

from feather_export.models import tokenizer as tt

TEXTS = [
    "USER: <image>\nWhat colour is the square? ASSISTANT:",
    "The red circle is on the left.",
    "Zebra! 42 × 7 = 294; naïve café — 日本語 🙂\ttabs\nnewlines  double  spaces ",
    "",
    " leading space and trailing ",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return tt.build_tiny_tokenizer()


def test_fixed_ids_and_vocab_size(tokenizer):
    assert tokenizer.get_vocab_size(with_added_tokens=True) == tt.TINY_VOCAB_SIZE == 500
    assert tokenizer.token_to_id("<unk>") == 0
    assert tokenizer.token_to_id("<s>") == tt.BOS_TOKEN_ID == 1
    assert tokenizer.token_to_id("</s>") == tt.EOS_TOKEN_ID == 2
    assert tokenizer.token_to_id(tt.IMAGE_TOKEN) == tt.IMAGE_TOKEN_ID
    assert tokenizer.token_to_id("<pad>") == tt.PAD_TOKEN_ID
    assert tt.IMAGE_TOKEN == "<image>"
    assert max(tokenizer.get_vocab(with_added_tokens=True).values()) == tt.TINY_VOCAB_SIZE - 1


def test_deterministic_in_process_and_across_processes(tokenizer):
    assert tt.build_tiny_tokenizer().to_str() == tokenizer.to_str()
    code = "from feather_export.models import tokenizer as tt; print(tt.build_tiny_tokenizer().to_str())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == tokenizer.to_str()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_without_unk(tokenizer, text):
    enc = tokenizer.encode(text)
    assert enc.ids[0] == tt.BOS_TOKEN_ID
    assert 0 not in enc.ids
    expected = text.replace(tt.IMAGE_TOKEN, "")
    if expected.startswith(" "):  # like Llama's fast tokenizer: a leading space merges with the dummy prefix
        expected = expected[1:]
    assert tokenizer.decode(enc.ids) == expected


def test_image_token_is_one_special_token(tokenizer):
    ids = tokenizer.encode("a <image><image> b", add_special_tokens=False).ids
    assert ids.count(tt.IMAGE_TOKEN_ID) == 2
    assert tokenizer.encode(tt.IMAGE_TOKEN, add_special_tokens=False).ids == [tt.IMAGE_TOKEN_ID]


def test_trained_pieces_cover_the_corpus(tokenizer):
    ids = tokenizer.encode("What colour is the square?", add_special_tokens=False).ids
    assert len(ids) <= 8  # whole-word pieces, not bytes


def test_save_writes_files(tmp_path):
    tt.save_tiny_tokenizer(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    assert config["unk_token"] == "<unk>" and config["pad_token"] == "<pad>"
    assert config["model_max_length"] == tt.MODEL_MAX_LENGTH
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).to_str() == tt.build_tiny_tokenizer().to_str()


def test_transformers_autotokenizer_matches(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tt.save_tiny_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, tt.PAD_TOKEN_ID)
    assert hf.convert_tokens_to_ids(tt.IMAGE_TOKEN) == tt.IMAGE_TOKEN_ID
    assert len(hf) == tt.TINY_VOCAB_SIZE
    for text in TEXTS:
        assert hf(text).input_ids == raw.encode(text).ids
        assert hf(text, add_special_tokens=False).input_ids == raw.encode(text, add_special_tokens=False).ids
        ids = raw.encode(text).ids
        assert hf.decode(ids, skip_special_tokens=True) == raw.decode(ids)
