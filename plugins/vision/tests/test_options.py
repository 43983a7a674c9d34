"""VisionOptions: official defaults, resolved sizes, validation messages."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from peace_vision.options import CLIP_MEAN, CLIP_STD, VisionOptions, as_vision_options


def test_defaults_are_the_official_values() -> None:
    options = VisionOptions()
    assert options.image_size == 256
    assert (options.grid_size, options.pos_grid_size, options.rel_grid_size) == (16, 16, 16)
    assert options.mean == CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert options.std == CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert options.train_crop_scale == (0.9, 1.0)
    assert options.mask_ratio == 0.75 and options.joint_mask_ratio == 0.6875
    for name, field in VisionOptions.model_fields.items():
        assert field.description, f"option {name} has no description"


def test_bucket_sizes_follow_image_size_unless_given() -> None:
    assert VisionOptions(image_size=384).rel_grid_size == 24
    options = VisionOptions(image_size=64, pos_bucket_size=16, rel_bucket_size=8)
    assert (options.grid_size, options.pos_grid_size, options.rel_grid_size) == (4, 16, 8)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"image_size": 250}, "multiple of 16"),
        ({"image_size": 512, "rel_bucket_size": 16}, "32x32 patch grid, larger than"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"train_crop_scale": (0.9, 1.2)}, "train_crop_scale"),
        ({"train_crop_scale": (0.5, 0.4)}, "train_crop_scale"),
        ({"train_crop_ratio": (0.0, 1.0)}, "train_crop_ratio"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"imgae_size": 256}, "imgae_size"),
    ],
)
def test_invalid_options_are_explained(fields: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        VisionOptions(**fields)


def test_as_vision_options_accepts_instances_dicts_and_none() -> None:
    options = VisionOptions(image_size=64)
    assert as_vision_options(options) is options
    assert as_vision_options({"image_size": 64}) == options
    assert as_vision_options(None) == VisionOptions()
    with pytest.raises(TypeError, match="got int"):
        as_vision_options(3)
