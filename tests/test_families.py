"""The llava-hf family (DESIGN §1): Mistral, Qwen2 and Llama decoders, CLIP and SigLIP towers,
strategies default and full (CLIP under full: the CLS is image token 0, before the raster).

Per family tiny model: the reference equals transformers' ``generate``, and every method (BTP with
an explicit schedule: its default does not fit 4 layers) through the ONNX artifacts equals the
reference (kept indices, first logits, tokens). Unsupported configs are refused from config.json
alone, before any weight is read.
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
from feather_export.methods.config import PruneConfig, btp_fitting_counts
from feather_export.methods.reference import reference_generate
from feather_export.models.family import check_config, text_spec, vision_spec
from feather_export.models.geometry import geometry_of
from feather_export.models.tiny import FAMILY_TINY_MODELS, build_tiny_model, make_tiny
from feather_export.tensorrt.lint import check_artifact
from feather_runtime import Pipeline

METHODS = ("none", "feather", "fastv", "fastervlm", "btp")


def btp_schedule(model) -> str:
    """Three stages at layers 1, 2, 3 with BTP's default counts (round(N/2), round(N/4), 0)."""
    counts = btp_fitting_counts(geometry_of(model.config).num_image_tokens, 3)
    return ",".join(f"{layer}:{count}" for layer, count in zip((1, 2, 3), counts))


def method_options(model, method: str) -> dict:
    """What a method needs on the 4-layer family models (BTP: an explicit schedule)."""
    return {"schedule": btp_schedule(model)} if method == "btp" else {}


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
            export(name, path, ExportOptions(method=method,
                                             **method_options(family_models[name], method)),
                   progress=lambda m: None)
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
    clip, clip_v = specs["tiny-clip-full"]
    assert (clip_v.family, clip_v.cls_token, clip_v.keep_cls, clip_v.feature_layers) == \
        ("clip_vision_model", True, True, (1, 3))
    assert clip_v.raster_offset == 1 and clip_v.image_token_span(256) == (0, 257)
    assert mistral_v.raster_offset == 0 and mistral_v.image_token_span(256) == (1, 256)
    geo = geometry_of(family_models["tiny-clip-full"].config)
    assert (geo.num_image_tokens, geo.grid_side, geo.raster_offset) == (257, 16, 1)
    assert family_models["tiny-clip-full"].config.image_seq_length == 257


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
                   dict(method="fastv", budget=n), dict(method="fastervlm", budget=n),
                   dict(method="btp", schedule=f"1:{n}")):
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


def test_clip_full_features_and_fastervlm_scores_are_transformers():
    """CLIP under full: the features are transformers' (CLS row first, two layers concatenated);
    FasterVLM's score of image token j is the CLS query's attention to key j (mean over heads) in
    transformers' own attention weights of the deepest feature layer: the CLS scores itself."""
    import torch

    from feather_export.methods.reference import vision_features

    model = build_tiny_model("tiny-clip-full")
    model.model.vision_tower.config._attn_implementation = "eager"     # to return attentions
    pixels, _ = tiny_inputs(model, 5)
    with torch.no_grad():
        features, scores = vision_features(model, torch.from_numpy(pixels))
        hf = model.model.get_image_features(torch.from_numpy(pixels)).pooler_output[0]
        attn = model.model.vision_tower(torch.from_numpy(pixels), output_attentions=True).attentions
    assert features.shape[1] == scores.shape[0] == 257
    assert torch.equal(features[0], hf)
    expected = attn[2][0, :, 0, :].mean(dim=0)                 # layer 3 (-1), CLS row, every key
    assert torch.allclose(scores, expected, atol=1e-6, rtol=0)
    assert abs(float(scores.sum()) - 1.0) < 1e-5


def test_clip_full_vision_segment_and_grid_offset(family_artifacts, family_models):
    """The vision segment outputs N = 257 rows and scores; FEATHER's select node carries the raster
    offset; the forced grid (raster rows/columns multiple of the stride) is shifted by one."""
    import onnx

    path = family_artifacts[("tiny-clip-full", "feather")]
    vision = onnx.load(path / "onnx" / "vision.onnx", load_external_data=False)
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in vision.graph.output}
    assert shapes == {"image_features": [1, 257, 64], "cls_scores": [257]}
    select = onnx.load(path / "onnx" / "select_1.onnx", load_external_data=False)
    node = next(n for n in select.graph.node if n.op_type == "SelectTokens")
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    stage = PruneConfig.from_dict(json.loads((path / "feather.json").read_text())["prune"]).stages[0]
    assert (attrs["raster_offset"], attrs["grid_stride"], attrs["grid_side"]) == (1, stage.grid_stride, 16)
    grid = {1 + r * 16 + c for r in range(0, 16, stage.grid_stride) for c in range(0, 16, stage.grid_stride)}
    model = family_models["tiny-clip-full"]
    pixels, ids = tiny_inputs(model, 1)
    got = Pipeline.load(path).generate_ids(pixels, ids, max_new_tokens=1)
    assert grid <= set(got.kept[0]) and len(got.kept[0]) == stage.keep


def test_clip_full_btp_seed_sits_on_the_raster(tmp_path, family_models):
    """lambda 0: no attention set, so stage 1 starts from the spatial seed: farthest points of the
    16 x 16 raster from raster index 0 (image token 1); the CLS is no raster point."""
    from feather_export.methods.selection import farthest_point_seed

    model = family_models["tiny-clip-full"]
    path = export("tiny-clip-full", tmp_path / "btp", ExportOptions(
        method="btp", schedule="1:8,3:2", btp_lambda="0"), progress=lambda m: None)
    seed = farthest_point_seed(16, 4, 1).tolist()
    assert seed == [1, 256, 16, 136]          # raster 0, 255, 15, (8, 7): Manhattan max-min
    pipe = Pipeline.load(path)
    for s in (0, 2):
        pixels, ids = tiny_inputs(model, s)
        got = pipe.generate_ids(pixels, ids, max_new_tokens=4)
        ref = reference_generate(model, pixels, ids, method="btp", schedule="1:8,3:2",
                                 btp_lambda="0", max_new_tokens=4)
        assert got.kept == ref.kept and got.token_ids == ref.token_ids
        assert set(seed) <= set(got.kept[0])


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
def test_btp_default_schedule_refused_with_one_that_fits(family_models, name):
    """4 decoder layers: BTP's default (layers scaled from 3, 6, 14, 22 of 32) is refused before
    export, suggesting a --schedule that is accepted as given."""
    import re

    geo = geometry_of(family_models[name].config)
    with pytest.raises(FeatherError, match="does not fit a 4-layer decoder") as info:
        PruneConfig.create("btp", geo)
    suggested = re.search(r"--schedule (\S+)$", str(info.value)).group(1)
    cfg = PruneConfig.create("btp", geo, schedule=suggested)
    assert cfg.stages[0].keep == round(geo.num_image_tokens / 2 + 1e-9) and cfg.stages[-1].keep == 0
    assert suggested == btp_schedule(family_models[name])


def test_cli_builds_and_runs_btp_on_a_clip_full_checkpoint(tmp_path, capsys):
    """make-tiny -> build --method btp --schedule -> run --json --overlay, on a checkpoint
    directory: kept indices are image tokens (the CLS is 0), the overlay is written."""
    from PIL import Image

    from feather_export.cli.main import main

    ckpt, out, png = tmp_path / "ckpt", tmp_path / "art", tmp_path / "kept.png"
    assert main(["make-tiny", "tiny-clip-full", str(ckpt)]) == 0
    assert main(["build", "--model", str(ckpt), "--method", "btp", "--schedule", "1:129,2:64,3:0",
                 "--max-text-tokens", "64", "--max-new-tokens", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--image", "examples/shapes.png", "--prompt", "What is red?",
                 "--max-new-tokens", "4", "--json", "--overlay", str(png)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [len(k) for k in result["kept"]] == [129, 64, 0]
    assert all(0 <= i < 257 for k in result["kept"] for i in k)
    assert Image.open(png).size[0] > 4 * 336


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_onnx_artifacts_equal_the_reference(family_artifacts, family_models, name, method):
    model = family_models[name]
    pipe = Pipeline.load(family_artifacts[(name, method)])
    for seed in (0, 3):
        pixels, ids = tiny_inputs(model, seed, text=(5, 6, 7, 8)[: 1 + seed])
        got = pipe.generate_ids(pixels, ids, max_new_tokens=6)
        ref = reference_generate(model, pixels, ids, method=method, max_new_tokens=6,
                                 **method_options(model, method))
        assert got.kept == ref.kept
        assert [len(k) for k in got.kept] == [s["keep"] for s in pipe.manifest["prune"]["stages"]]
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
    (lambda c: c["vision_config"].update(model_type="dinov2"), "vision model 'dinov2'"),
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
    (lambda c: c["vision_config"].update(model_type="dinov2"), {}, "vision model 'dinov2'"),
    (lambda c: c.update(vision_feature_select_strategy="default", vision_config={
        **c["vision_config"], "model_type": "siglip_vision_model"}), {}, "has no CLS token"),
    (lambda c: None, {"max_new_tokens": 8192}, "sliding_window 8192 is shorter"),
    (lambda c: None, {"method": "btp"}, "BTP's default schedule .* does not fit a 4-layer"),
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
        export(ckpt, out, ExportOptions(**{"method": "feather", **options}), progress=lambda m: None)
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
