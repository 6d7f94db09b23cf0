"""Runtime image preprocessing vs transformers' CLIPImageProcessor (PIL backend), plus error paths."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from feather_runtime.errors import FeatherError
from feather_runtime.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImagePreprocessor,
    load_image,
    write_preprocessor_config,
)

SIZES = [(100, 50), (336, 336), (640, 480), (17, 900), (1, 1), (337, 335)]  # (width, height)
MODES = ["RGB", "L", "RGBA", "P", "P-transparency", "CMYK", "LA", "PA", "I;16", "I", "F", "1", "YCbCr"]
TOL = 1e-5


def make_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """A seeded random PIL image of the given mode."""
    rng = np.random.default_rng(seed)
    u8 = lambda *c: rng.integers(0, 256, (height, width, *c), dtype=np.uint8)  # noqa: E731
    if mode in ("RGB", "RGBA"):
        return Image.fromarray(u8(len(mode)), mode=mode)
    if mode in ("CMYK", "LA", "PA", "YCbCr"):
        return Image.frombytes(mode, (width, height), u8(len(mode) if mode != "YCbCr" else 3).tobytes())
    if mode == "L":
        return Image.fromarray(u8(), mode="L")
    if mode.startswith("P"):
        image = Image.fromarray(u8(), mode="L").convert("P")
        image.putpalette([int(v) for v in rng.integers(0, 256, 768)])
        if mode == "P-transparency":
            image.info["transparency"] = 7
        return image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-1000, 70000, (height, width), dtype=np.int32))
    if mode == "F":
        return Image.fromarray((rng.random((height, width)) * 300).astype(np.float32))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width)).astype(bool))
    raise ValueError(mode)


@pytest.fixture(scope="module", params=[336, 224])
def pair(request, tmp_path_factory):
    """(ours, transformers') preprocessors built from the same written config."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp(f"pp{request.param}")
    config = json.loads(write_preprocessor_config(out, request.param).read_text())
    reference = transformers.CLIPImageProcessorPil(**config)
    return ImagePreprocessor.from_dir(out), reference, request.param


def reference_pixels(reference, image) -> np.ndarray:
    return np.asarray(reference(image, return_tensors="np")["pixel_values"])


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.flags["C_CONTIGUOUS"]
    assert ours.shape == theirs.shape
    assert float(np.abs(ours - theirs).max()) <= TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_clip_image_processor(pair, mode, size):
    ours, reference, image_size = pair
    image = make_image(mode, *size, seed=size[0] * 7 + size[1])
    pixels = ours(image)
    assert pixels.shape == (1, 3, image_size, image_size)
    assert_close(pixels, reference_pixels(reference, image))


@pytest.mark.parametrize("shape", [(50, 100, 3), (50, 100, 4), (50, 100, 1), (900, 17, 3)])
def test_uint8_arrays_match(pair, shape):
    ours, reference, _ = pair
    array = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    assert_close(ours(array), reference_pixels(reference, array))


def test_2d_array_is_grayscale(pair):
    ours, _, _ = pair
    array = np.random.default_rng(4).integers(0, 256, (40, 60), dtype=np.uint8)
    np.testing.assert_array_equal(ours(array), ours(Image.fromarray(array, mode="L")))


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGBA"), ("PNG", "P-transparency"), ("JPEG", "RGB"), ("PNG", "LA")])
def test_files_match_processor_on_opened_image(pair, tmp_path, fmt, mode):
    ours, reference, _ = pair
    path = tmp_path / f"image.{fmt.lower()}"
    image = make_image(mode, 120, 80)
    image.save(path, format=fmt, **({"transparency": 7} if mode == "P-transparency" else {}))
    with Image.open(path) as opened:
        expected = reference_pixels(reference, opened)
    assert_close(ours(path), expected)
    assert_close(ours(str(path)), expected)


def test_center_crop_pads_when_image_is_small():
    """No resize and a crop larger than the image: zero padding, as transformers does."""
    transformers = pytest.importorskip("transformers")
    config = {"do_resize": False, "crop_size": {"height": 9, "width": 12}, "image_mean": list(CLIP_MEAN),
              "image_std": list(CLIP_STD)}
    reference = transformers.CLIPImageProcessorPil(**config)
    for size in [(5, 4), (12, 3), (20, 6), (3, 20)]:
        image = make_image("RGB", *size)
        assert_close(ImagePreprocessor.from_config(config)(image), reference_pixels(reference, image))


def test_load_image_returns_rgb():
    for mode in MODES:
        assert load_image(make_image(mode, 8, 6)).mode == "RGB"
    white = load_image(Image.new("RGBA", (2, 2), (10, 20, 30, 0)))
    assert white.getpixel((0, 0)) == (255, 255, 255)


def test_written_config_loads_in_transformers(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_preprocessor_config(tmp_path, 224)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["size"] == {"shortest_edge": 224} and config["crop_size"] == {"height": 224, "width": 224}
    assert config["image_processor_type"] == "CLIPImageProcessor" and config["resample"] == 3
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    image = make_image("RGB", 300, 200)
    assert_close(ImagePreprocessor.from_dir(tmp_path)(image), reference_pixels(processor, image))
    assert ImagePreprocessor.from_dir(tmp_path).output_size == (224, 224)


# ---- SigLIP (llava-interleave): resize to height x width, no crop, mean/std 0.5 -----------------

@pytest.fixture(scope="module", params=[384, 192])
def siglip_pair(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp(f"siglip{request.param}")
    config = json.loads(write_preprocessor_config(out, request.param, "SiglipImageProcessor").read_text())
    reference = transformers.SiglipImageProcessorPil(**config)
    return ImagePreprocessor.from_dir(out), reference, request.param


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P-transparency", "CMYK", "I;16", "1"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_siglip_image_processor(siglip_pair, mode, size):
    ours, reference, image_size = siglip_pair
    image = make_image(mode, *size, seed=size[0] * 5 + size[1])
    pixels = ours(image)
    assert pixels.shape == (1, 3, image_size, image_size)       # squashed, not cropped
    assert_close(pixels, reference_pixels(reference, image))


def test_siglip_defaults_are_transformers_defaults(tmp_path, monkeypatch):
    """A minimal SigLIP config (only the type): our defaults equal the class's, through
    AutoImageProcessor as a checkpoint directory would load it."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = {"image_processor_type": "SiglipImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    reference = transformers.SiglipImageProcessorPil(**config)
    ours = ImagePreprocessor.from_dir(tmp_path)
    assert ours.output_size == (224, 224)
    for size in [(300, 200), (50, 500)]:
        image = make_image("RGB", *size)
        assert_close(ours(image), reference_pixels(reference, image))
    auto = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))   # PIL backend here
    image = make_image("RGBA", 97, 211)
    assert_close(ours(image), reference_pixels(auto, image))


# ---- errors ---------------------------------------------------------------------------------

def test_unreadable_images_raise_feather_error(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    make_image("RGB", 64, 64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    for path in [garbage, empty, truncated, tmp_path / "missing.png", tmp_path]:
        with pytest.raises(FeatherError, match=str(path.name)):
            load_image(path)
        with pytest.raises(FeatherError):
            ImagePreprocessor.from_config({})(str(path))


@pytest.mark.parametrize("bad", [
    np.zeros((4, 4, 3), dtype=np.float32), np.zeros((3, 40, 50), dtype=np.uint8),
    np.zeros((4, 4, 2), dtype=np.uint8), np.zeros((0, 4, 3), dtype=np.uint8), 42, b"bytes",
])
def test_bad_inputs_raise_feather_error(bad):
    with pytest.raises(FeatherError):
        ImagePreprocessor.from_config({})(bad)


def test_unconvertible_mode_raises_feather_error():
    image = Image.frombytes("La", (3, 3), bytes(18))
    with pytest.raises(FeatherError, match="La"):
        load_image(image)


def test_missing_or_malformed_config_raises(tmp_path):
    with pytest.raises(FeatherError, match="preprocessor_config.json"):
        ImagePreprocessor.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(FeatherError, match="cannot parse"):
        ImagePreprocessor.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(FeatherError, match="JSON object"):
        ImagePreprocessor.from_dir(tmp_path)


@pytest.mark.parametrize("config", [
    {"size": {"longest_edge": 3}}, {"size": -1}, {"crop_size": {"height": 0, "width": 3}},
    {"image_mean": [0.5, 0.5]}, {"image_std": [0.5, 0.0, 0.5]}, {"resample": 9},
    {"image_processor_type": "LlavaNextImageProcessor"}, {"do_pad": True}, {"rescale_factor": "x"},
])
def test_bad_config_values_raise(config):
    with pytest.raises(FeatherError, match="preprocessor config|unsupported"):
        ImagePreprocessor.from_config(config)


def test_write_config_rejects_bad_size(tmp_path):
    with pytest.raises(FeatherError):
        write_preprocessor_config(tmp_path, 0)


def test_runtime_imports_stay_lean():
    code = (
        "import sys, feather_runtime.preprocess, feather_runtime.prompt\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'torchvision'))\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == ""
