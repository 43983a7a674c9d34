"""Denoising masks for signals: each frame is one masking unit, hidden uniformly at random.

The signal-only view hides ``round(mask_ratio * frames)`` frames of every sample, the joint view
``round(joint_mask_ratio * frames)``, drawn independently. A recipe that depends on the single
view (vision's joint view keeps only patches the single view hid) would read ``single_view_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from peace_template.options import SignalOptions


class SignalMasker:
    """The signal modality's :class:`~peace_registry.contract.Masker`."""

    def __init__(self, options: SignalOptions) -> None:
        self.options = options

    def units(self, batch: Mapping[str, torch.Tensor], padding_mask: torch.Tensor) -> torch.Tensor:
        """Frame number of every position; -1 on CLS (position 0) and padding."""
        if padding_mask.ndim != 2 or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be a [B,N] bool tensor, got {padding_mask.dtype}")
        positions = torch.arange(padding_mask.shape[1], device=padding_mask.device)
        return (positions - 1).expand_as(padding_mask).masked_fill(padding_mask, -1)

    def __call__(
        self,
        batch: Mapping[str, torch.Tensor],
        padding_mask: torch.Tensor,
        *,
        generator: torch.Generator,
        joint: bool = False,
        single_view_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bool ``[B,N]``, True = hidden; the same for the same generator state."""
        eligible = self.units(batch, padding_mask) >= 0
        ratio = self.options.joint_mask_ratio if joint else self.options.mask_ratio
        hidden = (eligible.sum(dim=1).double() * ratio).round().long()  # per sample
        # Scores drawn on the generator's device, so one seed gives one mask on any device.
        scores = torch.rand(eligible.shape, generator=generator, device=generator.device)
        scores = scores.to(padding_mask.device).masked_fill(~eligible, 2.0)
        ranks = scores.argsort(dim=1).argsort(dim=1)  # the lowest scores are hidden
        return (ranks < hidden[:, None]) & eligible
