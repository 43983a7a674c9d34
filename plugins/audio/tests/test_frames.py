"""Frame arithmetic, 1-D relative-position buckets and the 1024-token limit."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from peace_audio.adapter import AudioAdapter, AudioBatchError, FeatureExtractor
from peace_audio.frames import (
    OFFICIAL_FEATURE_LAYERS,
    frame_count,
    max_samples_for_frames,
    min_samples_for_frames,
    receptive_field,
)
from peace_audio.options import MAX_AUDIO_TOKENS, AudioOptions
from peace_core.rel_pos import MAX_TOKEN_POSITIONS, token_bucket_index, token_bucket_rows


def test_official_frame_counts_from_the_spec():
    # spec §1.2: 1 s -> 49, 15 s -> 749, 20 s -> 999 frames; the fixture clips give 52, 59, 49.
    counts = [frame_count(s, OFFICIAL_FEATURE_LAYERS) for s in (16000, 240000, 320000)]
    assert counts == [49, 749, 999]
    assert [frame_count(s, OFFICIAL_FEATURE_LAYERS) for s in (16800, 19200)] == [52, 59]
    assert receptive_field(OFFICIAL_FEATURE_LAYERS) == 400


@pytest.mark.parametrize(
    "layers",
    [
        [(4, k, s) for _, k, s in OFFICIAL_FEATURE_LAYERS],
        [(3, 7, 3), (5, 4, 2), (2, 3, 1)],
    ],
)
def test_closed_form_matches_the_conv_stack(layers):
    extractor = FeatureExtractor(layers, eps=1e-5)
    lengths = sorted({*range(receptive_field(layers), 3000, 89), 16000, 16001, 16319, 16320})
    with torch.no_grad():
        for length in lengths:
            produced = extractor(torch.randn(1, length)).shape[1]
            assert frame_count(length, layers) == produced, length


def test_closed_form_on_tensors_and_short_clips():
    lengths = torch.tensor([0, 399, 400, 719, 720, 16000, 320000])
    counts = frame_count(lengths, OFFICIAL_FEATURE_LAYERS)
    assert counts.tolist() == [frame_count(int(n), OFFICIAL_FEATURE_LAYERS) for n in lengths]
    assert counts.tolist()[:4] == [0, 0, 1, 1]
    assert counts[4] == 2


@pytest.mark.parametrize("frames", [1, 2, 49, 500, 1023])
def test_sample_bounds_invert_the_closed_form(frames):
    shortest = min_samples_for_frames(frames, OFFICIAL_FEATURE_LAYERS)
    assert frame_count(shortest, OFFICIAL_FEATURE_LAYERS) == frames
    assert frame_count(shortest - 1, OFFICIAL_FEATURE_LAYERS) == frames - 1
    longest = max_samples_for_frames(frames, OFFICIAL_FEATURE_LAYERS)
    assert frame_count(longest, OFFICIAL_FEATURE_LAYERS) == frames
    assert frame_count(longest + 1, OFFICIAL_FEATURE_LAYERS) == frames + 1


def test_audio_bucket_facts_for_bucket_512():
    # spec §2.3, 1-D buckets with bucket_size 512 (mid 256), table of 2*512-1+3 = 1026 rows.
    assert token_bucket_rows(512) == 1026
    assert MAX_AUDIO_TOKENS == MAX_TOKEN_POSITIONS == 1024
    index = token_bucket_index(1024, 512)
    # distance d = i - j: index = d + 511 up to |d| = 256, then log-spaced up to 1022.
    assert index[300, 300] == 511
    assert index[301, 300] == 512 and index[300, 301] == 510
    assert index[556, 300] == 767  # d = 256, still linear
    assert index[557, 300] == 768  # d = 257, first log bucket: 256 + ceil(0.72)
    # d = ±1022, the farthest frames: the last buckets 2*512-2 = 1022 and 0
    assert index[1023, 1] == 1022 and index[1, 1023] == 0
    assert int(index[1:, 1:].max()) == 1022 and int(index[1:, 1:].min()) == 0
    # CLS buckets: row 0 (CLS query) 1023, column 0 (CLS key) 1024, CLS-CLS 1025.
    assert (index[0, 1:] == 1023).all() and (index[1:, 0] == 1024).all() and index[0, 0] == 1025
    assert int(index.max()) < token_bucket_rows(512)


def test_adapter_index_is_the_top_left_of_the_official_matrix(tiny_adapter):
    adapter = tiny_adapter(bucket_size=512)
    out = adapter({"waveform": torch.randn(1, 8000), "lengths": torch.tensor([8000])})
    tokens = out.tokens.shape[1]
    assert tokens == 1 + frame_count(8000, adapter.feature_layers)
    assert torch.equal(out.rel_pos.index, token_bucket_index(1024, 512)[:tokens, :tokens])


def test_token_limit_error_names_the_duration(tiny_adapter):
    adapter = tiny_adapter()
    limit = max_samples_for_frames(MAX_AUDIO_TOKENS - 1, adapter.feature_layers)
    assert limit == 327_759  # 20.48 s at 16 kHz with the official strides
    with torch.no_grad():
        fits = adapter({"waveform": torch.randn(1, limit), "lengths": torch.tensor([limit])})
        assert fits.tokens.shape[1] == MAX_AUDIO_TOKENS
        too_long = {"waveform": torch.randn(1, limit + 1), "lengths": torch.tensor([limit + 1])}
        with pytest.raises(AudioBatchError, match=r"1025 tokens.*20\.4849 s.*max_duration"):
            adapter(too_long)


def test_options_reject_a_max_duration_beyond_the_token_limit():
    assert AudioOptions(max_duration=20.0).max_samples == 320_000  # the official 20 s config
    with pytest.raises(ValidationError, match=r"max_duration <= 20\.4849 s"):
        AudioOptions(max_duration=30.0)
    with pytest.raises(ValidationError, match="receptive field"):
        AudioOptions(max_duration=0.01, min_duration=0.0)


def test_adapter_is_an_audio_adapter_of_the_frames_module(tiny_adapter):
    # frame_counts of the adapter is the closed form applied to its own layers
    adapter = tiny_adapter()
    assert isinstance(adapter, AudioAdapter)
    lengths = torch.tensor([400, 16000, 16800])
    assert adapter.frame_counts(lengths).tolist() == [1, 49, 52]
