"""VisionPreprocessor: every input kind and image mode, eval/train pipelines, errors, collate."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peace_vision.options import CLIP_MEAN, CLIP_STD, VisionOptions
from peace_vision.preprocess import (
    ImageInputError,
    VisionPreprocessor,
    decode_image,
    random_resized_crop_box,
    to_rgb,
)

SIDE = 32
MEAN = torch.tensor(CLIP_MEAN)[:, None, None]
STD = torch.tensor(CLIP_STD)[:, None, None]


@pytest.fixture
def pre() -> VisionPreprocessor:
    return VisionPreprocessor(VisionOptions(image_size=SIDE))


def unnormalise(pixels: torch.Tensor) -> torch.Tensor:
    """Back to [0,1] RGB."""
    return pixels * STD + MEAN


def colour_of(pixels: torch.Tensor) -> list[float]:
    """The single colour of a uniform image, in [0,1] per channel."""
    rgb = unnormalise(pixels)
    assert torch.allclose(rgb, rgb[:, :1, :1].expand_as(rgb), atol=1e-5), "image not uniform"
    return rgb[:, 0, 0].tolist()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


# --- the eval pipeline ---------------------------------------------------------------------------


def test_eval_is_bicubic_resize_then_clip_normalisation(pre: VisionPreprocessor) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    pixels = pre(image)["pixels"]
    assert pixels.shape == (3, SIDE, SIDE) and pixels.dtype == torch.float32
    resized = np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BICUBIC), dtype=np.float32)
    expected = (torch.from_numpy(resized / 255.0).permute(2, 0, 1) - MEAN) / STD
    torch.testing.assert_close(pixels, expected)


def test_uniform_colour_survives_exactly(pre: VisionPreprocessor) -> None:
    pixels = pre(Image.new("RGB", (50, 20), (255, 0, 51)))["pixels"]
    np.testing.assert_allclose(colour_of(pixels), [1.0, 0.0, 0.2], atol=1e-6)


def test_train_crop_is_random_and_shaped(pre: VisionPreprocessor) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    random.seed(0)
    first = pre(image, train=True)["pixels"]
    second = pre(image, train=True)["pixels"]
    assert first.shape == second.shape == (3, SIDE, SIDE)
    assert not torch.equal(first, second)
    random.seed(0)
    assert torch.equal(pre(image, train=True)["pixels"], first)  # seeded by Python's random
    assert not torch.equal(first, pre(image)["pixels"])


def test_random_resized_crop_box_respects_scale_and_ratio() -> None:
    rng = random.Random(0)
    for _ in range(200):
        left, top, width, height = random_resized_crop_box(
            300, 200, (0.9, 1.0), (3 / 4, 4 / 3), rng
        )
        assert left >= 0 and left + width <= 300 and top >= 0 and top + height <= 200
        assert 0.88 <= width * height / 60000 <= 1.0
        assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02


def test_random_resized_crop_box_falls_back_to_a_centred_crop() -> None:
    # a 1000x10 strip admits no box with aspect <= 4/3 covering 90% of it
    assert random_resized_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == (493, 0, 13, 10)
    assert random_resized_crop_box(1, 1, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 0, 1, 1)


# --- odd images ----------------------------------------------------------------------------------


def test_grayscale_is_repeated_over_channels(pre: VisionPreprocessor) -> None:
    np.testing.assert_allclose(colour_of(pre(Image.new("L", (9, 9), 51))["pixels"]), [0.2] * 3)


def test_palette_with_and_without_transparency(pre: VisionPreprocessor) -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    np.testing.assert_allclose(colour_of(pre(palette)["pixels"]), [1, 0, 0], atol=1e-6)
    palette.info["transparency"] = 1  # colour 1 is transparent -> white
    np.testing.assert_allclose(colour_of(pre(palette)["pixels"]), [1, 1, 1], atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("RGBA", (255, 0, 0, 0), [1, 1, 1]),  # fully transparent -> white
        ("RGBA", (255, 0, 0, 255), [1, 0, 0]),  # opaque -> itself
        ("RGBA", (0, 0, 0, 102), [0.6, 0.6, 0.6]),  # 40% black over white
        ("LA", (0, 51), [0.8, 0.8, 0.8]),
        ("La", (0, 51), [0.8, 0.8, 0.8]),
    ],
)
def test_alpha_is_composited_on_white(
    pre: VisionPreprocessor, mode: str, value: tuple, expected: list[float]
) -> None:
    np.testing.assert_allclose(
        colour_of(pre(Image.new(mode, (6, 6), value))["pixels"]), expected, atol=2.5e-3
    )


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_is_scaled_not_clipped(pre: VisionPreprocessor, mode: str) -> None:
    values = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    if mode == "I;16B":  # big-endian 16-bit, as some TIFF and PNM files decode
        image = Image.frombytes(mode, (2, 2), values.astype(">u2").tobytes())
    else:
        image = Image.fromarray(values)
        image = image if mode == "I;16" else image.convert(mode)
    assert image.mode == mode
    rgb = to_rgb(image)
    assert isinstance(rgb, np.ndarray) and rgb.shape == (2, 2, 3)
    np.testing.assert_allclose(rgb[..., 1], values / 65535.0, rtol=1e-6)
    # a mid-grey 16-bit image stays mid-grey (clipping to 8 bits would make it white)
    mid = Image.fromarray(np.full((5, 7), 32768, dtype=np.uint16))
    np.testing.assert_allclose(colour_of(pre(mid)["pixels"]), [32768 / 65535] * 3, atol=1e-5)


def test_float_and_32_bit_images_are_scaled_by_their_range() -> None:
    as_float = Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_allclose(to_rgb(as_float)[..., 0], [[0, 0.25], [0.5, 1.0]])
    eight_bit = Image.fromarray(np.array([[0, 51], [102, 255]], dtype=np.int32), mode="I")
    np.testing.assert_allclose(to_rgb(eight_bit)[..., 2], [[0, 0.2], [0.4, 1.0]], rtol=1e-6)


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "1", "RGBX", "P", "L"])
def test_other_modes_become_rgb(pre: VisionPreprocessor, mode: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).convert(mode)
    pixels = pre(image)["pixels"]
    assert pixels.shape == (3, SIDE, SIDE) and torch.isfinite(pixels).all()
    rgb = unnormalise(pixels)
    assert rgb.min() > -1e-5 and rgb.max() < 1 + 1e-5


def test_cmyk_white_and_black() -> None:
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 255))).getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (700, 2)])
@pytest.mark.parametrize("train", [False, True])
def test_tiny_and_extreme_aspect_images(
    pre: VisionPreprocessor, size: tuple[int, int], train: bool
) -> None:
    image = Image.new("RGB", size, (10, 200, 30))
    pixels = pre(image, train=train)["pixels"]
    assert pixels.shape == (3, SIDE, SIDE)
    np.testing.assert_allclose(colour_of(pixels), [10 / 255, 200 / 255, 30 / 255], atol=1e-5)


# --- arrays and tensors --------------------------------------------------------------------------


def test_numpy_arrays_of_every_layout(pre: VisionPreprocessor) -> None:
    rgb = np.zeros((5, 6, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    np.testing.assert_allclose(colour_of(pre(rgb)["pixels"]), [0, 1, 0], atol=1e-6)
    grey = np.full((5, 6), 0.2, dtype=np.float64)
    np.testing.assert_allclose(colour_of(pre(grey)["pixels"]), [0.2] * 3, atol=1e-6)
    single = np.full((5, 6, 1), 51, dtype=np.uint8)
    np.testing.assert_allclose(colour_of(pre(single)["pixels"]), [0.2] * 3, atol=1e-6)
    rgba = np.zeros((5, 6, 4), dtype=np.float32)
    rgba[..., 3] = 0.25  # 25% black over white
    np.testing.assert_allclose(colour_of(pre(rgba)["pixels"]), [0.75] * 3, atol=1e-6)
    rgba_u8 = np.zeros((5, 6, 4), dtype=np.uint8)  # fully transparent
    np.testing.assert_allclose(colour_of(pre(rgba_u8)["pixels"]), [1, 1, 1], atol=1e-6)
    deep = np.full((5, 6, 3), 13107, dtype=np.uint16)
    np.testing.assert_allclose(colour_of(pre(deep)["pixels"]), [0.2] * 3, atol=1e-5)


def test_uint8_array_matches_the_same_pil_image(pre: VisionPreprocessor) -> None:
    array = np.random.default_rng(3).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    assert torch.equal(pre(array)["pixels"], pre(Image.fromarray(array))["pixels"])


def test_torch_tensors(pre: VisionPreprocessor) -> None:
    image = torch.zeros(3, 7, 9)
    image[2] = 1.0
    np.testing.assert_allclose(colour_of(pre(image)["pixels"]), [0, 0, 1], atol=1e-6)
    as_bytes = torch.full((3, 7, 9), 51, dtype=torch.uint8)
    np.testing.assert_allclose(colour_of(pre(as_bytes)["pixels"]), [0.2] * 3, atol=1e-6)
    half = torch.full((1, 4, 4), 0.5, dtype=torch.bfloat16)
    np.testing.assert_allclose(colour_of(pre(half)["pixels"]), [0.5] * 3, atol=1e-6)
    rng = np.random.default_rng(1)
    array = rng.random((11, 13, 3), dtype=np.float32)
    torch.testing.assert_close(
        pre(torch.from_numpy(array).permute(2, 0, 1))["pixels"], pre(array)["pixels"]
    )


@pytest.mark.parametrize(
    ("item", "error", "match"),
    [
        (np.full((4, 4, 3), 2.0, dtype=np.float32), ImageInputError, r"in \[0, 1\]"),
        (np.full((4, 4, 3), np.nan, dtype=np.float32), ImageInputError, "finite"),
        (np.zeros((4, 4, 2), dtype=np.uint8), ImageInputError, "HxWx3"),
        (np.zeros((0, 4, 3), dtype=np.uint8), ImageInputError, "empty"),
        (np.zeros((4, 4, 3), dtype=np.int64), TypeError, "int64"),
        (torch.zeros(2, 4, 4), ImageInputError, "3xHxW"),
        (torch.zeros(1, 3, 4, 4), ImageInputError, "3xHxW"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), TypeError, "torch.int32"),
    ],
)
def test_bad_arrays_and_tensors(
    pre: VisionPreprocessor, item: object, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        pre(item)


# --- files, bytes and errors ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_paths_and_bytes(pre: VisionPreprocessor, tmp_path: Path, fmt: str) -> None:
    image = Image.new("RGB", (17, 23), (0, 102, 255))
    data = encoded(image, fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    from_bytes = pre(data)["pixels"]
    assert torch.equal(pre(str(path))["pixels"], from_bytes)
    assert torch.equal(pre(path)["pixels"], from_bytes)
    np.testing.assert_allclose(colour_of(from_bytes), [0, 0.4, 1], atol=0.02)


def test_decoders_cover_the_extensions_and_decode_eagerly(pre: VisionPreprocessor) -> None:
    assert set(pre.decoders) == {"jpg", "jpeg", "png", "webp"}
    data = encoded(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG")
    decoded = pre.decoders["png"](data)
    assert isinstance(decoded, Image.Image) and decoded.getpixel((0, 0)) == (1, 2, 3)
    truncated = encoded(Image.effect_noise((64, 64), 40).convert("RGB"), "PNG")[:300]
    with pytest.raises(ImageInputError, match="<bytes>"):
        pre.decoders["png"](truncated)


def test_corrupt_bytes_name_the_input(pre: VisionPreprocessor) -> None:
    with pytest.raises(ImageInputError, match=r"could not decode image <bytes> \(9 bytes\)"):
        pre(b"not a png")
    with pytest.raises(TypeError, match="bytes"):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_corrupt_and_missing_files_name_the_path(pre: VisionPreprocessor, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageInputError, match=r"broken\.jpg"):
        pre(broken)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        pre(str(tmp_path / "missing.png"))


@pytest.mark.parametrize("item", [42, None, ["a.png"], {"pixels": 1}, object()])
def test_wrong_types_list_what_is_accepted(pre: VisionPreprocessor, item: object) -> None:
    with pytest.raises(TypeError, match=rf"{type(item).__name__}.*expected a path") as info:
        pre(item)
    assert "PIL image" in str(info.value) and "torch tensor" in str(info.value)


# --- collate and examples ------------------------------------------------------------------------


def test_collate_stacks_and_rejects_mismatches(pre: VisionPreprocessor) -> None:
    samples = [pre(Image.new("RGB", (5, 5), (i, i, i))) for i in range(3)]
    batch = pre.collate(samples)
    assert set(batch) == {"pixels"} and batch["pixels"].shape == (3, 3, SIDE, SIDE)
    assert torch.equal(batch["pixels"][1], samples[1]["pixels"])
    other = VisionPreprocessor(VisionOptions(image_size=48))(Image.new("RGB", (5, 5)))
    with pytest.raises(ValueError, match="differ in shape"):
        pre.collate([samples[0], other])
    with pytest.raises(ValueError, match="no samples"):
        pre.collate([])
    with pytest.raises(KeyError, match="sample 1 has no 'pixels'"):
        pre.collate([samples[0], {"image": samples[0]["pixels"]}])


def test_examples_are_varied_valid_and_seeded(pre: VisionPreprocessor) -> None:
    items = pre.examples(14, seed=3)
    assert len(items) == 14
    kinds = {type(item).__name__ for item in items}
    assert {"Image", "bytes", "ndarray", "Tensor"} <= kinds
    modes = {item.mode for item in items if isinstance(item, Image.Image)}
    assert {"RGB", "L", "P", "I;16"} <= modes
    sizes = {to_rgb(item).size if isinstance(to_rgb(item), Image.Image) else None for item in items}
    assert len(sizes) > 3
    batch = pre.collate([pre(item) for item in items])
    assert batch["pixels"].shape == (14, 3, SIDE, SIDE) and torch.isfinite(batch["pixels"]).all()
    again = pre.collate([pre(item) for item in pre.examples(14, seed=3)])
    assert torch.equal(batch["pixels"], again["pixels"])
    other = pre.collate([pre(item) for item in pre.examples(14, seed=4)])
    assert not torch.equal(batch["pixels"], other["pixels"])
