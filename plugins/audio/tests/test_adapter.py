"""The audio adapter: official parity, parameter names, init, padding, keep-gathering, errors."""

from __future__ import annotations

import pytest
import torch

from peace_audio.adapter import AudioAdapter, AudioBatchError
from peace_audio.frames import frame_count
from peace_audio.options import AudioOptions
from peace_core.rel_pos import gather_bucket_index, token_bucket_index

# --------------------------------------------------------------------------------- parity


def test_reproduces_the_official_adapter_output(official_adapter, parity_inputs, parity_expected):
    batch = {"waveform": parity_inputs["audio"], "lengths": parity_inputs["audio_lengths"]}
    with torch.no_grad():
        out = official_adapter(batch)
    expected = parity_expected["audio_adapter_out"]
    assert out.tokens.shape == expected.shape == (3, 60, 64)
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=0)
    assert torch.equal(out.padding_mask, parity_inputs["audio_padding_mask"])
    assert torch.equal(out.padding_mask, parity_expected["audio_padding_mask"])
    assert torch.equal(out.rel_pos.index, token_bucket_index(60, 32))
    assert [t.weight.shape for t in out.rel_pos.tables] == [(66, 4)]


def test_parameter_names_are_the_fixed_ones(tiny_adapter):
    names = set(tiny_adapter().state_dict())
    layers = len(tiny_adapter().feature_layers)
    expected = {"cls_token", "cls_pos", "rel_pos_tables.0.weight"}
    expected |= {f"feature_extractor.layers.{i}.conv.weight" for i in range(layers)}
    expected |= {
        f"feature_extractor.layers.{i}.norm.{p}" for i in range(layers) for p in ("weight", "bias")
    }
    expected |= {
        "feature_norm.weight",
        "feature_norm.bias",
        "feature_proj.weight",
        "feature_proj.bias",
    }
    expected |= {f"conv_pos.layers.{i}.conv.{p}" for i in range(2) for p in ("weight", "bias")}
    assert names == expected  # no mask_embedding, no parameters in the conv-position LayerNorms


def test_official_shapes_with_default_options():
    adapter = AudioAdapter(1536, 24, AudioOptions(), device="meta")
    shapes = {name: tuple(p.shape) for name, p in adapter.named_parameters()}
    assert shapes["feature_extractor.layers.0.conv.weight"] == (512, 1, 10)
    assert shapes["feature_extractor.layers.1.conv.weight"] == (512, 512, 3)
    assert shapes["feature_extractor.layers.6.conv.weight"] == (512, 512, 2)
    assert shapes["feature_proj.weight"] == (1536, 512)
    assert shapes["conv_pos.layers.4.conv.weight"] == (1536, 96, 19)
    assert shapes["cls_token"] == shapes["cls_pos"] == (1, 1, 1536)
    assert shapes["rel_pos_tables.0.weight"] == (1026, 24)
    assert "conv_pos.layers.5.conv.weight" not in shapes


# --------------------------------------------------------------------------------- init & build


def test_initialisation_follows_the_spec(tiny_options):
    torch.manual_seed(0)
    layers = [(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2
    adapter = AudioAdapter(64, 4, tiny_options(feature_layers=layers))
    for table in adapter.rel_pos_tables:
        assert torch.count_nonzero(table.weight) == 0
    for param in (adapter.cls_token, adapter.cls_pos, adapter.feature_proj.weight):
        assert param.abs().max() <= 0.02 and param.std() > 0.005
    assert torch.count_nonzero(adapter.feature_proj.bias) == 0
    conv = adapter.feature_extractor.layers[1].conv.weight  # kaiming normal: std sqrt(2 / fan_in)
    assert conv.std().item() == pytest.approx((2 / (64 * 3)) ** 0.5, rel=0.1)
    for norm in (adapter.feature_norm, adapter.feature_extractor.layers[0].norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.count_nonzero(norm.bias) == 0
    for layer in adapter.conv_pos.layers:
        assert layer.norm.weight is None and layer.norm.bias is None


def test_builds_on_meta_with_one_table_per_layer(tiny_options):
    adapter = AudioAdapter(32, 4, tiny_options(), num_bias_tables=3, device="meta")
    assert all(t.is_meta for t in adapter.state_dict().values())
    assert len(adapter.rel_pos_tables) == 3
    adapter.to_empty(device="cpu")
    adapter.reset_parameters()
    assert torch.count_nonzero(adapter.rel_pos_tables[2].weight) == 0
    assert adapter.cls_token.abs().max() <= 0.02


def test_dim_must_be_divisible_by_the_conv_groups(tiny_options):
    with pytest.raises(ValueError, match="conv_pos_groups 4"):
        AudioAdapter(18, 2, tiny_options())


# --------------------------------------------------------------------------------- padding


def test_padding_mask_from_lengths(tiny_adapter):
    adapter = tiny_adapter()
    lengths = torch.tensor([16000, 5000, 400, 9999])
    batch = {"waveform": torch.randn(4, 16000), "lengths": lengths}
    with torch.no_grad():
        out = adapter(batch)
    total = frame_count(16000, adapter.feature_layers)
    assert out.tokens.shape == (4, 1 + total, 16)
    assert not out.padding_mask[:, 0].any()
    valid = (~out.padding_mask[:, 1:]).sum(dim=1)
    assert valid.tolist() == [frame_count(int(n), adapter.feature_layers) for n in lengths]
    # padding is a suffix: frames are valid up to each clip's count, padding after
    assert torch.equal(out.padding_mask[:, 1:], torch.arange(total) >= valid[:, None])


def _clip_batched_and_alone(adapter: AudioAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    clip = torch.randn(9000)
    batch = {"waveform": torch.zeros(2, 16000), "lengths": torch.tensor([9000, 16000])}
    batch["waveform"][0, :9000] = clip
    batch["waveform"][1] = torch.randn(16000)
    with torch.no_grad():
        batched = adapter(batch).tokens[0]
        alone = adapter({"waveform": clip[None], "lengths": torch.tensor([9000])}).tokens[0]
    return batched, alone


def test_batched_and_alone_agree_when_padding_is_zeroed(tiny_adapter):
    batched, alone = _clip_batched_and_alone(tiny_adapter())
    torch.testing.assert_close(batched[: alone.shape[0]], alone)


def test_official_conv_positions_see_padding_near_the_end(tiny_adapter):
    # conv_pos_sees_padding (the official behaviour): only the last valid frames, within the
    # positional receptive field, change with batching.
    adapter = tiny_adapter(conv_pos_sees_padding=True)
    batched, alone = _clip_batched_and_alone(adapter)
    frames = alone.shape[0] - 1
    reach = adapter.conv_pos.layers[0].conv.kernel_size[0] // 2 * len(adapter.conv_pos.layers)
    torch.testing.assert_close(batched[: 1 + frames - reach], alone[: 1 + frames - reach])
    assert not torch.allclose(batched[1 + frames - reach : 1 + frames], alone[1 + frames - reach :])


@pytest.mark.parametrize("sees_padding", [False, True])
def test_padding_sends_no_gradient_into_the_feature_extractor(tiny_adapter, sees_padding):
    adapter = tiny_adapter(conv_pos_sees_padding=sees_padding).train()
    generator = torch.Generator().manual_seed(0)
    waveform = torch.randn(2, 16000, generator=generator)

    def extractor_grad(lengths: list[int]) -> float:
        adapter.zero_grad()
        wave = waveform.clone()
        for row, length in enumerate(lengths):
            wave[row, length:] = 0.0
        out = adapter({"waveform": wave, "lengths": torch.tensor(lengths)})
        valid = ~out.padding_mask
        (out.tokens * valid[..., None]).square().sum().backward()
        return max(p.grad.abs().max().item() for p in adapter.feature_extractor.parameters())

    full = extractor_grad([16000, 16000])
    padded = extractor_grad([16000, 4000])
    if sees_padding:  # the official way: zero-variance LayerNorm inputs blow gradients up
        assert padded > 100 * full
    else:
        assert padded < 10 * full


# --------------------------------------------------------------------------------- keep


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "waveform": torch.randn(3, 12000, generator=generator),
        "lengths": torch.tensor([12000, 7000, 3000]),
    }


def test_keeping_every_position_changes_nothing(tiny_adapter):
    adapter, batch = tiny_adapter(), _batch()
    with torch.no_grad():
        full = adapter(batch)
        tokens = full.tokens.shape[1]
        kept = adapter(batch, keep=torch.arange(tokens).expand(3, tokens))
    torch.testing.assert_close(kept.tokens, full.tokens)
    assert torch.equal(kept.padding_mask, full.padding_mask)
    assert torch.equal(kept.rel_pos.index, full.rel_pos.index.expand(3, tokens, tokens))


@pytest.mark.parametrize("sees_padding", [False, True])
def test_keep_gathers_then_runs_conv_positions_on_the_compacted_frames(tiny_adapter, sees_padding):
    adapter, batch = tiny_adapter(conv_pos_sees_padding=sees_padding), _batch()
    keep = torch.tensor(
        [
            [0, 1, 4, 5, 9, 20, 36],
            [0, 2, 3, 17, -1, -1, -1],
            [0, -1, -1, -1, -1, -1, -1],
        ]
    )
    with torch.no_grad():
        full = adapter(batch)
        out = adapter(batch, keep=keep)
        features = adapter.feature_proj(
            adapter.feature_norm(adapter.feature_extractor(batch["waveform"]))
        )
        cls = (adapter.cls_token + adapter.cls_pos)[0, 0]
        for row in range(3):
            frames = keep[row][keep[row] >= 1]
            assert torch.allclose(out.tokens[row, 0], cls)
            if len(frames):
                gathered = features[row, frames - 1]
                longest = int((keep >= 1).sum(dim=1).max())
                padded = torch.zeros(longest, gathered.shape[1])
                padded[: len(frames)] = gathered
                # Zeroed padding: each row's compacted frames as if alone; otherwise the convs
                # read the batch's empty slots (zeros at the input, not between layers).
                seen = padded[None] if sees_padding else gathered[None]
                expected = gathered + adapter.conv_pos(seen)[0, : len(frames)]
                torch.testing.assert_close(out.tokens[row, 1 : 1 + len(frames)], expected)
    assert torch.equal(out.padding_mask, keep < 0)
    assert torch.equal(out.rel_pos.index, gather_bucket_index(full.rel_pos.index, keep))
    assert out.rel_pos.index[0, 2, 1] == full.rel_pos.index[4, 1]  # original distances stay
    # Conv positions see the compacted sequence, not the full one: kept tokens differ from the
    # full-sequence tokens at the same positions.
    assert not torch.allclose(out.tokens[0, 1:], full.tokens[0, keep[0, 1:]])


def test_keep_marks_kept_padding_frames_as_padding(tiny_adapter):
    adapter, batch = tiny_adapter(), _batch()
    with torch.no_grad():
        full = adapter(batch)
        last = full.tokens.shape[1] - 1
        out = adapter(batch, keep=torch.tensor([[0, last], [0, last], [0, 1]]))
    assert out.padding_mask.tolist() == [[False, False], [False, True], [False, False]]


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (torch.tensor([[0, 1]]), r"\[3,K\]"),
        (torch.zeros(3, 2), "integer positions"),
        (torch.tensor([[0, -2]] * 3), r"outside \[-1, "),
        (torch.tensor([[0, 10_000]] * 3), r"outside \[-1, "),
    ],
)
def test_bad_keep_is_an_error(tiny_adapter, keep, message):
    with pytest.raises(AudioBatchError, match=message):
        tiny_adapter()(_batch(), keep=keep)


# --------------------------------------------------------------------------------- bad batches


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"waveform": torch.randn(2, 4000)}, r"missing \['lengths'\]"),
        ({"waveform": torch.randn(4000), "lengths": torch.tensor([4000])}, r"\[B,S\] tensor"),
        (
            {"waveform": torch.ones(1, 4000, dtype=torch.long), "lengths": torch.tensor([4000])},
            "float",
        ),
        ({"waveform": torch.randn(2, 4000), "lengths": torch.tensor([4000.0, 10.0])}, "integer"),
        ({"waveform": torch.randn(2, 4000), "lengths": torch.tensor([4000])}, r"\[2\] integer"),
        ({"waveform": torch.randn(2, 4000), "lengths": torch.tensor([4001, 4000])}, "at most"),
        (
            {"waveform": torch.randn(2, 4000), "lengths": torch.tensor([399, 4000])},
            "receptive field",
        ),
    ],
)
def test_bad_batches_are_errors(tiny_adapter, batch, message):
    with pytest.raises(AudioBatchError, match=message):
        tiny_adapter()(batch)


def test_waveform_is_cast_to_the_adapter_dtype(tiny_adapter):
    adapter = tiny_adapter()
    wave = torch.randn(1, 5000, dtype=torch.float64)
    with torch.no_grad():
        out64 = adapter({"waveform": wave, "lengths": torch.tensor([5000])})
        out32 = adapter({"waveform": wave.float(), "lengths": torch.tensor([5000])})
    assert out64.tokens.dtype == torch.float32
    torch.testing.assert_close(out64.tokens, out32.tokens)
