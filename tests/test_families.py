"""The llava-hf family (DESIGN §1): Mistral, Qwen2 and Llama decoders, CLIP and SigLIP towers.

Per family tiny model: the reference equals transformers' ``generate``, and every method through
the ONNX artifacts equals the reference (kept indices, first logits, tokens). Unsupported configs
are refused from config.json alone, before any weight is read.
"""
import copy
import json
import time

import numpy as np
import pytest

from conftest import hf_generate, tiny_inputs
from feather_export.errors import FeatherError
from feather_export.export.artifact import ExportOptions, export
from feather_export.export.validate import validate_artifact
from feather_export.methods.reference import reference_generate
from feather_export.models.family import check_config, text_spec, vision_spec
from feather_export.models.geometry import geometry_of
from feather_export.models.tiny import FAMILY_TINY_MODELS, build_tiny_model, make_tiny
from feather_export.tensorrt.lint import check_artifact
from feather_runtime import Pipeline

METHODS = ("none", "feather", "fastv", "fastervlm")


@pytest.fixture(scope="module")
def family_models():
    return {name: build_tiny_model(name) for name in FAMILY_TINY_MODELS}


@pytest.fixture(scope="module")
def family_artifacts(tmp_path_factory, family_models):
    root = tmp_path_factory.mktemp("family-artifacts")
    out = {}
    for name in FAMILY_TINY_MODELS:
        for method in METHODS:
            path = root / f"{name}-{method}"
            export(name, path, ExportOptions(method=method), progress=lambda m: None)
            out[(name, method)] = path
    return out


def test_specs_of_the_family_models(family_models):
    specs = {name: (text_spec(m.config), vision_spec(m.config)) for name, m in family_models.items()}
    mistral, mistral_v = specs["tiny-mistral"]
    assert (mistral.family, mistral.rope_type, mistral.qkv_bias, mistral.sliding_window) == \
        ("mistral", "linear", False, 8192)
    assert mistral_v.cls_token and mistral_v.feature_layers == (1, 2) and not mistral_v.keep_cls
    qwen, qwen_v = specs["tiny-qwen2-siglip"]
    assert (qwen.family, qwen.qkv_bias, qwen.o_bias, qwen.tied_embeddings) == ("qwen2", True, False, True)
    assert qwen.sliding_window is None            # use_sliding_window is false
    assert (qwen_v.family, qwen_v.cls_token, qwen_v.feature_layers) == ("siglip_vision_model", False, (2,))
    llama, llama_v = specs["tiny-llama-siglip"]
    assert (llama.rope_type, llama.qkv_bias, llama.o_bias, llama.mlp_bias) == ("llama3", True, True, True)
    assert llama_v.feature_layers == (1, 3) and llama_v.run_layers == 3
    # the models really are what the specs say
    q = family_models["tiny-qwen2-siglip"]
    assert q.lm_head.weight.data_ptr() == q.model.language_model.embed_tokens.weight.data_ptr()
    assert q.model.language_model.layers[0].self_attn.k_proj.weight.shape[0] == 16     # MQA
    assert family_models["tiny-mistral"].model.language_model.layers[0].self_attn.q_proj.out_features == 96


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
def test_reference_none_equals_transformers_generate(family_models, name):
    model = family_models[name]
    for seed in (0, 1):
        pixels, ids = tiny_inputs(model, seed)
        expected = hf_generate(model, pixels, ids, 12)
        got = reference_generate(model, pixels, ids, method="none", max_new_tokens=12)
        assert got.token_ids == expected


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
def test_keeping_everything_equals_transformers(family_models, name):
    """Every criterion (incl. SigLIP's attention-received FasterVLM) with budget N is a no-op."""
    model = family_models[name]
    geo = geometry_of(model.config)
    n = geo.num_image_tokens
    pixels, ids = tiny_inputs(model, 2)
    expected = hf_generate(model, pixels, ids, 8)
    for kwargs in (dict(method="feather", schedule=f"1:{n},2:{n}", stride=0),
                   dict(method="fastv", budget=n), dict(method="fastervlm", budget=n)):
        got = reference_generate(model, pixels, ids, max_new_tokens=8, **kwargs)
        assert got.token_ids == expected, kwargs


def test_siglip_fastervlm_scores_are_attention_received(family_models):
    """Scores = softmax(q.k) averaged over heads and queries, per key: they sum to 1 over keys."""
    import torch

    from feather_export.methods.reference import vision_features

    model = family_models["tiny-qwen2-siglip"]
    pixels, _ = tiny_inputs(model, 5)
    with torch.no_grad():
        features, scores = vision_features(model, torch.from_numpy(pixels))
        hf = model.model.get_image_features(torch.from_numpy(pixels)).pooler_output[0]
    n = geometry_of(model.config).num_image_tokens
    assert features.shape[1] == n and scores.shape == (n,)
    assert abs(float(scores.sum()) - 1.0) < 1e-5
    assert torch.equal(features[0], hf)


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_onnx_artifacts_equal_the_reference(family_artifacts, family_models, name, method):
    model = family_models[name]
    pipe = Pipeline.load(family_artifacts[(name, method)])
    for seed in (0, 3):
        pixels, ids = tiny_inputs(model, seed, text=(5, 6, 7, 8)[: 1 + seed])
        got = pipe.generate_ids(pixels, ids, max_new_tokens=6)
        ref = reference_generate(model, pixels, ids, method=method, max_new_tokens=6)
        assert got.kept == ref.kept
        assert np.abs(got.first_logits - ref.first_logits.numpy()).max() < 1e-4
        assert got.token_ids == ref.token_ids
        if method == "none":
            assert got.token_ids == hf_generate(model, pixels, ids, 6)


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
def test_segments_validate_and_lint(family_artifacts, family_models, name):
    path = family_artifacts[(name, "feather")]
    checks = validate_artifact(path, model=family_models[name])
    assert checks and all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    assert [f for f in check_artifact(path) if f.severity == "error"] == []


# ---- refusals from the config alone --------------------------------------------------------

def _config(name="tiny-mistral"):
    from feather_export.models.tiny import tiny_llava_config

    return copy.deepcopy(tiny_llava_config(name))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), "rotary scaling 'yarn'"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="dynamic"),
     "rotary scaling 'dynamic'"),
    (lambda c: c["text_config"]["rope_parameters"].update(partial_rotary_factor=0.5), "partial_rotary"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "activation 'gelu'"),
    (lambda c: c.update(vision_feature_select_strategy="full"), "CLS as an image token"),
    (lambda c: c.update(vision_feature_select_strategy="spatial"), "'spatial' is not supported"),
    (lambda c: c.update(vision_feature_layer=[-2, 7]), "outside the 3-layer"),
    (lambda c: c.update(vision_feature_layer=0), "selects the embeddings"),
    (lambda c: c.update(vision_feature_layer="last"), "int or a list"),
    (lambda c: c.update(model_type="llava_onevision"), "model_type 'llava_onevision'"),
])
def test_unsupported_configs_refused(edit, message):
    """As config.json holds them (a dict: transformers' own validation never runs first)."""
    config = _config().to_dict()
    check_config(config)
    edit(config)
    with pytest.raises(FeatherError, match=message):
        check_config(config)


def test_sliding_window_shorter_than_the_artifact_refused():
    config = _config()
    n = geometry_of(config).num_image_tokens
    check_config(config, max_sequence=8192)
    with pytest.raises(FeatherError, match="sliding_window 8192 is shorter.*8193"):
        check_config(config, max_sequence=8193)
    qwen = _config("tiny-qwen2-siglip")
    qwen.text_config.sliding_window, qwen.text_config.use_sliding_window = 64, False
    check_config(qwen, max_sequence=n + 1024)      # the window is off
    qwen.text_config.use_sliding_window = True
    with pytest.raises(FeatherError, match="qwen2 sliding_window 64"):
        check_config(qwen, max_sequence=n + 1024)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return make_tiny("tiny-mistral", tmp_path_factory.mktemp("ckpt") / "tiny-mistral")


@pytest.mark.parametrize("edit, options, message", [
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                        "rope_theta": 1e6}),
     {}, "rotary scaling 'yarn'"),
    (lambda c: c["text_config"].update(rope_scaling={"type": "dynamic", "factor": 2.0},
                                       rope_parameters=None), {}, "rotary scaling 'dynamic'"),
    (lambda c: c["text_config"].update(model_type="gemma"), {}, "text model 'gemma'"),
    (lambda c: c.update(vision_feature_select_strategy="full"), {}, "CLS as an image token"),
    (lambda c: None, {"max_new_tokens": 8192}, "sliding_window 8192 is shorter"),
])
def test_refused_before_any_weight_is_read(mistral_dir, tmp_path, monkeypatch, edit, options,
                                           message):
    """The weights are garbage and every loader raises: the refusal must come first, and fast."""
    import shutil

    import safetensors
    import transformers

    ckpt = tmp_path / "ckpt"
    shutil.copytree(mistral_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight loader was called before the refusal")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", no_weights)
    monkeypatch.setattr(safetensors, "safe_open", no_weights)
    out = tmp_path / "out"
    started = time.perf_counter()
    with pytest.raises(FeatherError, match=message):
        export(ckpt, out, ExportOptions(method="feather", **options), progress=lambda m: None)
    assert time.perf_counter() - started < 5.0
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_family_checkpoint_directory_exports_and_runs(mistral_dir, family_models, tmp_path):
    """A saved Mistral checkpoint directory (from_pretrained path) exports and equals generate."""
    out = export(mistral_dir, tmp_path / "art", ExportOptions(method="none"), progress=lambda m: None)
    model = family_models["tiny-mistral"]
    pixels, ids = tiny_inputs(model, 4)
    got = Pipeline.load(out).generate_ids(pixels, ids, max_new_tokens=6)
    assert got.token_ids == hf_generate(model, pixels, ids, 6)


def test_processor_that_does_not_fit_the_tower_refused(mistral_dir, tmp_path):
    import shutil

    from feather_export.models.checkpoint import check_checkpoint_dir

    ckpt = tmp_path / "ckpt"
    shutil.copytree(mistral_dir, ckpt)
    (ckpt / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor"}))
    with pytest.raises(FeatherError, match="'SiglipImageProcessor' does not prepare a clip"):
        check_checkpoint_dir(ckpt)


def test_interleave_qwen_shape_model_has_the_published_geometry():
    """Config only (no weights): the benchmark's shape model is what the exporter accepts."""
    from feather_export.models.shapes import shape_llava_config

    config = shape_llava_config("shape-llava-interleave-qwen-0.5b")
    text, vision = check_config(config, max_sequence=729 + 512 + 512)
    geo = geometry_of(config)
    assert (geo.num_layers, geo.num_image_tokens, geo.grid_side) == (24, 729, 27)
    assert (text.family, text.qkv_bias, text.tied_embeddings) == ("qwen2", True, True)
    assert (vision.family, vision.feature_layers, vision.cls_token) == ("siglip_vision_model", (26,), False)
    assert (config.text_config.hidden_size, config.text_config.intermediate_size,
            config.vision_config.hidden_size, config.vision_config.intermediate_size) == \
        (1024, 2816, 1152, 4304)
