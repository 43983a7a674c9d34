"""Audio block masks (data2vec 2.0 1-D recipe): exact counts, blocks, CLS/padding, determinism."""

from __future__ import annotations

import pytest
import torch

from peace_audio.masking import AudioBlockMasker, block_mask_1d
from peace_audio.options import AudioOptions


def _padding(valid_frames: list[int], width: int) -> torch.Tensor:
    """``[B, 1+width]`` padding mask: CLS, then each row's valid frames, then padding."""
    positions = torch.arange(1 + width)
    return positions[None, :] > torch.tensor(valid_frames)[:, None]


def _runs(mask: torch.Tensor) -> list[int]:
    runs, current = [], 0
    for hidden in [*mask.tolist(), False]:
        if hidden:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@pytest.mark.parametrize("frames", [0, 1, 2, 4, 5, 7, 49, 100, 333, 749])
@pytest.mark.parametrize("ratio", [0.55, 0.45, 0.1, 0.9])
def test_block_mask_hits_the_official_count(frames, ratio):
    generator = torch.Generator().manual_seed(frames)
    mask = block_mask_1d(frames, ratio, span=5, prob_adjust=0.1, generator=generator)
    assert mask.dtype == torch.bool and mask.shape == (frames,)
    assert int(mask.sum()) == int(frames * ratio)


def test_block_mask_hides_blocks_not_scattered_frames():
    generator = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(20):
        mask = block_mask_1d(500, 0.55, span=5, prob_adjust=0.1, generator=generator)
        lengths += _runs(mask)
    # Scattered frames at 55 % give runs of ~2.2 on average; blocks of 5 that merge give more.
    assert sum(lengths) / len(lengths) > 4.0
    span_one = block_mask_1d(500, 0.55, span=1, prob_adjust=0.1, generator=generator)
    assert sum(_runs(span_one)) / len(_runs(span_one)) < 3.5


def test_masker_never_hides_cls_or_padding_and_counts_per_clip():
    options = AudioOptions()
    masker = AudioBlockMasker(options)
    valid = [49, 20, 3, 0, 60]
    padding = _padding(valid, 60)
    for joint, ratio in ((False, options.mask_ratio), (True, options.joint_mask_ratio)):
        mask = masker({}, padding, generator=torch.Generator().manual_seed(1), joint=joint)
        assert mask.dtype == torch.bool and mask.shape == padding.shape
        assert not mask[:, 0].any()
        assert not (mask & padding).any()
        assert mask.sum(dim=1).tolist() == [int(ratio * t) for t in valid]


def test_units_are_frame_numbers():
    masker = AudioBlockMasker(AudioOptions())
    units = masker.units({}, _padding([3, 1], 4))
    assert units.tolist() == [[-1, 0, 1, 2, -1], [-1, 0, -1, -1, -1]]
    assert units.dtype == torch.long


def test_deterministic_for_a_generator_and_independent_of_global_rng():
    masker = AudioBlockMasker(AudioOptions())
    padding = _padding([49, 40], 49)
    state = torch.get_rng_state()
    first = masker({}, padding, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state), "the masker drew from the global RNG"
    torch.manual_seed(123)  # a different global state must not matter
    again = masker({}, padding, generator=torch.Generator().manual_seed(7))
    other = masker({}, padding, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_joint_view_is_drawn_independently_of_the_single_view():
    options = AudioOptions(mask_ratio=0.5, joint_mask_ratio=0.3)
    masker = AudioBlockMasker(options)
    padding = _padding([100], 100)
    single = masker({}, padding, generator=torch.Generator().manual_seed(0))
    joint = masker(
        {}, padding, generator=torch.Generator().manual_seed(1), joint=True, single_view_mask=single
    )
    without = masker({}, padding, generator=torch.Generator().manual_seed(1), joint=True)
    assert torch.equal(joint, without)
    assert int(single.sum()) == 50 and int(joint.sum()) == 30
    assert (joint & single).any()  # not restricted to what the single view showed


def test_padding_mask_must_be_a_bool_matrix():
    masker = AudioBlockMasker(AudioOptions())
    with pytest.raises(ValueError, match="bool"):
        masker.units({}, torch.zeros(2, 5, dtype=torch.long))
