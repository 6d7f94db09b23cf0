"""Image preprocessing equal to transformers' CLIP and SigLIP image processors (PIL backend),
using Pillow + numpy.

CLIP (LLaVA-1.5's preprocessor_config.json): convert to RGB (transparency composited on white),
resize the shortest edge (bicubic, on uint8), center crop, rescale by 1/255, normalize with CLIP's
mean/std. SigLIP (llava-interleave): the same steps without the crop, a resize to exactly
height x width, mean/std 0.5. Each processor type has its own defaults for keys the config omits
(``PROCESSOR_DEFAULTS``, taken from transformers' classes).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FeatherError

CONFIG_NAME = "preprocessor_config.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

_CLIP_DEFAULTS = {"size": {"shortest_edge": 224}, "do_center_crop": True,
                  "crop_size": {"height": 224, "width": 224}, "image_mean": CLIP_MEAN,
                  "image_std": CLIP_STD, "resample": 3}
_SIGLIP_DEFAULTS = {"size": {"height": 224, "width": 224}, "do_center_crop": False,
                    "crop_size": {"height": 224, "width": 224}, "image_mean": SIGLIP_MEAN,
                    "image_std": SIGLIP_STD, "resample": 3}
# image_processor_type -> defaults of the keys a config may omit (transformers' class attributes)
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    **{name: _CLIP_DEFAULTS for name in
       ("CLIPImageProcessor", "CLIPImageProcessorPil", "CLIPImageProcessorFast")},
    **{name: _SIGLIP_DEFAULTS for name in
       ("SiglipImageProcessor", "SiglipImageProcessorPil", "SiglipImageProcessorFast")},
}
# LLaVA-NeXT (anyres): every crop goes through CLIP's steps with CLIP's defaults
ANYRES_PROCESSORS = ("LlavaNextImageProcessor", "LlavaNextImageProcessorPil",
                     "LlavaNextImageProcessorFast")
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_image(image: ImageInput) -> Image.Image:
    """Return an RGB PIL image from a path, a PIL image, or a uint8 HxW / HxWxC (C in 1, 3, 4) array."""
    if isinstance(image, (str, os.PathLike)):
        return _load_path(pathlib.Path(image))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise FeatherError(f"unsupported image input of type {type(image).__name__}: pass a file path, a PIL image or a numpy array")


def _load_path(path: pathlib.Path) -> Image.Image:
    if not path.exists():
        raise FeatherError(f"image file not found: {path}")
    if not path.is_file():
        raise FeatherError(f"image path is not a file: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            return _pil_to_rgb(opened)
    except FeatherError as exc:
        raise FeatherError(f"{path}: {exc}") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise FeatherError(f"cannot read image {path}: {exc}. Pass a valid PNG/JPEG/... image file.") from exc


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb for PIL images: composite any transparency onto white."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise FeatherError(f"cannot convert a {image.mode!r} image to RGB ({exc}); convert it to RGB or RGBA first") from exc


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """transformers' convert_to_rgb for channels-last uint8 arrays (alpha blended onto white, rounded)."""
    if array.dtype != np.uint8:
        raise FeatherError(f"image array must be uint8 (0..255), got {array.dtype}; convert it first")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise FeatherError(f"image array must be HxW or HxWxC with C in (1, 3, 4), channels last; got shape {array.shape}")
    if array.shape[-1] == 1:
        rgb = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        rgb = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    else:
        rgb = array
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FeatherError(f"preprocessor config: {what} must be a positive integer, got {value!r}")
    return value


def _parse_size(size: Any, what: str, square_int: bool) -> dict[str, int]:
    """Accept {"shortest_edge": n}, {"height": h, "width": w} or an int, like transformers' get_size_dict."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = _positive_int(size, what)
        return {"height": n, "width": n} if square_int else {"shortest_edge": n}
    if isinstance(size, dict):
        if set(size) == {"shortest_edge"}:
            return {"shortest_edge": _positive_int(size["shortest_edge"], f"{what}.shortest_edge")}
        if set(size) == {"height", "width"}:
            return {k: _positive_int(size[k], f"{what}.{k}") for k in ("height", "width")}
    raise FeatherError(
        f"preprocessor config: {what} must be {{'shortest_edge': n}} or {{'height': h, 'width': w}}, got {size!r}"
    )


def _parse_triple(value: Any, what: str) -> np.ndarray:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise FeatherError(f"preprocessor config: {what} must be 3 numbers (one per RGB channel), got {value!r}")
    return np.array(value, dtype=np.float32)


class ImagePreprocessor:
    """CLIP/SigLIP image-processor-equivalent preprocessing; call it on an image to get float32
    [1, 3, H, W]."""

    def __init__(self, config: dict[str, Any]):
        if not isinstance(config, dict):
            raise FeatherError(f"preprocessor config must be a JSON object, got {type(config).__name__}")
        kind = config.get("image_processor_type", "CLIPImageProcessor")
        if kind not in PROCESSOR_DEFAULTS:
            raise FeatherError(f"unsupported image_processor_type {kind!r}; CLIPImageProcessor (LLaVA-1.5) "
                               "and SiglipImageProcessor (llava-interleave) are supported")
        self.kind = kind
        config = {**PROCESSOR_DEFAULTS[kind], **config}
        if config.get("do_pad"):
            raise FeatherError("preprocessor config: do_pad=true is not supported (LLaVA-1.5 CLIP preprocessing has no padding)")
        self.do_convert_rgb = bool(config.get("do_convert_rgb", True))
        self.do_resize = bool(config.get("do_resize", True))
        self.size = _parse_size(config["size"], "size", square_int=False)
        resample = config["resample"]
        if isinstance(resample, bool) or resample not in [int(r) for r in Image.Resampling]:
            raise FeatherError(f"preprocessor config: resample must be a PIL resampling id 0..5, got {resample!r}")
        self.resample = Image.Resampling(resample)
        self.do_center_crop = bool(config["do_center_crop"])
        self.crop_size = _parse_size(config["crop_size"], "crop_size", square_int=True)
        if "shortest_edge" in self.crop_size:
            raise FeatherError("preprocessor config: crop_size must be {'height': h, 'width': w}")
        self.do_rescale = bool(config.get("do_rescale", True))
        factor = config.get("rescale_factor", 1 / 255)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise FeatherError(f"preprocessor config: rescale_factor must be a number, got {factor!r}")
        self.rescale_factor = float(factor)
        self.do_normalize = bool(config.get("do_normalize", True))
        self.image_mean = _parse_triple(config["image_mean"], "image_mean")
        self.image_std = _parse_triple(config["image_std"], "image_std")
        if self.do_normalize and np.any(self.image_std == 0):
            raise FeatherError("preprocessor config: image_std must not contain 0")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ImagePreprocessor":
        """Build from a preprocessor_config.json-style dict."""
        return cls(config)

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "ImagePreprocessor":
        """Build from ``<path>/preprocessor_config.json``."""
        return cls(_read_config(path))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of the output, or None when it depends on the input image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def __call__(self, image: ImageInput) -> np.ndarray:
        """Preprocess one image to a contiguous float32 array of shape [1, 3, H, W]."""
        if self.do_convert_rgb:
            pil = load_image(image)
        else:
            pil = image if isinstance(image, Image.Image) else load_image(image)
            if pil.mode != "RGB":
                raise FeatherError(f"image mode {pil.mode!r} is not RGB and do_convert_rgb is false in the config")
        if pil.width == 0 or pil.height == 0:
            raise FeatherError(f"image has zero size {pil.size}; pass a non-empty image")
        if self.do_resize:
            height, width = self._resize_shape(pil.height, pil.width)
            pil = pil.resize((width, height), resample=self.resample)
        pixels = np.asarray(pil).transpose(2, 0, 1)  # CHW uint8
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = pixels.astype(np.float32)
            pixels = (pixels - self.image_mean[:, None, None]) / self.image_std[:, None, None]
        return np.ascontiguousarray(pixels[None], dtype=np.float32)

    def _resize_shape(self, height: int, width: int) -> tuple[int, int]:
        """transformers' get_resize_output_image_size(default_to_square=False): long edge truncated."""
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)
        return (new_long, target) if width <= height else (target, new_long)


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' center_crop on CHW: offset (orig - crop) // 2, zero padding when the image is smaller."""
    _, orig_h, orig_w = pixels.shape
    top, left = (orig_h - crop_h) // 2, (orig_w - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, orig_h), max(crop_w, orig_w)
    padded = np.zeros((pixels.shape[0], new_h, new_w), dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((new_h - orig_h) / 2), math.ceil((new_w - orig_w) / 2)
    padded[:, top_pad : top_pad + orig_h, left_pad : left_pad + orig_w] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def letterbox_canvas(height: int, width: int, pinpoint: tuple[int, int]) -> tuple[int, int]:
    """The smallest (H, W) >= (height, width) with exactly the pinpoint's aspect ratio."""
    ph, pw = pinpoint
    g = math.gcd(ph, pw)
    a, b = ph // g, pw // g
    k = max(-(-height // a), -(-width // b))
    return k * a, k * b


def letterbox(image: ImageInput, pinpoint: tuple[int, int], image_mean) -> Image.Image:
    """LLaVA-NeXT's static-shape input (docs/design.md §3): pad the RGB image, centred (offsets
    floor(pad / 2) left and top), to the smallest canvas with the pinpoint's exact aspect ratio,
    filled with int(255 x image_mean) per channel, then resize it (bicubic) to the pinpoint's
    H x W if the canvas differs."""
    pil = load_image(image)
    if pil.width == 0 or pil.height == 0:
        raise FeatherError(f"image has zero size {pil.size}; pass a non-empty image")
    ph, pw = pinpoint
    ch, cw = letterbox_canvas(pil.height, pil.width, pinpoint)
    if (ch, cw) != (pil.height, pil.width):
        fill = tuple(int(255 * float(m)) for m in image_mean)
        canvas = Image.new("RGB", (cw, ch), fill)
        canvas.paste(pil, ((cw - pil.width) // 2, (ch - pil.height) // 2))
        pil = canvas
    if (ch, cw) != (ph, pw):
        pil = pil.resize((pw, ph), resample=Image.Resampling.BICUBIC)
    return pil


class AnyresPreprocessor:
    """LLaVA-NeXT preprocessing for one pinpoint, equal to transformers' ``LlavaNextImageProcessor``
    on the letterboxed image: the base image (the whole image resized to the crop size) and the
    pinpoint's crops in row-major order, each through CLIP's steps; float32 [1, crops, 3, h, w]."""

    def __init__(self, config: dict[str, Any], pinpoint: tuple[int, int]):
        if not isinstance(config, dict):
            raise FeatherError(f"preprocessor config must be a JSON object, got {type(config).__name__}")
        kind = config.get("image_processor_type", ANYRES_PROCESSORS[0])
        if kind not in ANYRES_PROCESSORS:
            raise FeatherError(f"image_processor_type {kind!r} does not prepare a LLaVA-NeXT model "
                               f"({ANYRES_PROCESSORS[0]} does)")
        crop_config = {k: v for k, v in config.items()
                       if k not in ("image_grid_pinpoints", "do_pad", "image_processor_type")}
        self.crop = ImagePreprocessor({**crop_config, "image_processor_type": "CLIPImageProcessor"})
        if not self.crop.do_resize:
            raise FeatherError("preprocessor config: do_resize=false is not supported for LLaVA-NeXT")
        size = self.crop.size
        self.base_size = ((size["shortest_edge"],) * 2 if "shortest_edge" in size
                          else (size["height"], size["width"]))
        self.patch = self.crop.crop_size["height"]       # transformers: crop_size's height
        pinpoints = config.get("image_grid_pinpoints", [list(p) for p in LLAVA_NEXT_PINPOINTS])
        self.pinpoint = (int(pinpoint[0]), int(pinpoint[1]))
        if [*self.pinpoint] not in [list(p) for p in pinpoints]:
            raise FeatherError(f"pinpoint {self.pinpoint[0]}x{self.pinpoint[1]} is not one of the "
                               f"preprocessor's image_grid_pinpoints {pinpoints}")
        if self.pinpoint[0] % self.patch or self.pinpoint[1] % self.patch:
            raise FeatherError(f"pinpoint {self.pinpoint} is not a whole number of {self.patch}-pixel crops")

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike], pinpoint) -> "AnyresPreprocessor":
        return cls(_read_config(path), pinpoint)

    @property
    def num_crops(self) -> int:
        return 1 + (self.pinpoint[0] // self.patch) * (self.pinpoint[1] // self.patch)

    def letterbox(self, image: ImageInput) -> Image.Image:
        """The image as the model sees it: letterboxed to the pinpoint (what overlays draw on)."""
        return letterbox(image, self.pinpoint, self.crop.image_mean)

    def __call__(self, image: ImageInput) -> np.ndarray:
        boxed = self.letterbox(image)
        base = boxed.resize((self.base_size[1], self.base_size[0]), resample=self.crop.resample)
        views = [base]
        for top in range(0, self.pinpoint[0], self.patch):
            for left in range(0, self.pinpoint[1], self.patch):
                views.append(boxed.crop((left, top, left + self.patch, top + self.patch)))
        return np.ascontiguousarray(np.concatenate([self.crop(v) for v in views])[None])


def _read_config(path: Union[str, os.PathLike]) -> dict:
    file = pathlib.Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FeatherError(f"{file} not found: the model directory must contain {CONFIG_NAME}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatherError(f"cannot parse {file}: {exc}") from exc


def write_preprocessor_config(out_dir: Union[str, os.PathLike], image_size: int,
                              processor: str = "CLIPImageProcessor", pinpoints=()) -> pathlib.Path:
    """Write a preprocessor_config.json for square inputs of image_size; return its path.

    ``CLIPImageProcessor``: LLaVA-1.5's (shortest edge, center crop, CLIP mean/std);
    ``SiglipImageProcessor``: llava-interleave's (resize to image_size x image_size, mean/std 0.5);
    ``LlavaNextImageProcessor``: llava-v1.6's (CLIP's, crops of image_size, ``pinpoints``).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise FeatherError(f"image_size must be a positive integer, got {image_size!r}")
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_processor_type": processor, "processor_class": "LlavaProcessor",
              "resample": 3, "rescale_factor": 1 / 255}
    if processor in ("CLIPImageProcessor", "LlavaNextImageProcessor"):
        config = {**common, "crop_size": {"height": image_size, "width": image_size},
                  "do_center_crop": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                  "size": {"shortest_edge": image_size}}
        if processor == "LlavaNextImageProcessor":
            config.update(do_pad=True, processor_class="LlavaNextProcessor",
                          image_grid_pinpoints=[list(p) for p in (pinpoints or LLAVA_NEXT_PINPOINTS)])
    elif processor == "SiglipImageProcessor":
        config = {**common, "image_mean": list(SIGLIP_MEAN), "image_std": list(SIGLIP_STD),
                  "size": {"height": image_size, "width": image_size}}
    else:
        raise FeatherError(f"cannot write a preprocessor config for {processor!r}")
    config = dict(sorted(config.items()))
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_NAME
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def preprocessor_for(path: Union[str, os.PathLike], anyres: dict | None = None):
    """The artifact's preprocessor: LLaVA-NeXT's for one pinpoint when the manifest has an
    ``anyres`` block, else CLIP's / SigLIP's."""
    if anyres:
        return AnyresPreprocessor.from_dir(path, tuple(anyres["pinpoint"]))
    return ImagePreprocessor.from_dir(path)


def pixel_shape(model: dict) -> tuple[int, ...]:
    """The vision segment's ``pixel_values`` shape from the manifest's model block."""
    anyres = model.get("anyres")
    if anyres:
        return (1, int(anyres["num_crops"]), 3, int(anyres["crop_size"]), int(anyres["crop_size"]))
    return (1, 3, int(model["image_size"]), int(model["image_size"]))
