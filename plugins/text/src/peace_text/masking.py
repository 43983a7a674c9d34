"""Whole-word masking for the text denoising views (spec §3.4).

Positions are those of the adapter's sequence: 0 is CLS, ``1..L`` are the batch's tokens. A word is
a word-start token and the non-start pieces after it; CLS, EOS and padding are never hidden.

* text-only view: ``ceil(mask_ratio * #words)`` words, chosen uniformly, all their pieces hidden;
* joint view given the text-only view's mask (vision-text): ``int(joint_mask_ratio * #tokens)``
  single tokens chosen among those the text-only view left visible;
* joint view without it (audio-text): whole words at ``joint_mask_ratio``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from peace_text.options import TextOptions


class TextMaskingError(ValueError):
    """The batch or masks given to the text masker do not fit together."""


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row (0 = smallest)."""
    return scores.argsort(dim=1).argsort(dim=1)


class WholeWordMasker:
    """The text modality's :class:`~peace_registry.contract.Masker`."""

    def __init__(
        self,
        *,
        mask_ratio: float = 0.15,
        joint_mask_ratio: float = 0.4,
        special_ids: tuple[int, ...] = (0, 1, 2),
    ) -> None:
        for name, ratio in (("mask_ratio", mask_ratio), ("joint_mask_ratio", joint_mask_ratio)):
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {ratio}")
        self.mask_ratio = mask_ratio
        self.joint_mask_ratio = joint_mask_ratio
        #: Ids that are never hidden (BOS, padding, EOS).
        self.special_ids = tuple(special_ids)

    @classmethod
    def from_options(cls, options: TextOptions) -> WholeWordMasker:
        return cls(
            mask_ratio=options.mask_ratio,
            joint_mask_ratio=options.joint_mask_ratio,
            special_ids=(options.bos_id, options.pad_id, options.eos_id),
        )

    def _inputs(
        self, batch: Mapping[str, torch.Tensor], padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [key for key in ("tokens", "word_start") if key not in batch]
        if missing:
            raise TextMaskingError(
                f"text batch lacks {missing} (has {sorted(batch)}); whole-word masking needs the "
                "preprocessor's 'tokens' and 'word_start'"
            )
        ids, starts = batch["tokens"], batch["word_start"]
        if ids.ndim != 2 or starts.shape != ids.shape:
            raise TextMaskingError(
                f"'tokens' {tuple(ids.shape)} and 'word_start' {tuple(starts.shape)} must both be "
                "[B, L]"
            )
        expected = (ids.shape[0], ids.shape[1] + 1)
        if tuple(padding_mask.shape) != expected:
            raise TextMaskingError(
                f"padding_mask is {tuple(padding_mask.shape)}, expected {list(expected)} "
                "(CLS + the batch's tokens)"
            )
        return ids, starts.bool()

    def units(self, batch: Mapping[str, torch.Tensor], padding_mask: torch.Tensor) -> torch.Tensor:
        """Word index of every position, ``[B, 1+L]`` long; -1 at CLS, special ids and padding."""
        ids, starts = self._inputs(batch, padding_mask)
        maskable = ~padding_mask[:, 1:].to(ids.device)
        for special in self.special_ids:
            maskable &= ids != special
        # The first maskable token always opens a word, so every maskable token belongs to one.
        first = maskable & (maskable.long().cumsum(dim=1) == 1)
        opens = (starts | first) & maskable
        words = (opens.long().cumsum(dim=1) - 1).masked_fill(~maskable, -1)
        return torch.cat([words.new_full((words.shape[0], 1), -1), words], dim=1)

    def __call__(
        self,
        batch: Mapping[str, torch.Tensor],
        padding_mask: torch.Tensor,
        *,
        generator: torch.Generator,
        joint: bool = False,
        single_view_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        units = self.units(batch, padding_mask)
        if joint and single_view_mask is not None:
            if single_view_mask.shape != units.shape or single_view_mask.dtype != torch.bool:
                raise TextMaskingError(
                    f"single_view_mask must be bool {list(units.shape)}, got "
                    f"{single_view_mask.dtype} {tuple(single_view_mask.shape)}"
                )
            return self._visible_tokens(units, single_view_mask.to(units.device), generator)
        ratio = self.joint_mask_ratio if joint else self.mask_ratio
        return self._whole_words(units, ratio, generator)

    @staticmethod
    def _uniform(shape: tuple[int, int], generator: torch.Generator, device: torch.device):
        return torch.rand(shape, generator=generator, device=generator.device).to(device)

    def _whole_words(
        self, units: torch.Tensor, ratio: float, generator: torch.Generator
    ) -> torch.Tensor:
        words = units.max(dim=1).values + 1  # words per sample (ids are 0..n-1)
        width = int(words.max()) if units.numel() else 0
        if width == 0:
            return torch.zeros_like(units, dtype=torch.bool)
        # ceil of a float32 product, exactly as the official recipe computes it.
        counts = torch.ceil(words.float() * ratio).long()
        scores = self._uniform((units.shape[0], width), generator, units.device)
        exists = torch.arange(width, device=units.device)[None, :] < words[:, None]
        chosen = (_ranks(scores.masked_fill(~exists, 2.0)) < counts[:, None]) & exists
        return chosen.gather(1, units.clamp(min=0)) & (units >= 0)

    def _visible_tokens(
        self, units: torch.Tensor, single: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        maskable = units >= 0
        # int() of a float64 product, as the official vision-text recipe; capped by how many
        # tokens the text-only view left visible.
        counts = (maskable.sum(dim=1).double() * self.joint_mask_ratio).floor().long()
        candidates = maskable & ~single
        counts = torch.minimum(counts, candidates.sum(dim=1))
        scores = self._uniform(tuple(units.shape), generator, units.device)
        return (_ranks(scores.masked_fill(~candidates, 2.0)) < counts[:, None]) & candidates
