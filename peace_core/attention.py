"""Scaled dot-product attention behind one function, with three interchangeable backends.

``attend(q, k, v, bias, backend)`` takes *unscaled* ``q, k, v`` of shape ``[B,H,N,Dh]`` and applies
the scale itself (``Dh ** -0.5`` unless ``scale`` is given), so every backend sees the same inputs:

* ``math``: the readable reference. Scores are computed in the input dtype, the bias is added and
  the softmax taken in fp32, then the probabilities are cast back (as the official model does).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the bias as ``attn_mask``.
  Where the bias takes a gradient (trained relative-position tables) on CPU in fp32, torch has no
  fused kernel and falls back to its unfused math path; :class:`_BiasedAttention` runs the same
  math in fewer passes over the ``[B,H,N,N]`` scores instead (same values and gradients to float
  rounding, fully masked rows give zeros as sdpa's do).
* ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only). Its tensor bias must
  have the exact shape ``[B,H,N,N]`` and rows aligned in memory, so the bias is materialised with
  its last dim padded to a multiple of 8 and sliced back to ``N``.

``bias`` is a float additive bias broadcastable to ``[B,H,N,N]`` (``-inf`` masks a key) or None.

``resolve_backend`` turns a requested name (``auto`` included) into a concrete one. The
``PEACE_ATTENTION`` environment variable overrides whatever the config asked for.
"""

from __future__ import annotations

import functools
import os
from typing import Final, get_args

import torch
import torch.nn.functional as F
from einops import rearrange

from peace_core.config import AttentionBackendName

ATTENTION_ENV_VAR: Final = "PEACE_ATTENTION"
BACKEND_NAMES: Final[tuple[str, ...]] = get_args(AttentionBackendName)
CONCRETE_BACKENDS: Final[tuple[str, ...]] = ("math", "sdpa", "xformers")

# xformers' kernels need the bias rows 16-byte aligned; 8 elements covers fp16/bf16 and fp32.
_XFORMERS_BIAS_ALIGNMENT: Final = 8


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of unscaled queries ``q`` ``[B,H,Nq,Dh]`` over ``k, v`` ``[B,H,N,Dh]`` with an
    additive ``bias`` broadcastable to ``[B,H,Nq,N]`` (``Nq`` may be fewer than ``N``: only some
    positions' outputs wanted).

    Returns ``[B,H,Nq,Dh]``. ``backend`` must be concrete (``math``, ``sdpa`` or ``xformers``);
    see :func:`resolve_backend`. ``scale`` defaults to ``Dh ** -0.5``.
    """
    if (
        q.ndim != 4
        or k.ndim != 4
        or k.shape[:2] != q.shape[:2]
        or k.shape[-1] != q.shape[-1]
        or v.shape[:3] != k.shape[:3]
    ):
        raise ValueError(
            "attend: expected q [B,H,Nq,Dh] and k, v [B,H,N,Dh] with matching B, H, Dh (and N "
            f"for k, v); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if bias is not None and (bias.ndim != 4 or not bias.is_floating_point()):
        raise ValueError(
            "attend: bias must be a float tensor broadcastable to [B,H,N,N], got "
            f"{bias.dtype} of shape {tuple(bias.shape)}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "math":
        return _attend_math(q, k, v, bias, scale)
    if backend == "sdpa":
        return _attend_sdpa(q, k, v, bias, scale)
    if backend == "xformers":
        return _attend_xformers(q, k, v, bias, scale)
    raise ValueError(f"attend: unknown backend {backend!r}; expected one of {CONCRETE_BACKENDS}")


def _attend_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    scores = torch.matmul(q * scale, k.transpose(-2, -1)).float()
    if bias is not None:
        scores = scores + bias.float()
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def _attend_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    if _takes_biased_attention(q, k, v, bias):
        return _BiasedAttention.apply(q, k, v, bias, scale)
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _takes_biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> bool:
    """Where sdpa would run its unfused math path because the bias takes a gradient."""
    return (
        bias is not None
        and bias.requires_grad
        and torch.is_grad_enabled()
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == bias.dtype == torch.float32
        and not torch.compiler.is_compiling()
    )


class _BiasedAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + bias) v``, differentiable in the bias too, for CPU.

    torch's sdpa has no CPU kernel that returns the bias gradient, so there it runs its math
    path: q and k scaled, the scores, the bias added, a softmax with checks for fully masked
    rows, and the backward of each. Here the scale rides on the scores' GEMM, the bias is added
    in place, the softmax is taken once and only the probabilities are kept; the backward is
    four batched GEMMs and one softmax backward, whose sum over the bias's broadcast dimensions
    is the bias gradient. Forward+backward of 8 x 12 heads of 64 takes 18 % and 28 % less time
    than torch's fallback at 71 and 125 tokens, 12 % at 257
    (``benchmarks/attention.py --attention-only``).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):  # type: ignore[override]
        batch, heads, queries, head_dim = q.shape
        keys = k.shape[2]
        flat = batch * heads
        q3 = q.reshape(flat, queries, head_dim)
        k3 = k.reshape(flat, keys, head_dim)
        v3 = v.reshape(flat, keys, head_dim)
        # With beta=0 the first argument only gives the shape: the scale rides on the GEMM,
        # and the bias is added in place, broadcast (no copy of it per sample).
        shape_only = q3.new_empty(()).expand(flat, queries, keys)
        scores = torch.baddbmm(shape_only, q3, k3.transpose(1, 2), beta=0.0, alpha=scale)
        scores.view(batch, heads, queries, keys).add_(bias)
        probs = torch.softmax(scores, dim=-1)
        del scores
        # A row whose every key is masked is NaN: zeros, as sdpa gives (and no gradient).
        if bool(probs[..., 0].isnan().any()):
            probs = probs.nan_to_num_(0.0)
        ctx.save_for_backward(q3, k3, v3, probs)
        ctx.scale, ctx.bias_shape = scale, bias.shape
        return torch.bmm(probs, v3).view(batch, heads, queries, head_dim)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        q3, k3, v3, probs = ctx.saved_tensors
        need_q, need_k, need_v, need_bias, _ = ctx.needs_input_grad
        batch, heads, queries, head_dim = grad_output.shape
        keys = k3.shape[1]
        grad3 = grad_output.reshape(-1, queries, head_dim)
        grad_q = grad_k = grad_v = grad_bias = None
        if need_v:
            grad_v = torch.bmm(probs.transpose(1, 2), grad3).view(batch, heads, keys, head_dim)
        grad_probs = torch.bmm(grad3, v3.transpose(1, 2))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        del grad_probs
        if need_bias:
            grad_bias = grad_scores.view(batch, heads, queries, keys).sum_to_size(ctx.bias_shape)
        if need_q:
            grad_q = torch.bmm(grad_scores, k3).mul_(ctx.scale)
            grad_q = grad_q.view(batch, heads, queries, head_dim)
        if need_k:
            grad_k = torch.bmm(grad_scores.transpose(1, 2), q3).mul_(ctx.scale)
            grad_k = grad_k.view(batch, heads, keys, head_dim)
        return grad_q, grad_k, grad_v, grad_bias, None


def _attend_xformers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    import xformers.ops as xops  # imported here: xformers has no CPU kernels

    batch, heads, queries, _ = q.shape
    aligned_bias = None
    if bias is not None:
        aligned_bias = _aligned_bias(bias.to(q.dtype), batch, heads, queries, k.shape[2])
    to_bnhd = "b h n d -> b n h d"  # xformers' layout; last-dim-contiguous views are accepted
    out = xops.memory_efficient_attention(
        rearrange(q, to_bnhd),
        rearrange(k, to_bnhd),
        rearrange(v, to_bnhd),
        attn_bias=aligned_bias,
        scale=scale,
    )
    return rearrange(out, "b n h d -> b h n d")


def _aligned_bias(
    bias: torch.Tensor, batch: int, heads: int, queries: int, length: int
) -> torch.Tensor:
    """``bias`` expanded to ``[B,H,Nq,N]``, stored with rows padded to the kernel's alignment."""
    padded = -(-length // _XFORMERS_BIAS_ALIGNMENT) * _XFORMERS_BIAS_ALIGNMENT
    full = bias.expand(batch, heads, queries, length)
    # F.pad allocates a fresh contiguous [B,H,Nq,padded] tensor; slicing keeps aligned strides.
    return F.pad(full, (0, padded - length))[..., :length]


def resolve_backend(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The concrete backend to use for ``requested`` on ``device`` with ``dtype``.

    ``PEACE_ATTENTION`` (if set and non-empty) replaces ``requested``. ``auto`` picks ``xformers``
    on CUDA when it imports and a tiny probe call succeeds (probed once per device and dtype),
    else ``sdpa``. Asking for ``xformers`` where it cannot run is an error that says why.
    """
    env_value = os.environ.get(ATTENTION_ENV_VAR, "").strip().lower()
    source = f"the {ATTENTION_ENV_VAR} environment variable" if env_value else "the config"
    name = env_value or requested
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown attention backend {name!r} from {source}; expected one of {BACKEND_NAMES}"
        )
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and not _xformers_failure(str(device), dtype):
            return "xformers"
        return "sdpa"
    if name == "xformers":
        if device.type != "cuda":
            raise ValueError(
                f"attention backend 'xformers' (from {source}) needs a CUDA device, but the model "
                f"runs on {device.type!r}; use 'sdpa', 'math' or 'auto'"
            )
        failure = _xformers_failure(str(device), dtype)
        if failure:
            raise RuntimeError(
                f"attention backend 'xformers' (from {source}) is unusable on {device} with "
                f"{dtype}: {failure}; install a matching xformers or use 'sdpa'"
            )
    return name


# torch.compile runs this once at trace time and keeps the answer as a constant, instead of
# tracing the probe call into the graph.
@torch.compiler.assume_constant_result
@functools.cache
def _xformers_failure(device: str, dtype: torch.dtype) -> str:
    """Why xformers cannot run on ``device``/``dtype`` ("" when it can). Never raises."""
    try:
        import xformers.ops as xops
    except Exception as error:  # any import failure (missing, ABI mismatch) means "not usable"
        return f"import failed ({type(error).__name__}: {error})"
    try:
        probe = torch.zeros(1, _XFORMERS_BIAS_ALIGNMENT, 1, 8, device=device, dtype=dtype)
        bias = torch.zeros(1, 1, 8, 8, device=device, dtype=dtype)
        xops.memory_efficient_attention(probe, probe, probe, attn_bias=bias)
    except Exception as error:
        return f"probe call failed ({type(error).__name__}: {error})"
    return ""


def clear_backend_cache() -> None:
    """Forget cached xformers probe results (e.g. after changing devices in a test)."""
    _xformers_failure.cache_clear()
