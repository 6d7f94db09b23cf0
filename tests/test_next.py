"""LLaVA-NeXT (anyres) with static shapes (docs/design.md §3): the token plan of a pinpoint, the
refusals, the PyTorch reference of every method against transformers' own LlavaNext model and
processor on letterboxed images, and the select segments against the numpy oracle."""
import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from feather_export.errors import FeatherError
from feather_export.methods.config import PruneConfig
from feather_export.methods.reference import reference_generate, select_stage, vision_features
from feather_export.methods.selection import select_per_crop
from feather_export.models.anyres import anyres_plan, pinpoint_table, select_best_resolution
from feather_export.models.family import check_config
from feather_export.models.geometry import geometry_of
from feather_export.models.tiny import build_tiny_model, make_tiny, tiny_llava_config
from feather_runtime.preprocess import AnyresPreprocessor, letterbox, letterbox_canvas

# images of three aspect ratios (width, height): wide, tall, near-square
IMAGES = [(200, 90), (70, 190), (130, 121)]


def _v16_config():
    """llava-v1.6-mistral-7b-hf's geometry (config only, no weights)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=336, patch_size=14)
    text = MistralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=32,
                         num_attention_heads=2, num_key_value_heads=2, sliding_window=None)
    return LlavaNextConfig(vision_config=vision, text_config=text)


def _image(size, seed=0):
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("tiny-next")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny("tiny-next", tmp_path_factory.mktemp("next") / "tiny-next")


@pytest.fixture(scope="module")
def hf_processor(checkpoint):
    import transformers

    config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    cfg = tiny_llava_config("tiny-next")
    return transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessorPil(**config),
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(checkpoint)),
        patch_size=cfg.vision_config.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)


def _inputs(checkpoint, hf_processor, size, pinpoint, seed=0):
    """(our pixel values, transformers' processor output) for one letterboxed image."""
    ours = AnyresPreprocessor.from_dir(checkpoint, pinpoint)
    boxed = ours.letterbox(_image(size, seed))
    hf = hf_processor(text="<image>\nWhat is it?", images=boxed, return_tensors="np")
    return ours(_image(size, seed)), hf


# ---- the token plan --------------------------------------------------------------------------

def test_token_counts_per_pinpoint_of_llava_v16():
    rows = {r["resolution"]: r["num_image_tokens"] for r in pinpoint_table(_v16_config())}
    assert rows == {"336x672": 1752, "672x336": 1776, "672x672": 2928, "1008x336": 2376,
                    "336x1008": 2328}
    geo = geometry_of(_v16_config())                    # default: the largest square pinpoint
    assert geo.num_image_tokens == 2928 and geo.image_size == (672, 672)
    assert len(geo.crops()) == 5 and len(geo.free_indices()) == 48


@pytest.mark.parametrize("pinpoint", [(112, 224), (224, 112), (224, 224), (336, 112), (112, 336)])
def test_plan_equals_the_processors_token_count(checkpoint, hf_processor, pinpoint):
    """The processor expands <image> to exactly N tokens for an image of the pinpoint's size, and
    selects that pinpoint (image_sizes), for every pinpoint of the tiny model."""
    import transformers

    config = tiny_llava_config("tiny-next")
    plan = anyres_plan(config, pinpoint)
    out = hf_processor(text="<image>", images=_image(pinpoint[::-1]), return_tensors="np")
    assert int((out["input_ids"] == config.image_token_index).sum()) == plan.num_image_tokens
    assert out["pixel_values"].shape[1] == plan.num_crops
    assert select_best_resolution(pinpoint, config.image_grid_pinpoints) == \
        tuple(transformers.image_processing_utils.select_best_resolution(
            pinpoint, config.image_grid_pinpoints))


def test_raster_plan_equals_transformers_packing(model):
    """Crop c's patch p lands where ``ModelGeometry.crops()`` says, newlines where it has none."""
    import torch

    for pinpoint in model.config.image_grid_pinpoints:
        geo = geometry_of(model.config, tuple(pinpoint))
        crops, per = len(geo.crops()), geo.crop_side ** 2
        tag = torch.stack([torch.full((per,), float(c)) for c in range(crops)])
        tag = torch.stack([tag, torch.arange(per).float().expand(crops, per)], dim=-1)   # [C, P, 2]
        newline = torch.tensor([-1.0, -1.0])
        packed, _ = model.model.pack_image_features([tag], torch.tensor([pinpoint]), "default",
                                                    image_newline=newline)
        packed = packed[0]
        assert packed.shape[0] == geo.num_image_tokens
        for c, index in enumerate(geo.crops()):
            assert packed[index, 0].eq(c).all() and packed[index, 1].tolist() == list(range(per))
        assert packed[geo.free_indices()].eq(-1).all()


@pytest.mark.parametrize("resolution, message", [
    ("448x448", "not one of the checkpoint's image_grid_pinpoints"),
    ("672", "is not HxW"),
    ("big", "is not HxW"),
])
def test_bad_resolution_refused(resolution, message):
    with pytest.raises(FeatherError, match=message):
        check_config(_v16_config(), resolution=resolution)


def test_refusals_from_the_config_alone(model):
    config = _v16_config().to_dict()
    bad = dict(config, image_grid_pinpoints=[[336, 500]])
    with pytest.raises(FeatherError, match="no square pinpoint"):
        check_config(bad)
    with pytest.raises(FeatherError, match="whole number of 336-pixel crops"):
        check_config(bad, resolution="336x500")
    siglip = dict(config, vision_config={"model_type": "siglip_vision_model"},
                  vision_feature_select_strategy="full")
    with pytest.raises(FeatherError, match="llava_next with a siglip_vision_model tower"):
        check_config(siglip)
    with pytest.raises(FeatherError, match="--resolution applies to LLaVA-NeXT"):
        check_config(tiny_llava_config("tiny"), resolution="336x336")
    geo = geometry_of(model.config)
    with pytest.raises(FeatherError, match="--method btp is not supported.*one raster"):
        PruneConfig.create("btp", geo)
    with pytest.raises(FeatherError, match="multiple of the 5 crops"):
        PruneConfig.create("fastervlm", geo, budget=84)


def test_prune_configs_on_next(model):
    geo = geometry_of(model.config)                                     # 224x224: N = 336
    feather = PruneConfig.create("feather", geo)
    s1 = feather.stages[0]
    assert (s1.keep, s1.num_in) == (84, 336)
    # one stride for both rasters: the smallest >= 3 with |base grid| + |stitched grid| <= B1/2
    assert s1.grid_stride == 4 and geo.grid_count(3) == 9 + 36 and geo.grid_count(4) == 4 + 16
    assert not set(geo.grid_indices(4)) & set(geo.free_indices())      # newlines never forced
    fvlm = PruneConfig.create("fastervlm", geo).stages[0]
    assert (fvlm.per_crop, fvlm.keep) == (16, 16 * 5 + 16)               # a quarter per crop + newlines


def test_select_per_crop_oracle():
    scores = np.array([0.1, 0.9, 0.5, 0.5, 7.0, 0.2, 0.2, 0.3], np.float32)
    crops = [np.array([0, 1, 2]), np.array([3, 5, 6])]
    assert select_per_crop(scores, crops, 2, np.array([4, 7])).tolist() == [1, 2, 3, 4, 5, 7]


# ---- preprocessing ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
@pytest.mark.parametrize("size", [(200, 90), (70, 190), (130, 121), (1, 1), (224, 224), (17, 901)])
@pytest.mark.parametrize("pinpoint", [(224, 224), (112, 336), (224, 112)])
def test_preprocessing_equals_llava_next_image_processor(checkpoint, hf_processor, mode, size,
                                                         pinpoint):
    ours = AnyresPreprocessor.from_dir(checkpoint, pinpoint)
    image = _image(size, seed=size[0]).convert(mode)
    boxed = ours.letterbox(image)
    assert boxed.size == (pinpoint[1], pinpoint[0])
    ref = hf_processor.image_processor(boxed, return_tensors="np")
    pixels = ours(image)
    assert pixels.dtype == np.float32 and pixels.flags["C_CONTIGUOUS"]
    assert pixels.shape == ref["pixel_values"].shape
    assert float(np.abs(pixels - ref["pixel_values"]).max()) <= 1e-5
    assert ref["image_sizes"].tolist() == [list(pinpoint)]


def test_letterbox_pads_centred_with_the_mean_colour():
    mean = (0.48145466, 0.4578275, 0.40821073)
    image = Image.new("RGB", (30, 10), (1, 2, 3))
    boxed = letterbox(image, (20, 40), mean)              # 1:2 canvas of 20x40: no resize needed
    assert letterbox_canvas(10, 30, (20, 40)) == (15, 30)  # smallest 1:2 canvas holding 10x30
    assert letterbox_canvas(10, 30, (672, 672)) == (30, 30)
    array = np.asarray(boxed)
    assert boxed.size == (40, 20)
    fill = tuple(int(255 * m) for m in mean)               # (122, 116, 104)
    square = np.asarray(letterbox(image, (30, 30), mean))  # canvas 30x30 = pinpoint: pad only
    assert tuple(square[0, 0]) == fill and tuple(square[10, 0]) == (1, 2, 3)
    assert (square[:10] == fill).all() and (square[10:20] == (1, 2, 3)).all() and (square[20:] == fill).all()
    assert array.shape == (20, 40, 3)
    with pytest.raises(FeatherError, match="not one of the preprocessor's image_grid_pinpoints"):
        AnyresPreprocessor({"image_processor_type": "LlavaNextImageProcessor",
                            "image_grid_pinpoints": [[336, 672]]}, (672, 672))


# ---- the reference against transformers ------------------------------------------------------

@pytest.mark.parametrize("size", IMAGES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pinpoint", [(224, 224), (112, 336)])
def test_reference_none_equals_generate_on_letterboxed_images(model, checkpoint, hf_processor,
                                                              size, pinpoint):
    import torch

    pixels, hf = _inputs(checkpoint, hf_processor, size, pinpoint)
    np.testing.assert_allclose(pixels, hf["pixel_values"], atol=1e-5, rtol=0)
    ids = hf["input_ids"]
    out = model.generate(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels),
                         image_sizes=torch.as_tensor(hf["image_sizes"]), max_new_tokens=10,
                         do_sample=False)
    expected = out[0, ids.shape[1]:].tolist()
    got = reference_generate(model, pixels, ids, method="none", max_new_tokens=10,
                             resolution=pinpoint)
    assert got.token_ids == expected


def test_keeping_everything_equals_generate(model, checkpoint, hf_processor):
    import torch

    pixels, hf = _inputs(checkpoint, hf_processor, IMAGES[0], (224, 224), seed=3)
    ids = hf["input_ids"]
    expected = model.generate(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels),
                              image_sizes=torch.as_tensor(hf["image_sizes"]), max_new_tokens=8,
                              do_sample=False)[0, ids.shape[1]:].tolist()
    n = geometry_of(model.config).num_image_tokens
    for kwargs in (dict(method="feather", schedule=f"1:{n},2:{n}", stride=0),
                   dict(method="fastv", budget=n), dict(method="fastervlm", budget=64 * 5)):
        got = reference_generate(model, pixels, ids, max_new_tokens=8, **kwargs)
        assert got.token_ids == expected, kwargs


def test_methods_on_next_follow_the_contract(model, checkpoint, hf_processor):
    import torch

    from feather_export.methods.scoring import fastervlm_scores
    from feather_export.models.family import vision_encoder

    pixels, hf = _inputs(checkpoint, hf_processor, IMAGES[1], (224, 224), seed=4)
    ids = hf["input_ids"]
    geo = geometry_of(model.config)
    feather = reference_generate(model, pixels, ids, method="feather", max_new_tokens=4)
    stage = PruneConfig.create("feather", geo).stages[0]
    assert len(feather.kept[0]) == 84 and set(geo.grid_indices(stage.grid_stride)) <= set(feather.kept[0])
    assert len(feather.scores[0]) == geo.num_image_tokens          # newlines are scored too
    fvlm = reference_generate(model, pixels, ids, method="fastervlm", budget=40, max_new_tokens=4)
    kept = np.asarray(fvlm.kept[0])
    assert set(geo.free_indices()) <= set(kept.tolist())          # every newline kept
    for crop in geo.crops():
        assert np.isin(crop, kept).sum() == 8                      # budget / crops per crop
    # each crop is scored by its own CLS attention in the feature layer
    with torch.no_grad():
        out = model.model.vision_tower(torch.as_tensor(pixels[0]), output_hidden_states=True)
        layer = vision_encoder(model).encoder.layers[0]
        _, scores = vision_features(model, torch.as_tensor(pixels), geo)
        for c, index in enumerate(geo.crops()):
            own = fastervlm_scores(layer, out.hidden_states[0][c:c + 1], True)
            assert torch.equal(scores[torch.as_tensor(index)], own)
    assert select_stage(PruneConfig.create("fastervlm", geo, budget=40).stages[0], scores,
                        geo).tolist() == fvlm.kept[0]


# ---- select segments (ONNX Runtime) vs the oracle -------------------------------------------

def _run(onnx_model, feeds):
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("budget, tie", [(84, False), (150, True)])
def test_feather_select_forces_the_two_raster_grid(model, budget, tie):
    from feather_export.onnx.decoder import attn_geometry
    from feather_export.onnx.select import build_select

    geo = geometry_of(model.config)
    stage = PruneConfig.create("feather", geo, budget=budget).stages[0]
    heads, kv_heads, head_dim = attn_geometry(model.model.language_model.config)
    n, start, d = geo.num_image_tokens, 3, model.config.text_config.hidden_size
    seq = start + n + 4
    rng = np.random.default_rng(budget)
    keys = rng.standard_normal((1, kv_heads, seq, head_dim)).astype(np.float32)
    if tie:                                     # equal keys: equal scores, ties to the lower index
        keys[:, :, start:start + n] = keys[:, :, start:start + 1]
    feeds = {f"score_query.{stage.layer - 1}": rng.standard_normal((1, 1, heads, head_dim)).astype(np.float32),
             f"score_keys.{stage.layer - 1}": keys,
             "hidden_states": rng.standard_normal((1, seq, d)).astype(np.float32),
             "position_ids": np.arange(seq, dtype=np.int64)[None], "image_start": np.array(start)}
    out = _run(build_select(model, stage, geo, 1), feeds)
    expected = select_stage(stage, out["scores"], geo)
    assert out["kept"].tolist() == expected.tolist()
    assert set(geo.grid_indices(stage.grid_stride)) <= set(expected.tolist())
    np.testing.assert_array_equal(out["pruned_hidden_states"][0, start:start + budget],
                                  feeds["hidden_states"][0, start + expected])


@pytest.mark.parametrize("budget", [5, 40, 320])
def test_fastervlm_select_per_crop(model, budget):
    from feather_export.onnx.select import build_select

    geo = geometry_of(model.config)
    stage = PruneConfig.create("fastervlm", geo, budget=budget).stages[0]
    n, d = geo.num_image_tokens, model.config.text_config.hidden_size
    rng = np.random.default_rng(budget)
    scores = np.round(rng.random(n), 1).astype(np.float32)          # many ties
    features = rng.standard_normal((1, n, d)).astype(np.float32)
    out = _run(build_select(model, stage, geo, 1), {"cls_scores": scores, "image_features": features})
    expected = select_per_crop(scores, geo.crops(), budget // 5, geo.free_indices())
    assert out["kept"].tolist() == expected.tolist() and len(expected) == stage.keep
    np.testing.assert_array_equal(out["pruned_image_features"][0], features[0, expected])


def test_overlay_splits_kept_indices_by_raster(model, tmp_path):
    from feather_export.quality.overlay import draw_raster_overlay, raster_local

    geo = geometry_of(model.config, (112, 336))                       # base 8x8, stitched 8x24
    base, stitched = geo.to_dict()["rasters"]
    kept = [0, 9, 63, 64, 64 + 24, 64 + 25, 64 + 7 * 25 + 23]            # 64 + 24: a newline
    assert raster_local(kept, base).tolist() == [0, 9, 63]
    assert raster_local(kept, stitched).tolist() == [0, 24, 7 * 24 + 23]
    views = [Image.new("RGB", (112, 112)), Image.new("RGB", (336, 112))]
    out = draw_raster_overlay(views, [kept], [base, stitched], tmp_path / "o.png", title="t")
    with Image.open(out) as png:
        assert png.width > png.height > 2 * 336


@pytest.mark.parametrize("pinpoint", [(224, 224), (112, 336), (224, 112)])
def test_next_vision_segment_equals_transformers(model, pinpoint):
    """Crop batch through the tower, projector, stitching with image_newline: equal to
    ``get_image_features`` (transformers' packing) and to the per-crop CLS scores."""
    import torch

    from feather_export.models.weights import ModelWeights
    from feather_export.onnx.vision_next import build_next_vision

    geo = geometry_of(model.config, pinpoint)
    sess = ort.InferenceSession(build_next_vision(ModelWeights(model), geo, 1).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(sum(pinpoint)).standard_normal(
        (1, len(geo.crops()), 3, 112, 112)).astype(np.float32)
    features, scores = sess.run(None, {"pixel_values": pixels})
    with torch.no_grad():
        ref_features, ref_scores = vision_features(model, torch.from_numpy(pixels), geo)
    assert features.shape == (1, geo.num_image_tokens, model.config.text_config.hidden_size)
    assert np.abs(features - ref_features.numpy()).max() < 1e-5
    assert np.abs(scores - ref_scores.numpy()).max() < 1e-6
    assert (scores[geo.free_indices()] == 0).all()


def test_perf_model_counts_every_crop():
    from feather_export.bench.perf_model import prefill_costs, shape_from_config, total

    config = _v16_config()
    shape = shape_from_config(config)
    assert (shape.crops, shape.num_image_tokens) == (5, 2928)
    costs = {c.name: c for c in prefill_costs(shape, None, 20, "fp32")}
    one = shape_from_config(config, (336, 672))
    assert one.crops == 3 and one.num_image_tokens == 1752
    assert costs["vision"].cost.flops == pytest.approx(
        5 / 3 * {c.name: c for c in prefill_costs(one, None, 20, "fp32")}["vision"].cost.flops)
    feather = PruneConfig.create("feather", geometry_of(config), budget=732)
    assert total(prefill_costs(shape, feather, 20, "fp32")).flops < total(costs.values()).flops


# ---- ONNX artifacts (export wiring) ----------------------------------------------------------

ARTIFACTS = [("none", None), ("feather", None), ("feather", 40), ("fastv", None),
             ("fastervlm", None), ("fastervlm", 20)]


@pytest.fixture(scope="module")
def next_artifacts(tmp_path_factory):
    from feather_export.export.artifact import ExportOptions, export

    root = tmp_path_factory.mktemp("next-artifacts")
    out = {}
    for method, budget in ARTIFACTS:
        path = root / f"{method}{budget or ''}"
        export("tiny-next", path, ExportOptions(method=method, budget=budget), progress=lambda m: None)
        out[(method, budget)] = path
    return out


@pytest.mark.parametrize("key", ARTIFACTS, ids=lambda k: f"{k[0]}{k[1] or ''}")
def test_onnx_artifacts_equal_the_reference(next_artifacts, model, key):
    """Every method through the ONNX artifacts (ONNX Runtime): the reference's kept indices,
    first logits and tokens on letterboxed images of three aspect ratios; ``none`` equals
    transformers' ``generate`` on them."""
    import torch

    from feather_runtime import Pipeline

    method, budget = key
    with Pipeline.load(next_artifacts[key]) as pipe:
        assert pipe.manifest["model"]["anyres"]["pinpoint"] == [224, 224]
        for size in IMAGES:
            pixels, ids = pipe.encode(_image(size, seed=size[0]), "What is it?")
            got = pipe.generate_ids(pixels, ids, max_new_tokens=6)
            ref = reference_generate(model, pixels, ids, method=method, budget=budget,
                                     max_new_tokens=6)
            assert got.kept == ref.kept
            assert np.abs(got.first_logits - ref.first_logits.numpy()).max() < 1e-4
            assert got.token_ids == ref.token_ids
            if method == "none":
                hf = model.generate(input_ids=torch.as_tensor(ids),
                                    pixel_values=torch.as_tensor(pixels),
                                    image_sizes=torch.tensor([[224, 224]]), max_new_tokens=6,
                                    do_sample=False)
                assert got.token_ids == hf[0, ids.shape[1]:].tolist()


def test_next_artifact_overlay(next_artifacts, tmp_path):
    from feather_export.quality.overlay import draw_pipeline_overlay
    from feather_runtime import Pipeline

    with Pipeline.load(next_artifacts[("feather", None)]) as pipe:
        image = _image(IMAGES[0])
        res = pipe.generate(image=image, prompt="What is it?", max_new_tokens=2)
        out = draw_pipeline_overlay(pipe, image, res, tmp_path / "kept.png")
    with Image.open(out) as png:
        assert png.height > 2 * 112


def test_next_artifacts_validate_and_lint(next_artifacts, model):
    from feather_export.export.validate import validate_artifact
    from feather_export.tensorrt.lint import check_artifact

    for key in (("feather", None), ("fastervlm", None)):
        checks = validate_artifact(next_artifacts[key], model=model)
        assert {c.segment for c in checks} >= {"vision", "select_0" if key[0] == "fastervlm"
                                               else "select_2"}
        assert checks and all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
        assert [f for f in check_artifact(next_artifacts[key]) if f.severity == "error"] == []


def test_checkpoint_directory_at_another_pinpoint(checkpoint, model, tmp_path):
    """``build --resolution`` on a llava_next checkpoint directory: the artifact's letterbox,
    token plan and tokens are the pinpoint's (transformers' generate on the letterboxed image),
    and ``validate`` loads the directory's weights as its reference."""
    import torch

    from feather_export.cli.main import main
    from feather_export.export.validate import validate_artifact
    from feather_runtime import Pipeline

    out = tmp_path / "wide"
    assert main(["build", "--model", str(checkpoint), "--method", "none", "--resolution",
                 "112x336", "--out", str(out)]) == 0
    geo = geometry_of(model.config, (112, 336))
    with Pipeline.load(out) as pipe:
        assert pipe.manifest["model"]["num_image_tokens"] == geo.num_image_tokens
        pixels, ids = pipe.encode(_image(IMAGES[0]), "What is it?")
        assert pixels.shape == (1, 4, 3, 112, 112)
        got = pipe.generate_ids(pixels, ids, max_new_tokens=6)
    hf = model.generate(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels),
                        image_sizes=torch.tensor([[112, 336]]), max_new_tokens=6, do_sample=False)
    assert got.token_ids == hf[0, ids.shape[1]:].tolist()
    checks = validate_artifact(out)
    assert checks and all(c.ok for c in checks), [c.line() for c in checks if not c.ok]


def test_resolution_refused_before_any_weight(tmp_path, capsys):
    from feather_export.cli.main import main

    assert main(["build", "--model", "tiny", "--resolution", "336x336",
                 "--out", str(tmp_path / "a")]) == 2
    assert "--resolution applies to LLaVA-NeXT" in capsys.readouterr().err
    assert main(["build", "--model", "tiny-next", "--resolution", "448x448",
                 "--out", str(tmp_path / "b")]) == 2
    assert "not one of the checkpoint's image_grid_pinpoints" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_estimate_counts_the_next_weights(next_artifacts):
    """The export size estimate equals the bytes the segments store (tower once, newline)."""
    import onnx

    from feather_export.export.artifact import ExportOptions
    from feather_export.export.footprint import estimated_bytes
    from feather_export.models.checkpoint import open_weights

    stored = 0
    for path in sorted((next_artifacts[("feather", None)] / "onnx").glob("*.onnx")):
        stored += sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer
                      if not t.name.startswith("const"))
    estimate = estimated_bytes(open_weights("tiny-next")[0], ExportOptions())
    assert abs(estimate - stored) <= 0.02 * stored, (estimate, stored)


def test_shape_next_model_plan_and_weights():
    """``shape-llava-next-cpu``: the real 2,928-token plan at 672x672; its streamed weights are
    named and shaped by transformers' LlavaNext module (image_newline included, not zero)."""
    from feather_export.models.shapes import shape_llava_config, shape_weights

    config = shape_llava_config("shape-llava-next-cpu")
    geo = geometry_of(config)
    assert geo.num_image_tokens == 2928 and geo.image_size == (672, 672)
    w = shape_weights("shape-llava-next-cpu")
    assert w.shape("model.image_newline") == (1024,)
    assert float(w.get("model.image_newline").abs().sum()) > 0
