"""Chat templates (DESIGN §7): rendered at export, filled by the runtime without a template engine;
prompt ids equal transformers' processor on ``apply_chat_template`` output, per family."""
import json

import numpy as np
import pytest
from PIL import Image

from feather_export.errors import FeatherError
from feather_export.models.chat import (TINY_CHAT_TEMPLATES, find_chat_template, prompt_template,
                                        render_template, special_tokens)
from feather_export.models.family import vision_spec
from feather_export.models.geometry import geometry_of
from feather_export.models.tiny import FAMILY_TINY_MODELS, TINY_MODELS, make_tiny, tiny_llava_config
from feather_runtime.prompt import PromptBuilder, PromptTemplate

QUESTIONS = ["What colour is the square?", "  spaces around  ", "Zähle die Kreise 🙂\nand a newline"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-ckpts")
    return {name: make_tiny(name, root / name) for name in ("tiny", *FAMILY_TINY_MODELS)}


def _processor(path, name):
    import transformers

    config = tiny_llava_config(name)
    found = find_chat_template(path)
    return transformers.LlavaProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(str(path)),
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(path)),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if vision_spec(config).cls_token else 0,
        chat_template=found[0] if found else None)


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
def test_template_found_where_the_checkpoint_keeps_it(checkpoints, name):
    template, source = find_chat_template(checkpoints[name])
    chat, location = TINY_MODELS[name].chat
    assert template == TINY_CHAT_TEMPLATES[chat] and source.startswith(location)
    from_dir = prompt_template(checkpoints[name], "ignored")
    built_in = prompt_template(None, name)
    assert (from_dir.before, from_dir.after, from_dir.add_special_tokens) == \
        (built_in.before, built_in.after, built_in.add_special_tokens)
    assert find_chat_template(checkpoints["tiny"]) is None
    assert prompt_template(checkpoints["tiny"], "x") == PromptTemplate()


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
@pytest.mark.parametrize("question", QUESTIONS)
def test_prompt_ids_equal_the_processor(checkpoints, monkeypatch, name, question):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = checkpoints[name]
    processor = _processor(path, name)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": question}]}]
    if TINY_MODELS[name].chat[0] == "inst":          # a text-content template (Mistral's form)
        conversation = [{"role": "user", "content": f"<image>\n{question}"}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        expected = processor(text=text, images=image, return_tensors="np",
                             add_special_tokens=False)
    else:
        expected = processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True,
                                                 return_tensors="np")
    n = geometry_of(tiny_llava_config(name)).num_image_tokens     # CLIP full: the CLS too
    builder = PromptBuilder.from_dir(path, prompt_template(path, name))
    np.testing.assert_array_equal(builder.build(question, n), expected["input_ids"])
    # and the artifact's runtime preprocessing gives the processor's pixels
    from feather_runtime.preprocess import ImagePreprocessor

    np.testing.assert_allclose(ImagePreprocessor.from_dir(path)(image), expected["pixel_values"],
                               atol=1e-5)


def test_default_template_equals_llava_1_5(checkpoints, monkeypatch):
    """No template in the checkpoint: LLaVA-1.5's text, ids as the processor tokenizes it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = _processor(checkpoints["tiny"], "tiny")
    image = Image.new("RGB", (50, 70), (10, 200, 30))
    text = "USER: <image>\nWhat is it? ASSISTANT:"
    expected = processor(text=text, images=image, return_tensors="np")["input_ids"]
    got = PromptBuilder.from_dir(checkpoints["tiny"], PromptTemplate()).build("What is it?", 576)
    np.testing.assert_array_equal(got, expected)


def test_export_stores_the_template_and_the_runtime_uses_it(checkpoints, tmp_path):
    from feather_export.export.artifact import ExportOptions, export
    from feather_runtime import Pipeline

    out = export(checkpoints["tiny-qwen2-siglip"], tmp_path / "art", ExportOptions(method="none"),
                 progress=lambda m: None)
    stored = json.loads((out / "feather.json").read_text())["prompt"]
    assert stored["before"] == "<|im_start|>user <image>\n"
    assert stored["after"] == "<|im_end|>\n<|im_start|>assistant\n"
    assert stored["source"] == "chat_template.json:chat_template"
    ids = Pipeline.load(out).prompt_builder.build("Hi?", 4)[0].tolist()
    tok = PromptBuilder.from_dir(out / "tokenizer").tokenizer
    assert tok.decode(ids, skip_special_tokens=False).endswith("\nHi?<|im_end|>\n<|im_start|>assistant\n")
    # what the serving ingress counts prompt tokens with: the same template, not the default
    from feather_runtime.manifest import load_manifest

    assert PromptBuilder.for_artifact(load_manifest(out)).build("Hi?", 4)[0].tolist() == ids
    assert PromptBuilder.from_dir(out / "tokenizer").build("Hi?", 4)[0].tolist() != ids


def test_named_templates_and_refusals(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "chat_template": [{"name": "tool_use", "template": "x"},
                                              {"name": "default", "template": "{{ bos_token }}A"}]}))
    assert find_chat_template(tmp_path) == ("{{ bos_token }}A", "tokenizer_config.json:chat_template")
    with pytest.raises(FeatherError, match="does not render one user turn"):
        prompt_template(tmp_path, "x")                  # no question, no image in the output
    with pytest.raises(FeatherError, match="does not render one user turn"):
        render_template("{% for m in messages %}{{ m['content'][1]['text'] }}{% endfor %}", "t",
                        special_tokens(tmp_path))        # the question but no image placeholder
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": {"a": 1}}))
    with pytest.raises(FeatherError, match="neither a string"):
        find_chat_template(tmp_path)


def test_runtime_refuses_a_malformed_stored_template(checkpoints):
    with pytest.raises(FeatherError, match="malformed"):
        PromptTemplate.from_dict({"before": 3, "after": ""})
    with pytest.raises(FeatherError, match="exactly once"):
        PromptBuilder.from_dir(checkpoints["tiny"], PromptTemplate("A ", " B"))
