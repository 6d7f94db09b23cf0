"""Runtime prompt building vs transformers' LlavaProcessor on the tiny tokenizer, plus error paths."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from feather_export.models import tokenizer as tt
from feather_runtime.errors import FeatherError
from feather_runtime.preprocess import write_preprocessor_config
from feather_runtime.prompt import PromptBuilder, format_prompt

QUESTIONS = [
    "What colour is the square?",
    "Describe the image.",
    "Where is the blue triangle? Answer in one word.",
    "  spaces around  ",
    "Zähle die Kreise: 1, 2, 3… 🙂\nand a newline",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tt.save_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def builder(tok_dir):
    return PromptBuilder.from_dir(tok_dir)


def test_special_ids(builder):
    assert builder.image_token_id == tt.IMAGE_TOKEN_ID
    assert builder.eos_token_id == tt.EOS_TOKEN_ID


def test_template():
    assert format_prompt("Hi?") == "USER: <image>\nHi? ASSISTANT:"


@pytest.mark.parametrize("question", QUESTIONS)
def test_build_shape_and_content(builder, question):
    ids = builder.build(question, 7)
    assert ids.dtype == np.int64 and ids.ndim == 2 and ids.shape[0] == 1
    row = ids[0].tolist()
    assert row[0] == tt.BOS_TOKEN_ID
    first = row.index(tt.IMAGE_TOKEN_ID)
    assert row[first:first + 7] == [tt.IMAGE_TOKEN_ID] * 7 and row.count(tt.IMAGE_TOKEN_ID) == 7
    assert builder.decode(ids) == format_prompt(question, image="")


@pytest.mark.parametrize("image_size", [336, 224])
@pytest.mark.parametrize("question", QUESTIONS)
def test_matches_llava_processor(tok_dir, builder, tmp_path, monkeypatch, image_size, question):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = json.loads(write_preprocessor_config(tmp_path, image_size).read_text())
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil(**config),
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(tok_dir)),
        patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    expected = processor(text=format_prompt(question), images=image, return_tensors="np")["input_ids"]
    num_image_tokens = (image_size // 14) ** 2
    ours = builder.build(question, num_image_tokens)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, expected)
    assert int((ours == tt.IMAGE_TOKEN_ID).sum()) == num_image_tokens


def test_matches_autotokenizer_on_expanded_text(tok_dir, builder, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for question in QUESTIONS:
        for n in (1, 3, 576):
            text = format_prompt(question, image=tt.IMAGE_TOKEN * n)
            assert builder.build(question, n)[0].tolist() == hf(text).input_ids


def test_decode_skips_special_tokens(builder):
    answer = builder.tokenizer.encode("The square is red.", add_special_tokens=False).ids
    assert builder.decode(answer + [builder.eos_token_id]) == "The square is red."
    assert builder.decode(np.asarray([answer])) == "The square is red."


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -3, None, 2.5, True])
def test_missing_image_raises(builder, n):
    with pytest.raises(FeatherError, match="needs an image"):
        builder.build("What is this?", n)


@pytest.mark.parametrize("question", ["<image>\nWhat is this?", "Look at <image> please", "", "   ", None])
def test_bad_question_raises(builder, question):
    with pytest.raises(FeatherError):
        builder.build(question, 4)


def test_from_dir_errors(tmp_path, tok_dir):
    with pytest.raises(FeatherError, match="tokenizer.json"):
        PromptBuilder.from_dir(tmp_path / "nowhere")
    with pytest.raises(FeatherError, match="tokenizer.json"):
        PromptBuilder.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ this is not a tokenizer")
    with pytest.raises(FeatherError, match="cannot load"):
        PromptBuilder.from_dir(tmp_path)
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("not json")
    with pytest.raises(FeatherError, match="cannot parse"):
        PromptBuilder.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"image_token": "<img>"}))
    with pytest.raises(FeatherError, match="<img>"):
        PromptBuilder.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    assert PromptBuilder.from_dir(tmp_path).image_token_id == tt.IMAGE_TOKEN_ID


def test_tokenizer_without_special_image_token_raises(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "<image>": 2, "a": 3}, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # splits '<image>' into characters
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(FeatherError, match="added special token"):
        PromptBuilder.from_dir(tmp_path).build("a", 2)
