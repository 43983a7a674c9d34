"""Weight initialisation of what the core owns; adapters initialise themselves.

Two schemes, chosen by ``EncoderConfig.init``:

- ``"scratch"`` (every preset below ``one-peace-4b``): each Linear's weight is normal with std
  ``fan_in ** -0.5`` cut at ±2 std (LeCun-normal, as CLIP-style models trained from scratch use).
  A Linear then keeps the scale of its input, so the CLS path carries its input's variation to
  the embedding from the first step, and Adam's steps (about ``lr`` per weight, whatever the
  weight's size) are a small fraction of each weight.
- ``"official"`` (spec §2.6; ``one-peace-4b`` and converted checkpoints): std 0.02 cut at ±0.02
  (±1 std). At 64–768 wide that makes every Linear shrink its input 5–20×; a contrastive loop at
  lr 1e-4…5e-4 then moves each weight by several per cent a step and first makes every
  embedding the same (the aligning loss sits at ln B). It is kept for parity and for the 4B
  model, which was trained with it (huge batches, long warm-up).

Both: biases 0, affine LayerNorms (1, 0), LayerScale back to its ``init_value``.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from peace_core.config import InitSchemeName as InitScheme
from peace_core.layers import LayerScale

INIT_SCHEMES: tuple[str, ...] = get_args(InitScheme)

#: The official scheme's std for every Linear; values are cut at ±1 std, like the official code.
LINEAR_INIT_STD = 0.02
#: The scratch scheme cuts its normal at this many stds.
SCRATCH_TRUNCATION = 2.0


def linear_init_std(fan_in: int, scheme: InitScheme) -> float:
    """The std of a Linear weight with ``fan_in`` inputs under ``scheme``."""
    if scheme == "official":
        return LINEAR_INIT_STD
    if scheme == "scratch":
        return fan_in**-0.5
    raise ValueError(f"unknown init scheme {scheme!r}; expected one of {INIT_SCHEMES}")


@torch.no_grad()
def init_linear(linear: nn.Linear, scheme: InitScheme) -> None:
    """One Linear under ``scheme``: truncated-normal weight, zero bias."""
    std = linear_init_std(linear.in_features, scheme)
    bound = std if scheme == "official" else SCRATCH_TRUNCATION * std
    nn.init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-bound, b=bound)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


@torch.no_grad()
def init_fusion_weights(module: nn.Module, scheme: InitScheme = "official") -> None:
    """Initialise every Linear, affine LayerNorm and LayerScale inside ``module`` in place."""
    linear_init_std(1, scheme)  # reject an unknown scheme even when module has no Linear
    for sub in module.modules():
        if any(p.is_meta for p in sub.parameters(recurse=False)):
            continue  # no storage to fill (a meta-device build, e.g. before loading weights)
        if isinstance(sub, nn.Linear):
            init_linear(sub, scheme)
        elif isinstance(sub, nn.LayerNorm) and sub.elementwise_affine:
            nn.init.ones_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, LayerScale):
            sub.reset_parameters()
