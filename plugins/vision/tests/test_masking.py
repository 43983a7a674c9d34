"""VisionMasker: uniform single view, complementary joint view, determinism."""

from __future__ import annotations

import pytest
import torch

from peace_registry.contract import BuildContext
from peace_vision.masking import VisionMasker, build_vision_masker
from peace_vision.options import VisionOptions

BATCH = {"pixels": torch.zeros(3, 3, 256, 256)}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def no_padding(size: int = 3, length: int = 257) -> torch.Tensor:
    return torch.zeros(size, length, dtype=torch.bool)


def test_units_are_patch_indices_with_cls_and_padding_excluded() -> None:
    padding = no_padding(2, 5)
    padding[1, 3:] = True
    units = VisionMasker(VisionOptions()).units(BATCH, padding)
    assert units.dtype == torch.long
    assert units.tolist() == [[-1, 0, 1, 2, 3], [-1, 0, 1, -1, -1]]


def test_single_view_hides_exactly_three_quarters_uniformly() -> None:
    masker = VisionMasker(VisionOptions())
    mask = masker(BATCH, no_padding(), generator=generator(0))
    assert mask.dtype == torch.bool and mask.shape == (3, 257)
    assert mask.sum(dim=1).tolist() == [192, 192, 192]
    assert not mask[:, 0].any()
    assert not torch.equal(mask[0], mask[1])  # each sample draws its own patches
    # uniform: over many draws every patch is hidden about 75% of the time
    draws = masker(
        {"pixels": torch.zeros(400, 3, 64, 64)}, no_padding(400, 17), generator=generator(1)
    )
    rate = draws[:, 1:].float().mean(dim=0)
    assert (rate - 0.75).abs().max() < 0.1


def test_single_view_is_deterministic_per_generator() -> None:
    masker = VisionMasker(VisionOptions())
    first = masker(BATCH, no_padding(), generator=generator(5))
    assert torch.equal(first, masker(BATCH, no_padding(), generator=generator(5)))
    assert not torch.equal(first, masker(BATCH, no_padding(), generator=generator(6)))


def test_padding_is_never_hidden_and_counts_follow_valid_patches() -> None:
    padding = no_padding(2, 17)
    padding[1, 9:] = True  # 8 valid patches
    mask = VisionMasker(VisionOptions(mask_ratio=0.5))(BATCH, padding, generator=generator(0))
    assert not (mask & padding).any()
    assert mask.sum(dim=1).tolist() == [8, 4]


def test_joint_view_keeps_only_patches_the_single_view_hid() -> None:
    masker = VisionMasker(VisionOptions())
    single = masker(BATCH, no_padding(), generator=generator(0))
    before = single.clone()
    joint = masker(BATCH, no_padding(), generator=generator(1), joint=True, single_view_mask=single)
    assert torch.equal(single, before)
    visible = ~joint
    visible[:, 0] = False
    assert visible.sum(dim=1).tolist() == [80, 80, 80]  # round(0.3125 * 256)
    assert joint.sum(dim=1).tolist() == [176, 176, 176]
    assert not (visible & ~single).any()  # the two views' visible sets are disjoint
    assert not joint[:, 0].any()


def test_joint_view_without_single_view_is_uniform() -> None:
    masker = VisionMasker(VisionOptions())
    joint = masker(BATCH, no_padding(), generator=generator(2), joint=True)
    assert joint.sum(dim=1).tolist() == [176, 176, 176]
    assert not joint[:, 0].any()


def test_joint_view_tops_up_when_single_view_hid_too_few() -> None:
    # single view hides 2 of 16 patches; the joint view keeps round(0.5 * 16) = 8
    masker = VisionMasker(VisionOptions(image_size=64, joint_mask_ratio=0.5))
    single = no_padding(1, 17)
    single[0, [3, 9]] = True
    joint = masker(
        {"pixels": torch.zeros(1, 3, 64, 64)},
        no_padding(1, 17),
        generator=generator(0),
        joint=True,
        single_view_mask=single,
    )
    assert joint.sum() == 8
    assert not joint[0, 3] and not joint[0, 9]  # those hidden in the single view are kept first


def test_bad_masks_are_rejected() -> None:
    masker = VisionMasker(VisionOptions())
    with pytest.raises(ValueError, match="padding_mask"):
        masker(BATCH, torch.zeros(3, 257), generator=generator(0))
    with pytest.raises(ValueError, match="single_view_mask"):
        masker(
            BATCH,
            no_padding(),
            generator=generator(0),
            joint=True,
            single_view_mask=no_padding(3, 17),
        )


def test_build_reads_the_context_options() -> None:
    ctx = BuildContext("vision", 32, 4, 2, 64, 1, VisionOptions(mask_ratio=0.25))
    masker = build_vision_masker(ctx)
    assert masker(BATCH, no_padding(), generator=generator(0)).sum(dim=1).tolist() == [64] * 3
