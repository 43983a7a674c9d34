"""Small building blocks of the fusion encoder: the GeGLU + Sub-LN FFN, LayerScale, DropPath."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


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
        gate, value = self.wi_0(x), self.wi_1(x)
        if torch.is_grad_enabled() and (gate.requires_grad or value.requires_grad):
            # Keep only the two projections for the backward and recompute the cheap
            # elementwise part (GELU, product, norm) there: three fewer [.., ffn_dim] tensors
            # saved per FFN, most of a training step's activation memory, for about 3 % more
            # time (benchmarks/workloads.py, training steps).
            inner = checkpoint(self._gated_norm, gate, value, use_reentrant=False)
        else:
            inner = self._gated_norm(gate, value)
        return self.wo(inner)

    def _gated_norm(self, gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(gate) * value)


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
