"""Images in, normalised ``[3,S,S]`` pixels out (spec §1.1), plus collate and webdataset decoders.

Accepted raw items: a path (``str`` / ``os.PathLike``), encoded bytes, a PIL image of any mode, a
numpy array ``HxW`` / ``HxWx{1,3,4}`` (uint8, uint16, or float in [0,1]) and a torch tensor
``3xHxW`` (also ``1xHxW``, ``4xHxW``, ``HxW``; uint8 or float in [0,1]).

Colour handling, chosen to lose nothing the model can see:

- transparency (alpha channels, palette or colour-key transparency) is composited on **white**,
  so transparent regions look like the page they are usually shown on, not black;
- 16-bit images (``I;16*``, uint16 arrays) are scaled by 1/65535, never clipped to 8 bits;
  32-bit ``I`` and float ``F`` images are scaled by the smallest of 1 (float only), 255, 65535 or
  their maximum that covers their values;
- grey images are repeated over the three channels; CMYK, YCbCr, LAB... use Pillow's conversion;
- EXIF orientation is not applied and only the first frame of an animation is read (as the
  official pipeline does).

Bad input is an :class:`ImageInputError` (or a ``TypeError`` for an unaccepted type or dtype)
whose message names the input: an image with no pixels, or pixels that are NaN or infinite (float
arrays and tensors, and Pillow's float ``F`` images alike), is refused rather than turned into a
NaN embedding.

Size: any image is resized to ``image_size`` (so a 4096-px photo becomes ``[3,S,S]`` like any
other). What a file may decode to is bounded by Pillow's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``, about 89 M pixels warns, twice that is refused before decoding);
arrays and tensors are already in memory and are converted at most once to float32.

Evaluation: resize to ``S x S`` (bicubic, aspect ratio not kept, no crop), scale to [0,1],
normalise with ``mean``/``std``. Training (``train=True``): a RandomResizedCrop to ``S`` (area in
``train_crop_scale``, aspect in ``train_crop_ratio``, bicubic) drawn from Python's ``random``
module (seeded per worker by torch's DataLoader), then the same scaling and normalisation.
8-bit images are resized by Pillow exactly as the official pipeline does; high-bit-depth and
float images are resized per channel in 32-bit float.
"""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from peace_registry.errors import PeaceError
from peace_vision.options import VisionOptions, as_vision_options

#: File extensions (no dot) whose bytes the decoders read.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

ACCEPTED_INPUTS = (
    "a path (str or os.PathLike), encoded image bytes, a PIL image, a numpy array "
    "(HxW, HxWx1, HxWx3 or HxWx4) or a torch tensor (3xHxW, 1xHxW, 4xHxW or HxW)"
)

#: An RGB image mid-pipeline: 8-bit Pillow image, or float32 ``HxWx3`` array in [0,1].
RGBImage = Image.Image | np.ndarray

_WHITE = 255
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_TENSOR_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ImageInputError(PeaceError, ValueError):
    """An image that cannot be read or converted; the message names the input."""


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _open_eagerly(source: Any, name: str) -> Image.Image:
    try:
        image = Image.open(source)
        image.load()  # decode now, so a truncated or corrupt file fails here
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as err:
        raise ImageInputError(f"could not decode image {name}: {err}") from err
    return image


def decode_image(data: bytes) -> Image.Image:
    """Decode an encoded image (jpg, png, webp...) fully; errors name the input ``<bytes>``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    return _open_eagerly(io.BytesIO(bytes(data)), f"<bytes> ({len(data)} bytes)")


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image file; errors name the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {str(path)!r}")
    return _open_eagerly(path, repr(str(path)))


# --------------------------------------------------------------------------------------------
# Any input -> RGB
# --------------------------------------------------------------------------------------------


def _unit_divisor(values: np.ndarray) -> float:
    """What to divide a high-range image by to bring it into [0,1] (see the module doc)."""
    peak = float(values.max()) if values.size else 0.0
    if np.issubdtype(values.dtype, np.floating) and peak <= 1.0:
        return 1.0
    for divisor in (255.0, 65535.0):
        if peak <= divisor:
            return divisor
    return peak


def _grey_to_rgb(values: np.ndarray, divisor: float) -> np.ndarray:
    scaled = np.clip(values.astype(np.float32) / np.float32(divisor), 0.0, 1.0)
    return np.repeat(scaled[:, :, None], 3, axis=2)


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("LA").convert("RGBA") if image.mode == "La" else image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (_WHITE, _WHITE, _WHITE, _WHITE))
    return Image.alpha_composite(white, rgba).convert("RGB")


def pil_to_rgb(image: Image.Image) -> RGBImage:
    """Any Pillow image -> 8-bit RGB image, or float ``HxWx3`` for high-bit-depth modes.

    An image without pixels (a side of 0) or with NaN or infinite values (possible in ``F``
    images) is an :class:`ImageInputError`: scaling such values would give NaN pixels and a NaN
    embedding."""
    mode = image.mode
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"{mode!r} image of size {image.width}x{image.height} is empty")
    if mode in _SIXTEEN_BIT_MODES:
        return _grey_to_rgb(np.asarray(image), 65535.0)
    if mode in ("I", "F"):
        values = np.asarray(image)
        if not np.isfinite(values).all():
            raise ImageInputError(f"{mode!r} image: pixels must be finite (found NaN or inf)")
        return _grey_to_rgb(values, _unit_divisor(values))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_white(image)
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageInputError(f"cannot convert a {mode!r} image to RGB: {err}") from err


def _array_to_rgb(array: np.ndarray, name: str) -> RGBImage:
    """``HxW`` / ``HxWx{1,3,4}`` array -> RGB (alpha composited on white)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageInputError(
            f"{name} of shape {tuple(array.shape)}: expected HxW, HxWx1, HxWx3 or HxWx4"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageInputError(f"{name} of shape {tuple(array.shape)} is empty")
    if array.dtype == np.uint8:
        return pil_to_rgb(Image.fromarray(np.ascontiguousarray(array)))
    if array.dtype == np.uint16:
        values = array.astype(np.float32) / np.float32(65535.0)
    elif np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise ImageInputError(f"{name} of dtype {array.dtype}: pixels must be finite")
        if values.min() < 0.0 or values.max() > 1.0:
            raise ImageInputError(
                f"{name} of dtype {array.dtype}: float pixels must be in [0, 1] (got "
                f"{values.min():.4g}..{values.max():.4g}); scale 0..255 data by 1/255 or pass uint8"
            )
    else:
        raise TypeError(f"{name} of dtype {array.dtype}: expected uint8, uint16 or float pixels")
    if values.ndim == 2:
        return np.repeat(values[:, :, None], 3, axis=2)
    if values.shape[2] == 4:
        alpha = values[:, :, 3:]
        return values[:, :, :3] * alpha + (1.0 - alpha)
    return values


def _tensor_to_rgb(tensor: torch.Tensor) -> RGBImage:
    if tensor.layout != torch.strided or tensor.is_meta:
        where = "the meta device" if tensor.is_meta else f"the {tensor.layout} layout"
        raise ImageInputError(
            f"image tensor on {where} holds no readable pixels; pass a dense tensor with values"
        )
    if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):
        array = tensor.detach().cpu().permute(1, 2, 0)
    elif tensor.ndim == 2:
        array = tensor.detach().cpu()
    else:
        raise ImageInputError(
            f"image tensor of shape {tuple(tensor.shape)}: expected 3xHxW "
            "(also 1xHxW, 4xHxW or HxW)"
        )
    if tensor.dtype not in _TENSOR_DTYPES:
        raise TypeError(f"image tensor of dtype {tensor.dtype}: expected uint8 or float pixels")
    if tensor.dtype in (torch.bfloat16, torch.float16):
        array = array.float()  # numpy has no bfloat16
    return _array_to_rgb(array.numpy(), "image tensor")


def to_rgb(item: Any) -> RGBImage:
    """A raw item of any accepted kind -> RGB (8-bit Pillow image or float ``HxWx3`` array)."""
    if isinstance(item, Image.Image):
        return pil_to_rgb(item)
    if isinstance(item, (str, os.PathLike)):
        return pil_to_rgb(open_image(item))
    if isinstance(item, (bytes, bytearray, memoryview)):
        return pil_to_rgb(decode_image(item))
    if isinstance(item, np.ndarray):
        return _array_to_rgb(item, "image array")
    if isinstance(item, torch.Tensor):
        return _tensor_to_rgb(item)
    raise TypeError(f"vision input of type {type(item).__name__}: expected {ACCEPTED_INPUTS}")


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def image_size(image: RGBImage) -> tuple[int, int]:
    """``(width, height)`` of an RGB image in either representation."""
    if isinstance(image, Image.Image):
        return image.size
    return image.shape[1], image.shape[0]


def crop(image: RGBImage, box: tuple[int, int, int, int]) -> RGBImage:
    """Crop ``(left, top, width, height)``."""
    left, top, width, height = box
    if isinstance(image, Image.Image):
        return image.crop((left, top, left + width, top + height))
    return image[top : top + height, left : left + width]


def resize_square(image: RGBImage, side: int) -> RGBImage:
    """Bicubic resize to ``side x side`` (aspect ratio not kept)."""
    if isinstance(image, Image.Image):
        return image.resize((side, side), Image.Resampling.BICUBIC)
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[:, :, c]), mode="F").resize(
                (side, side), Image.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0)


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random | Any = random,
) -> tuple[int, int, int, int]:
    """A random ``(left, top, w, h)`` box covering a fraction in ``scale`` of the image area with
    aspect (w/h) in ``ratio`` (log-uniform); after 10 misses, the largest centred box whose aspect
    is clamped into ``ratio``."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        box_w = round(math.sqrt(target * aspect))
        box_h = round(math.sqrt(target / aspect))
        if 0 < box_w <= width and 0 < box_h <= height:
            return rng.randint(0, width - box_w), rng.randint(0, height - box_h), box_w, box_h
    aspect = width / height
    if aspect < ratio[0]:
        box_w, box_h = width, min(height, max(1, round(width / ratio[0])))
    elif aspect > ratio[1]:
        box_w, box_h = min(width, max(1, round(height * ratio[1]))), height
    else:
        box_w, box_h = width, height
    return (width - box_w) // 2, (height - box_h) // 2, box_w, box_h


def to_unit_tensor(image: RGBImage) -> torch.Tensor:
    """RGB image -> float32 ``[3,H,W]`` in [0,1]."""
    if isinstance(image, Image.Image):
        array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    else:
        array = image.astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


# --------------------------------------------------------------------------------------------
# The preprocessor
# --------------------------------------------------------------------------------------------


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return repr(str(item))
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return f"<{type(item).__name__}>"


class VisionPreprocessor:
    """The vision modality's :class:`~peace_registry.contract.Preprocessor` (see module doc)."""

    def __init__(self, options: VisionOptions | None = None) -> None:
        self.options = as_vision_options(options)
        self.decoders: dict[str, Callable[[bytes], Any]] = dict.fromkeys(
            IMAGE_EXTENSIONS, decode_image
        )
        self._mean = torch.tensor(self.options.mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(self.options.std, dtype=torch.float32)[:, None, None]

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        try:
            image = to_rgb(item)
        except ImageInputError as err:
            text = str(err)
            named = text if _describe(item) in text else f"{_describe(item)}: {text}"
            raise ImageInputError(named) from err
        side = self.options.image_size
        if train:
            width, height = image_size(image)
            box = random_resized_crop_box(
                width, height, self.options.train_crop_scale, self.options.train_crop_ratio
            )
            image = crop(image, box)
        pixels = to_unit_tensor(resize_square(image, side))
        return {"pixels": (pixels - self._mean) / self._std}

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack samples into ``{"pixels": [B,3,S,S]}``."""
        if not samples:
            raise ValueError("vision collate: no samples to collate")
        shapes = set()
        for position, sample in enumerate(samples):
            if "pixels" not in sample:
                raise KeyError(
                    f"vision collate: sample {position} has no 'pixels' (keys: {sorted(sample)})"
                )
            shapes.add(tuple(sample["pixels"].shape))
        if len(shapes) > 1:
            raise ValueError(
                f"vision collate: samples differ in shape {sorted(shapes)}; preprocess every "
                "image with the same options"
            )
        return {"pixels": torch.stack([sample["pixels"] for sample in samples])}

    def examples(self, count: int, seed: int = 0) -> list[Any]:
        """``count`` small valid raw images of varied kinds, modes, sizes and aspect ratios."""
        rng = np.random.default_rng(seed)
        makers = [
            _example_rgb,
            _example_png_bytes,
            _example_grey,
            _example_rgba_array,
            _example_float_tensor,
            _example_palette,
            _example_sixteen_bit,
        ]
        return [makers[i % len(makers)](rng) for i in range(count)]


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(1, 80)), int(rng.integers(1, 80))


def _example_rgb(rng: np.random.Generator) -> Image.Image:
    height, width = _random_size(rng)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _example_png_bytes(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    _example_rgb(rng).save(buffer, format="PNG")
    return buffer.getvalue()


def _example_grey(rng: np.random.Generator) -> Image.Image:
    height, width = _random_size(rng)
    return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))


def _example_rgba_array(rng: np.random.Generator) -> np.ndarray:
    height, width = _random_size(rng)
    return rng.integers(0, 256, (height, width, 4), dtype=np.uint8)


def _example_float_tensor(rng: np.random.Generator) -> torch.Tensor:
    height, width = _random_size(rng)
    return torch.from_numpy(rng.random((3, height, width), dtype=np.float32))


def _example_palette(rng: np.random.Generator) -> Image.Image:
    return _example_rgb(rng).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)


def _example_sixteen_bit(rng: np.random.Generator) -> Image.Image:
    height, width = _random_size(rng)
    return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))


def build_vision_preprocessor(options: Any) -> VisionPreprocessor:
    """``PreprocessorSpec.build`` for the vision modality."""
    return VisionPreprocessor(as_vision_options(options))
