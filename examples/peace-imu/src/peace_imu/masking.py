"""Denoising masks for imu windows: contiguous spans of patches, hidden at random places.

Each patch is one masking unit. A window of ``P`` patches hides exactly ``round(ratio * P)`` of
them (Python's ``round``, half to even) in spans of ``mask_span`` consecutive patches (one span
shorter when the count is not a multiple). The spans are placed uniformly at random without
overlapping: a random interleaving of the spans with the ``P - hidden`` visible patches; two
spans may touch and then read as one longer span. Neighbouring samples of a motion are nearly
identical, so hiding single patches would let the model interpolate; spans make it infer.

The imu-only view uses ``mask_ratio``, the joint (imu-text) view ``joint_mask_ratio``, drawn
independently (as the audio plugin and the template do): ``single_view_mask`` is not read. Every
draw comes from the ``generator`` given, on its device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from peace_imu.options import ImuOptions


def span_mask(patches: int, hidden: int, span: int, *, generator: torch.Generator) -> torch.Tensor:
    """Bool ``[patches]`` (on ``generator.device``) with exactly ``hidden`` True, in at most
    ``ceil(hidden / span)`` contiguous runs."""
    device = generator.device
    mask = torch.zeros(patches, dtype=torch.bool, device=device)
    if hidden <= 0:
        return mask
    if not 0 < hidden <= patches:
        raise ValueError(f"cannot hide {hidden} of {patches} patches")
    spans = -(-hidden // span)
    lengths = torch.full((spans,), span, dtype=torch.long, device=device)
    short = int(torch.randint(spans, (1,), generator=generator, device=device))
    lengths[short] = hidden - span * (spans - 1)  # == span when hidden is a multiple
    # Stars and bars: choose which of the `visible + spans` slots hold a span; the visible
    # patches fill the other slots, so spans never overlap and every layout is equally likely.
    visible = patches - hidden
    slots = torch.randperm(visible + spans, generator=generator, device=device)[:spans].sort()
    before = slots.values - torch.arange(spans, device=device)  # visible patches before span i
    starts = before + torch.cumsum(lengths, 0) - lengths
    offsets = torch.arange(span, device=device)
    inside = offsets[None, :] < lengths[:, None]
    mask[(starts[:, None] + offsets[None, :])[inside]] = True
    return mask


class ImuSpanMasker:
    """The imu modality's :class:`~peace_registry.contract.Masker` (see the module doc)."""

    def __init__(self, options: ImuOptions) -> None:
        self.options = options

    def units(self, batch: Mapping[str, torch.Tensor], padding_mask: torch.Tensor) -> torch.Tensor:
        """Patch number (0 = first patch) of every position; -1 on CLS and padding."""
        if (
            not isinstance(padding_mask, torch.Tensor)
            or padding_mask.ndim != 2
            or padding_mask.dtype != torch.bool
        ):
            raise ValueError(
                "imu masker: padding_mask must be a bool [B,N] tensor (CLS first), got "
                f"{getattr(padding_mask, 'dtype', type(padding_mask).__name__)} "
                f"{tuple(getattr(padding_mask, 'shape', ()))}"
            )
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
        """Bool ``[B,N]``, True = hidden; the same for the same generator state."""
        ratio = self.options.joint_mask_ratio if joint else self.options.mask_ratio
        units = self.units(batch, padding_mask).to(generator.device)
        hidden = torch.zeros(units.shape, dtype=torch.bool, device=generator.device)
        for row, row_units in enumerate(units):
            positions = (row_units >= 0).nonzero().flatten()
            count = positions.numel()
            chosen = span_mask(
                count, round(ratio * count), self.options.mask_span, generator=generator
            )
            hidden[row, positions[chosen]] = True
        return hidden.to(padding_mask.device)
