"""The text adapter: official parity, positions, relative buckets, keep, initialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peace_core.rel_pos import token_bucket_index, token_bucket_rows
from peace_registry.contract import BuildContext
from peace_text import TextAdapter, TextBatchError, TextOptions
from peace_text.adapter import EMBEDDED_KEY

OFFICIAL_PREFIX = "encoder_wrapper.text_adapter."
#: official key -> our parameter name (the mapping lives in the test only)
OFFICIAL_KEYS = {
    "embed_tokens.weight": "token_embed.weight",
    "cls_embedding": "cls_token",
    "embed_positions.weight": "pos_embed.weight",
    "rel_pos_table_list.0.weight": "rel_pos_tables.0.weight",
}


def _batch(ids: list[list[int]], pad: int = 1) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in ids)
    return {"tokens": torch.tensor([row + [pad] * (width - len(row)) for row in ids])}


def test_reproduces_the_official_adapter_output(parity_dir: Path) -> None:
    state = torch.load(parity_dir / "checkpoint.pt", weights_only=True)["model"]
    inputs = torch.load(parity_dir / "inputs.pt", weights_only=True)
    expected = torch.load(parity_dir / "expected.pt", weights_only=True)
    # fixture sizes (config.json): dim 64, 4 heads, vocab 1000, bucket 16, 514 positions
    adapter = TextAdapter(64, 4, vocab_size=1000, bucket_size=16, max_positions=514).eval()
    adapter.load_state_dict({ours: state[OFFICIAL_PREFIX + k] for k, ours in OFFICIAL_KEYS.items()})
    with torch.no_grad():
        out = adapter({"tokens": inputs["text_tokens"]})
    torch.testing.assert_close(out.tokens, expected["text_adapter_out"], rtol=0, atol=1e-5)
    assert torch.equal(out.padding_mask, expected["text_padding_mask"])
    assert out.rel_pos.tables[0].num_embeddings == 34


def test_output_is_cls_then_tokens_plus_positions() -> None:
    adapter = TextAdapter(16, 2, vocab_size=50, bucket_size=8, max_positions=20)
    batch = _batch([[7, 8, 9, 2], [5, 2]])
    out = adapter(batch)
    assert out.tokens.shape == (2, 5, 16)
    positions = adapter.pos_embed.weight[:5]
    torch.testing.assert_close(
        out.tokens[:, 0], (adapter.cls_token[0, 0] + positions[0]).expand(2, -1)
    )
    torch.testing.assert_close(
        out.tokens[0, 1:], adapter.token_embed.weight[[7, 8, 9, 2]] + positions[1:]
    )
    assert out.padding_mask.tolist() == [[False] * 5, [False, False, False, True, True]]
    assert torch.equal(out.rel_pos.index, token_bucket_index(5, 8))
    assert len(out.rel_pos.tables) == 1 and out.rel_pos.tables[0] is adapter.rel_pos_tables[0]


def test_bucket_facts_of_the_official_text_adapter() -> None:
    """Spec §2.3 with bucket 256: d = i - j between non-CLS positions i, j."""
    assert token_bucket_rows(256) == 514
    assert TextAdapter(8, 2, vocab_size=10).rel_pos_tables[0].num_embeddings == 514
    index = token_bucket_index(1024, 256)
    start = 1  # position 0 is CLS, which has buckets of its own
    for distance, bucket in {0: 255, 1: 256, 128: 383, 129: 384, 200: 411, -1: 254}.items():
        i, j = (start + distance, start) if distance >= 0 else (start, start - distance)
        assert int(index[i, j]) == bucket, distance
    # The spec's d = -1023 -> 0 needs i = 0, the CLS row; the farthest reachable key, -1022,
    # already lands in bucket 0, and +1022 in the last distance bucket 510.
    assert int(index[1, 1023]) == 0 and int(index[1023, 1]) == 510
    assert (int(index[0, 5]), int(index[5, 0]), int(index[0, 0])) == (511, 512, 513)


def test_too_long_or_bad_batches_are_refused_clearly() -> None:
    adapter = TextAdapter(8, 2, vocab_size=10, max_positions=6, bucket_size=4)
    adapter(_batch([[3] * 5]))  # 5 tokens + CLS = 6 positions: fits
    with pytest.raises(TextBatchError, match=r"needs 7 positions.*max_positions"):
        adapter(_batch([[3] * 6]))
    with pytest.raises(TextBatchError, match=r"ids 0\.\.10, outside the vocabulary 0\.\.9"):
        adapter(_batch([[0, 10]]))
    with pytest.raises(TextBatchError, match="integer ids"):
        adapter({"tokens": torch.ones(1, 3)})
    with pytest.raises(TextBatchError, match="lacks 'tokens'"):
        adapter({"ids": torch.ones(1, 3, dtype=torch.long)})
    with pytest.raises(TextBatchError, match=r"\[B, L\]"):
        adapter({"tokens": torch.ones(3, dtype=torch.long)})


def test_keep_gathers_embeddings_positions_and_relative_indices() -> None:
    adapter = TextAdapter(16, 2, vocab_size=50, bucket_size=4)
    batch = _batch([[7, 8, 9, 10, 11, 2], [5, 6, 2]])
    full = adapter(batch)
    keep = torch.tensor([[0, 2, 5, 6], [0, 3, 5, -1]])  # row 1 keeps a padded position (5)
    out = adapter(batch, keep=keep)
    assert out.tokens.shape == (2, 4, 16)
    torch.testing.assert_close(out.tokens[0], full.tokens[0, [0, 2, 5, 6]])
    torch.testing.assert_close(out.tokens[1, :2], full.tokens[1, [0, 3]])
    assert out.padding_mask.tolist() == [[False] * 4, [False, False, True, True]]
    assert out.rel_pos.index.shape == (2, 4, 4)
    assert torch.equal(out.rel_pos.index[0], full.rel_pos.index[[0, 2, 5, 6]][:, [0, 2, 5, 6]])
    with pytest.raises(TextBatchError, match="keep holds position 7"):
        adapter(batch, keep=torch.tensor([[0, 7], [0, 1]]))
    with pytest.raises(TextBatchError, match="keep must be"):
        adapter(batch, keep=torch.tensor([0, 1]))


def test_precomputed_embeddings_are_used_and_checked() -> None:
    adapter = TextAdapter(16, 2, vocab_size=50, bucket_size=4)
    batch = _batch([[7, 8, 9, 2], [5, 6, 2]])
    shared = adapter.precompute(batch)
    assert shared[EMBEDDED_KEY].shape == (2, 5, 16)
    keep = torch.tensor([[0, 2, 4], [0, 1, -1]])
    for view in (None, keep):
        torch.testing.assert_close(
            adapter(shared, keep=view).tokens, adapter(batch, keep=view).tokens
        )
    # What forward reads is the precomputed value, not a fresh lookup.
    marked = {**shared, EMBEDDED_KEY: torch.zeros(2, 5, 16)}
    assert adapter(marked).tokens.abs().sum() == 0
    with pytest.raises(
        TextBatchError, match=r"'embedded' must be .*shape \[2, 5, 16\]; got \(2, 4, 16\)"
    ):
        adapter({**batch, EMBEDDED_KEY: torch.zeros(2, 4, 16)})


def test_initialisation_follows_the_official_recipe() -> None:
    torch.manual_seed(0)
    adapter = TextAdapter(64, 4, vocab_size=500, pad_id=1, num_bias_tables=3)
    for weight in (adapter.token_embed.weight, adapter.pos_embed.weight, adapter.cls_token):
        assert weight.abs().max() <= 0.02 and weight.std() > 0.008
    assert adapter.token_embed.weight[1].abs().sum() == 0
    assert len(adapter.rel_pos_tables) == 3
    assert all(t.weight.abs().sum() == 0 for t in adapter.rel_pos_tables)
    assert len({id(t.weight) for t in adapter.rel_pos_tables}) == 3


def test_pad_row_gets_no_gradient() -> None:
    adapter = TextAdapter(8, 2, vocab_size=20)
    adapter(_batch([[4, 5, 2], [4, 2]])).tokens.sum().backward()
    grad = adapter.token_embed.weight.grad
    assert grad[1].abs().sum() == 0 and grad[4].abs().sum() > 0


def test_builds_from_a_context_on_the_meta_device() -> None:
    ctx = BuildContext(
        modality="text",
        dim=1536,
        heads=24,
        depth=40,
        ffn_dim=6144,
        num_bias_tables=40,
        options=TextOptions(),
        device="meta",
    )
    adapter = TextAdapter.from_context(ctx)
    assert all(p.is_meta for p in adapter.parameters())
    assert adapter.token_embed.weight.shape == (50264, 1536)
    assert adapter.pos_embed.weight.shape == (514, 1536)
    assert adapter.cls_token.shape == (1, 1, 1536)
    assert [t.weight.shape for t in adapter.rel_pos_tables] == [(514, 24)] * 40
    out = adapter({"tokens": torch.ones(2, 7, dtype=torch.long, device="meta")})
    assert out.tokens.shape == (2, 8, 1536) and out.tokens.is_meta
