"""Denoising masks for images (spec §3.4): uniform random patches, and the joint view's complement.

Each patch is its own masking unit. The image-only view hides ``round(mask_ratio * patches)``
patches uniformly at random. The joint (image-text) view keeps ``round((1 - joint_mask_ratio) *
patches)`` patches, drawn from those the image-only view hid, so the two views' visible sets are
disjoint; without a single-view mask it keeps a uniform random subset.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from peace_registry.contract import BuildContext
from peace_vision.options import VisionOptions, as_vision_options


class VisionMasker:
    """The vision modality's :class:`~peace_registry.contract.Masker`."""

    def __init__(self, options: VisionOptions) -> None:
        self.options = as_vision_options(options)

    def units(self, batch: Mapping[str, torch.Tensor], padding_mask: torch.Tensor) -> torch.Tensor:
        """Patch index (0-based) of every position; -1 on CLS and padding."""
        _check_padding_mask(padding_mask)
        positions = torch.arange(padding_mask.shape[1], device=padding_mask.device)
        units = (positions - 1).expand_as(padding_mask).clone()
        return units.masked_fill(padding_mask, -1)

    def __call__(
        self,
        batch: Mapping[str, torch.Tensor],
        padding_mask: torch.Tensor,
        *,
        generator: torch.Generator,
        joint: bool = False,
        single_view_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bool ``[B,N]``, True = hidden; ``single_view_mask`` is read only when ``joint``."""
        eligible = self.units(batch, padding_mask) >= 0
        # Random scores drawn on the generator's device, so a seed gives the same mask anywhere.
        scores = torch.rand(eligible.shape, generator=generator, device=generator.device)
        scores = scores.to(padding_mask.device)
        patches = eligible.sum(dim=1)
        if not joint:
            hidden_counts = _rounded(self.options.mask_ratio, patches)
            return _lowest(scores, eligible, hidden_counts)
        if single_view_mask is not None:
            _check_single_view(single_view_mask, padding_mask)
            # Patches the single view showed score above every patch it hid, so the joint view
            # keeps hidden-in-single-view patches first (all of its kept set when there are enough).
            scores = scores + (~single_view_mask.to(scores.device)).to(scores.dtype)
        kept_counts = _rounded(1 - self.options.joint_mask_ratio, patches)
        kept = _lowest(scores, eligible, kept_counts)
        return eligible & ~kept


def _rounded(ratio: float, counts: torch.Tensor) -> torch.Tensor:
    return torch.tensor([round(ratio * int(n)) for n in counts], device=counts.device)


def _lowest(scores: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, True at the ``counts[row]`` eligible positions with the lowest scores."""
    scores = scores.masked_fill(~eligible, float("inf"))
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < counts[:, None]) & eligible


def _check_padding_mask(padding_mask: torch.Tensor) -> None:
    if padding_mask.ndim != 2 or padding_mask.dtype != torch.bool:
        raise ValueError(
            f"vision masker: padding_mask must be a [B,N] bool tensor, got "
            f"{tuple(padding_mask.shape)} {padding_mask.dtype}"
        )


def _check_single_view(single_view_mask: torch.Tensor, padding_mask: torch.Tensor) -> None:
    if single_view_mask.shape != padding_mask.shape or single_view_mask.dtype != torch.bool:
        raise ValueError(
            f"vision masker: single_view_mask must be a bool tensor shaped like the padding mask "
            f"{tuple(padding_mask.shape)}, got {tuple(single_view_mask.shape)} "
            f"{single_view_mask.dtype}"
        )


def build_vision_masker(ctx: BuildContext) -> VisionMasker:
    """``MaskerSpec.build`` for the vision modality (reads ``ctx.options``)."""
    return VisionMasker(as_vision_options(ctx.options))
