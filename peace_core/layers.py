"""Small building blocks of the fusion encoder (the GeGLU + Sub-LN FFN, LayerScale, DropPath)
and of adapters (:func:`embedding_lookup`)."""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from peace_core.gemm import Linear, input_grad, linear_no_grad, plain_tensor, weight_grad
from peace_core.host_memory import MMAP_THRESHOLD_BYTES

#: Tables from this size up get their gradient on fresh zero pages (:func:`embedding_lookup`).
#: Smaller gradients come from malloc's heap, which the host-memory policy keeps mapped, so
#: zeroing them costs a plain memset and no page faults.
FRESH_PAGES_MIN_BYTES = MMAP_THRESHOLD_BYTES


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
        self.wi_0 = Linear(dim, ffn_dim, bias=False, **factory)
        self.wi_1 = Linear(dim, ffn_dim, bias=False, **factory)
        self.norm = nn.LayerNorm(ffn_dim, eps=eps, **factory)
        self.wo = Linear(ffn_dim, dim, bias=True, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.wi_0(x), self.wi_1(x)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _GatedNormProjection.apply(
                gate,
                value,
                self.norm.weight,
                self.norm.bias,
                self.norm.eps,
                self.wo.weight,
                self.wo.bias,
            )
        return self.wo(self.norm(F.gelu(gate) * value))


class _GatedNormProjection(torch.autograd.Function):
    """``wo(norm(gelu(gate) * value))`` that keeps only ``gate`` and ``value`` for the backward.

    Autograd would keep four more ``[.., ffn_dim]`` tensors per FFN (GELU output, product, norm
    output; the largest part of a training step's activations). The backward recomputes the
    elementwise part from the two projections (no matmul is repeated) and does ``wo``'s two
    matmuls itself: -25 % peak memory of the image-text training step at the same speed
    (``benchmarks/workloads.py``). Autocast is restored for the recomputation, so mixed
    precision sees the same dtypes as in the forward.
    """

    @staticmethod
    def forward(ctx, gate, value, norm_weight, norm_bias, eps, out_weight, out_bias):  # type: ignore[override]
        device = gate.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.eps = eps
        ctx.save_for_backward(gate, value, norm_weight, norm_bias, out_weight)
        inner = F.layer_norm(F.gelu(gate) * value, gate.shape[-1:], norm_weight, norm_bias, eps)
        return linear_no_grad(inner, out_weight, out_bias)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        gate, value, norm_weight, norm_bias, out_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            leaves = [
                tensor.detach().requires_grad_(need)
                for tensor, need in zip((gate, value, norm_weight, norm_bias), needs)
            ]
            inner = F.layer_norm(
                F.gelu(leaves[0]) * leaves[1], gate.shape[-1:], leaves[2], leaves[3], ctx.eps
            )
            grad_inner = input_grad(grad_output, out_weight)
            flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
            grad_out_weight = grad_out_bias = None
            if needs[5]:
                grad_out_weight = weight_grad(
                    flat_grad, inner.detach().reshape(-1, inner.shape[-1]), out_weight
                )
        if needs[6]:
            grad_out_bias = flat_grad.sum(0)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(inner, wanted, grad_inner) if wanted else ())
        inputs = [next(grads) if leaf.requires_grad else None for leaf in leaves]
        return (*inputs, None, grad_out_weight, grad_out_bias)


def normed_linears(
    x: torch.Tensor, norm: nn.LayerNorm, linears: Sequence[nn.Linear], *, merge_heads: bool = False
) -> tuple[torch.Tensor, ...]:
    """``tuple(linear(norm(x)) for linear in linears)``; with ``merge_heads`` ``x`` is
    ``[B, H, N, d]`` and is first merged to ``[B, N, H·d]``.

    While gradients are recorded, only ``x`` is kept for the backward (:class:`_NormedLinears`),
    not the normalised (and merged) copy that each linear would keep.
    """
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        params: list[torch.Tensor | None] = []
        for linear in linears:
            params += [linear.weight, linear.bias]
        return _NormedLinears.apply(x, norm.weight, norm.bias, norm.eps, merge_heads, *params)
    h = norm(_merge_heads(x) if merge_heads else x)
    return tuple(linear(h) for linear in linears)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class _NormedLinears(torch.autograd.Function):
    """LayerNorm followed by linears that read its output, keeping only the input.

    Autograd would keep the norm's input and its output (for the linears); with merged heads also
    the merged copy, while attention already keeps the unmerged tensor. The backward recomputes
    the (cheap) merge and norm and does the linears' matmuls itself, so no matmul is repeated.
    Autocast is restored for the recomputation, as in the forward.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, merge_heads, *params):  # type: ignore[override]
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.eps, ctx.merge_heads, ctx.count = eps, merge_heads, len(params) // 2
        ctx.has_bias = [params[2 * i + 1] is not None for i in range(ctx.count)]
        weights = params[0::2]
        ctx.save_for_backward(x, norm_weight, norm_bias, *weights)
        h = _merge_heads(x) if merge_heads else x
        h = F.layer_norm(h, h.shape[-1:], norm_weight, norm_bias, eps)
        return tuple(linear_no_grad(h, w, b) for w, b in zip(weights, params[1::2]))

    @staticmethod
    def backward(ctx, *grad_outputs):  # type: ignore[override]
        x, norm_weight, norm_bias, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        device, enabled, dtype = ctx.autocast
        param_grads: list[torch.Tensor | None] = []
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            with torch.enable_grad():  # only the recomputed norm is differentiated
                leaves = [
                    tensor.detach().requires_grad_(need)
                    for tensor, need in zip((x, norm_weight, norm_bias), needs)
                ]
                h = _merge_heads(leaves[0]) if ctx.merge_heads else leaves[0]
                h = F.layer_norm(h, h.shape[-1:], leaves[1], leaves[2], ctx.eps)
            flat_h = h.detach().reshape(-1, h.shape[-1])
            grad_h = None
            for i, (weight, grad) in enumerate(zip(weights, grad_outputs)):
                need_weight, need_bias = needs[5 + 2 * i], needs[6 + 2 * i]
                if grad is None:
                    param_grads += [None, None]
                    continue
                # One flat (contiguous) copy of the gradient serves both matmuls as 2-D GEMMs.
                flat_grad = grad.reshape(-1, grad.shape[-1])
                part = input_grad(flat_grad, weight)
                grad_h = part if grad_h is None else grad_h.add_(part)
                grad_weight = weight_grad(flat_grad, flat_h, weight) if need_weight else None
                grad_bias = flat_grad.sum(0) if need_bias and ctx.has_bias[i] else None
                param_grads += [grad_weight, grad_bias]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        if grad_h is not None:
            grad_h = grad_h.reshape(h.shape)
        grads = iter(
            torch.autograd.grad(h, wanted, grad_h) if wanted and grad_h is not None else ()
        )
        inputs = [next(grads, None) if leaf.requires_grad else None for leaf in leaves]
        return (*inputs, None, None, *param_grads)


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


def embedding_lookup(table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``table(ids)``, whose backward writes only the looked-up rows of a large CPU table.

    A lookup's weight gradient is a dense ``[rows, dim]`` tensor, zero except for the rows looked
    up. torch builds it as zeros plus an index-add and so writes every byte: for a 50k x 768 token
    table that is 154 MB per step, on pages mapped afresh for it (too large for malloc's heap),
    which cost 0.8 % of a base image-text training step on a 2-core CPU
    (``benchmarks/workloads.py``). Here the gradient lies on fresh anonymous pages, which the OS
    hands out already zeroed, and only the looked-up rows are written; an optimizer reading the
    rest reads zero pages. Values and gradients are ``nn.Embedding``'s (the padding row gets none).

    Anything else is ``table(ids)`` itself: other devices, no gradient, tables under
    :data:`FRESH_PAGES_MIN_BYTES`, ``max_norm``, ``scale_grad_by_freq``, sparse gradients,
    sharded (non-plain) weights, compilation, or a platform without anonymous ``mmap``.
    """
    weight = table.weight
    if (
        torch.is_grad_enabled()
        and weight.requires_grad
        and weight.device.type == "cpu"
        and plain_tensor(weight)
        and weight.ndim == 2
        and weight.numel() > 0
        and weight.numel() * weight.element_size() >= FRESH_PAGES_MIN_BYTES
        and table.max_norm is None
        and not table.scale_grad_by_freq
        and not table.sparse
        and hasattr(mmap, "MAP_ANONYMOUS")
        and not torch.compiler.is_compiling()
    ):
        return _LookupOnFreshPages.apply(ids, weight, table.padding_idx)
    return table(ids)


def _zeros_on_fresh_pages(rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """A zero ``[rows, dim]`` tensor on private anonymous pages: the OS zeroes a page when it is
    first touched, so untouched rows cost nothing. The mapping lives as long as the tensor."""
    size = rows * dim * dtype.itemsize
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(rows, dim)


class _LookupOnFreshPages(torch.autograd.Function):
    """``F.embedding`` whose weight gradient is built on :func:`_zeros_on_fresh_pages`."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx):  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.padding_idx = padding_idx
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        rows, dim = ctx.weight_shape
        grad_weight = _zeros_on_fresh_pages(rows, dim, ctx.weight_dtype)
        grad_weight.index_add_(
            0, ids.reshape(-1), grad_output.reshape(-1, dim).to(ctx.weight_dtype)
        )
        if ctx.padding_idx is not None:
            grad_weight[ctx.padding_idx].zero_()  # as nn.Embedding: padding takes no gradient
        return None, grad_weight, None
