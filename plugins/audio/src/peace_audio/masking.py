"""Denoising masks for audio: data2vec 2.0's 1-D block mask (spec §3.4).

Per clip with ``T`` valid frames: draw ``int(T * (ratio + adjust) / span)`` block centres uniformly
(with replacement), hide ``span`` frames centred on each (clipped to the clip), then hide or reveal
single random frames until exactly ``int(ratio * T)`` frames are hidden — the official count
(``compute_block_mask_1d``), within the contract's ``round(ratio * T) ± 1``. The joint audio-text
view uses the same recipe with ``joint_mask_ratio``, drawn independently of the single view.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from peace_audio.options import AudioOptions


def block_mask_1d(
    frames: int,
    ratio: float,
    *,
    span: int,
    prob_adjust: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Bool ``[frames]`` with exactly ``int(ratio * frames)`` True, in blocks of ``span``."""
    device = generator.device
    mask = torch.zeros(frames, dtype=torch.bool, device=device)
    if frames == 0:
        return mask
    centres = torch.randint(
        0, frames, (int(frames * (ratio + prob_adjust) / span),), generator=generator, device=device
    )
    offsets = torch.arange(span, device=device) - span // 2
    mask[(centres[:, None] + offsets).clamp(0, frames - 1).flatten()] = True

    target = int(frames * ratio)
    hidden = int(mask.sum())
    if hidden > target:
        # Reveal random hidden frames, uniformly among them.
        reveal = torch.multinomial(mask.float(), hidden - target, generator=generator)
        mask[reveal] = False
    elif hidden < target:
        hide = torch.multinomial((~mask).float(), target - hidden, generator=generator)
        mask[hide] = True
    return mask


class AudioBlockMasker:
    """The audio :class:`~peace_registry.contract.Masker`: block masks over each clip's frames."""

    def __init__(self, options: AudioOptions) -> None:
        self.options = options

    def units(self, batch: Mapping[str, torch.Tensor], padding_mask: torch.Tensor) -> torch.Tensor:
        """Frame number (0 = first frame) per position, ``-1`` on CLS and padding."""
        _check_padding_mask(padding_mask)
        valid = ~padding_mask
        valid[:, 0] = False
        numbers = valid.long().cumsum(dim=1) - 1
        return numbers.masked_fill(~valid, -1)

    def __call__(
        self,
        batch: Mapping[str, torch.Tensor],
        padding_mask: torch.Tensor,
        *,
        generator: torch.Generator,
        joint: bool = False,
        single_view_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bool ``[B,N]``, True = hidden. ``single_view_mask`` is unused: audio views are drawn
        independently (official recipe)."""
        ratio = self.options.joint_mask_ratio if joint else self.options.mask_ratio
        units = self.units(batch, padding_mask).to(generator.device)
        hidden = torch.zeros(units.shape, dtype=torch.bool, device=generator.device)
        for row, row_units in enumerate(units):
            positions = (row_units >= 0).nonzero().flatten()
            frame_mask = block_mask_1d(
                positions.numel(),
                ratio,
                span=self.options.mask_span,
                prob_adjust=self.options.mask_prob_adjust,
                generator=generator,
            )
            hidden[row, positions[frame_mask]] = True
        return hidden.to(padding_mask.device)


def _check_padding_mask(padding_mask: torch.Tensor) -> None:
    if (
        not isinstance(padding_mask, torch.Tensor)
        or padding_mask.ndim != 2
        or padding_mask.dtype != torch.bool
        or padding_mask.shape[1] < 1
    ):
        shape = (
            tuple(padding_mask.shape) if isinstance(padding_mask, torch.Tensor) else padding_mask
        )
        raise ValueError(
            f"audio masker: padding_mask must be a bool [B,N] tensor with N >= 1 (CLS first), "
            f"got {shape}"
        )
