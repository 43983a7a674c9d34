"""Whole-word masking: units, counts, never CLS/EOS/padding, joint views, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from peace_text import (
    ByteTokenizer,
    TextMaskingError,
    TextOptions,
    TextPreprocessor,
    WholeWordMasker,
    text_options_for,
)

T, F = True, False


def _padding(tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(len(tokens), 1, dtype=torch.bool), tokens == 1], dim=1)


def _words_batch(word_lengths: list[list[int]]) -> dict[str, torch.Tensor]:
    """One row per sample; each word has the given number of pieces; EOS, then padding."""
    rows, starts = [], []
    for lengths in word_lengths:
        ids = [10 + i for i in range(sum(lengths))] + [2]
        flags = [k == 0 for n in lengths for k in range(n)] + [False]
        rows.append(ids)
        starts.append(flags)
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [1] * (width - len(r)) for r in rows])
    word_start = torch.tensor([s + [False] * (width - len(s)) for s in starts])
    return {"tokens": tokens, "word_start": word_start}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_units_are_word_indices_with_minus_one_elsewhere() -> None:
    batch = {
        "tokens": torch.tensor([[10, 11, 12, 13, 2, 1], [14, 15, 2, 1, 1, 1], [2, 1, 1, 1, 1, 1]]),
        # row 1: the first token is not flagged yet still opens a word
        "word_start": torch.tensor([[T, F, T, T, F, F], [F, T, F, F, F, F], [F] * 6]),
    }
    units = WholeWordMasker().units(batch, _padding(batch["tokens"]))
    assert units.tolist() == [
        [-1, 0, 0, 1, 2, -1, -1],
        [-1, 0, 1, -1, -1, -1, -1],
        [-1] * 7,
    ]


@pytest.mark.parametrize("words", [1, 5, 7, 9, 20, 40])
def test_single_view_hides_ceil_of_the_ratio_in_whole_words(words: int) -> None:
    batch = _words_batch([[1 + (k % 3) for k in range(words)], [2] * 3])
    padding = _padding(batch["tokens"])
    masker = WholeWordMasker(mask_ratio=0.15)
    units = masker.units(batch, padding)
    for seed in range(5):
        mask = masker(batch, padding, generator=_gen(seed))
        assert not mask[:, 0].any() and not (mask & padding).any()
        eos = torch.cat([torch.zeros(2, 1, dtype=torch.bool), batch["tokens"] == 2], dim=1)
        assert not (mask & eos).any()
        for row, count in ((0, words), (1, 3)):
            hidden = set()
            for unit in range(count):
                states = mask[row][units[row] == unit]
                assert states.all() or not states.any(), "a word is partly hidden"
                if states.all():
                    hidden.add(unit)
            assert len(hidden) == math.ceil(count * 0.15)


def test_single_view_count_uses_the_official_float32_product() -> None:
    # torch.tensor(100.) * 0.15 rounds up in float32, so the official recipe hides 16, not 15
    batch = _words_batch([[1] * 100])
    mask = WholeWordMasker(mask_ratio=0.15)(batch, _padding(batch["tokens"]), generator=_gen(0))
    assert int(mask.sum()) == 16


def test_words_are_chosen_uniformly_and_only_by_the_generator() -> None:
    batch = _words_batch([[1, 2, 1, 3, 1, 1, 2, 1, 1, 1]])  # 10 words: one hidden per draw
    padding = _padding(batch["tokens"])
    masker = WholeWordMasker(mask_ratio=0.1)
    units = masker.units(batch, padding)
    counts = torch.zeros(10)
    generator = _gen(123)
    for _ in range(2000):
        mask = masker(batch, padding, generator=generator)
        counts += torch.bincount(units[0][mask[0]].unique(), minlength=10)
    assert counts.sum() == 2000
    assert counts.min() > 140 and counts.max() < 260, counts  # 200 expected per word
    torch.manual_seed(0)
    first = masker(batch, padding, generator=_gen(7))
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(first, masker(batch, padding, generator=_gen(7)))


def test_joint_view_hides_tokens_the_single_view_showed() -> None:
    batch = _words_batch([[3, 2, 1, 1, 2, 1], [1, 1, 1], [2]])
    padding = _padding(batch["tokens"])
    masker = WholeWordMasker(mask_ratio=0.15, joint_mask_ratio=0.4)
    units = masker.units(batch, padding)
    tokens_per_row = (units >= 0).sum(dim=1)
    for seed in range(10):
        single = masker(batch, padding, generator=_gen(seed))
        joint = masker(
            batch, padding, generator=_gen(seed + 100), joint=True, single_view_mask=single
        )
        assert not (joint & single).any()
        assert not (joint & (units < 0)).any()
        visible = ((units >= 0) & ~single).sum(dim=1)
        expected = torch.minimum((tokens_per_row * 0.4).floor().long(), visible)
        assert joint.sum(dim=1).tolist() == expected.tolist()
    # token level: over many draws some word is split between hidden and shown
    split = False
    for seed in range(50):
        single = torch.zeros_like(padding)
        joint = masker(batch, padding, generator=_gen(seed), joint=True, single_view_mask=single)
        split |= bool(joint[0][units[0] == 0].any() and not joint[0][units[0] == 0].all())
    assert split


def test_joint_view_without_single_view_masks_whole_words_at_the_joint_ratio() -> None:
    batch = _words_batch([[2, 1, 3, 1, 1, 2, 1, 1, 2, 1]])
    padding = _padding(batch["tokens"])
    masker = WholeWordMasker(mask_ratio=0.15, joint_mask_ratio=0.4)
    units = masker.units(batch, padding)
    mask = masker(batch, padding, generator=_gen(3), joint=True)
    hidden_words = units[0][mask[0]].unique()
    assert len(hidden_words) == 4
    for unit in hidden_words:
        assert mask[0][units[0] == unit].all()


def test_empty_texts_hide_nothing_and_bad_inputs_are_refused() -> None:
    batch = {"tokens": torch.tensor([[2], [2]]), "word_start": torch.tensor([[F], [F]])}
    padding = _padding(batch["tokens"])
    masker = WholeWordMasker()
    assert not masker(batch, padding, generator=_gen(0)).any()
    assert not masker(batch, padding, generator=_gen(0), joint=True).any()
    with pytest.raises(TextMaskingError, match=r"lacks \['word_start'\]"):
        masker({"tokens": batch["tokens"]}, padding, generator=_gen(0))
    with pytest.raises(TextMaskingError, match="padding_mask"):
        masker(batch, padding[:, :1], generator=_gen(0))
    with pytest.raises(TextMaskingError, match="single_view_mask"):
        masker(batch, padding, generator=_gen(0), joint=True, single_view_mask=padding.long())
    with pytest.raises(ValueError, match="mask_ratio"):
        WholeWordMasker(mask_ratio=1.5)


def test_masker_on_preprocessed_text_never_hides_cls_eos_or_padding() -> None:
    options = text_options_for(ByteTokenizer(max_tokens=40))
    preprocessor = TextPreprocessor(options)
    batch = preprocessor.batch(["a dog runs", "", "two cats on a red sofa!", "日本語 🎉 x"])
    padding = _padding(batch["tokens"])
    masker = WholeWordMasker.from_options(options)
    ids = torch.cat([torch.full((4, 1), -1), batch["tokens"]], dim=1)
    for seed in range(20):
        mask = masker(batch, padding, generator=_gen(seed))
        assert not mask[:, 0].any() and not (mask & padding).any() and not mask[ids == 2].any()
        assert not mask[1].any()  # the empty text is EOS only


def test_from_options_reads_the_ratios() -> None:
    masker = WholeWordMasker.from_options(
        TextOptions(
            vocab_size=260, tokenizer={"kind": "bytes"}, mask_ratio=0.3, joint_mask_ratio=0.5
        )
    )
    assert (masker.mask_ratio, masker.joint_mask_ratio) == (0.3, 0.5)
    assert masker.special_ids == (0, 1, 2)
