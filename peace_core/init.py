"""Weight initialisation of what the core owns (spec §2.6); adapters initialise themselves."""

from __future__ import annotations

import torch
from torch import nn

from peace_core.layers import LayerScale

#: Std of the truncated normal for every Linear; values are cut at ±1 std, like the official code.
LINEAR_INIT_STD = 0.02


@torch.no_grad()
def init_fusion_weights(module: nn.Module) -> None:
    """Initialise every Linear, affine LayerNorm and LayerScale inside ``module`` in place.

    Linear: weight trunc-normal(0, 0.02) cut at ±0.02, bias 0. LayerNorm: weight 1, bias 0.
    LayerScale: ``gamma`` back to its ``init_value`` (the config's ``layer_scale_init``).
    """
    for sub in module.modules():
        if any(p.is_meta for p in sub.parameters(recurse=False)):
            continue  # no storage to fill (a meta-device build, e.g. before loading weights)
        if isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(
                sub.weight, mean=0.0, std=LINEAR_INIT_STD, a=-LINEAR_INIT_STD, b=LINEAR_INIT_STD
            )
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm) and sub.elementwise_affine:
            nn.init.ones_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, LayerScale):
            sub.reset_parameters()
