"""Scaled dot-product attention behind one function, with three interchangeable backends.

``attend(q, k, v, bias, backend)`` takes *unscaled* ``q, k, v`` of shape ``[B,H,N,Dh]`` and applies
the scale itself (``Dh ** -0.5`` unless ``scale`` is given), so every backend sees the same inputs:

* ``math``: the readable reference. Scores are computed in the input dtype, the bias is added and
  the softmax taken in fp32, then the probabilities are cast back (as the official model does).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the bias as ``attn_mask``.
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
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


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
