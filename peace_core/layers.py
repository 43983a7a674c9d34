"""Small building blocks of the fusion encoder: the GeGLU + Sub-LN FFN, LayerScale, DropPath."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeGLUFFN(nn.Module):
    """Gated-GELU feed-forward with a Sub-LayerNorm on the inner width (spec §2.1).

    ``forward(x) = wo(norm(gelu(wi_0 x) * wi_1 x))``; maps ``[..., D] -> [..., D]``.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        *,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or ffn_dim <= 0:
            raise ValueError(f"GeGLUFFN: dim and ffn_dim must be positive, got {dim}, {ffn_dim}")
        factory = {"device": device, "dtype": dtype}
        self.wi_0 = nn.Linear(dim, ffn_dim, bias=False, **factory)
        self.wi_1 = nn.Linear(dim, ffn_dim, bias=False, **factory)
        self.norm = nn.LayerNorm(ffn_dim, eps=eps, **factory)
        self.wo = nn.Linear(ffn_dim, dim, bias=True, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = F.gelu(self.wi_0(x)) * self.wi_1(x)
        return self.wo(self.norm(gated))


class LayerScale(nn.Module):
    """Per-channel learned scale ``gamma`` [D] on a residual branch (CaiT-style)."""

    def __init__(
        self,
        dim: int,
        init_value: float,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.init_value = float(init_value)
        self.gamma = nn.Parameter(torch.full((dim,), self.init_value, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gamma.fill_(self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"dim={self.gamma.shape[0]}, init_value={self.init_value:g}"


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling kept ones by 1/keep.

    Identity in eval mode or when ``p == 0``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # One Bernoulli draw per sample, broadcast over every other dim ([B,1,1] for [B,N,D]).
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:g}"
