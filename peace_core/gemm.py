"""fp32 CPU matmuls of the fusion layers on the faster of two exact libraries: oneDNN or BLAS.

torch runs an fp32 ``linear`` on CPU through the BLAS it links (MKL on x86). On AMD CPUs MKL
takes slower code paths than oneDNN, which torch also ships: on a 2-core AMD EPYC (Zen 4) the
forward ``x @ W.T`` and input-gradient ``g @ W`` GEMMs of the base model ran 10-20 % faster
through oneDNN, while the weight gradient ``g.T @ x`` was as fast or faster through MKL
(``benchmarks/gemm.py``). Both are plain fp32 (no reduced precision): results differ from each
other only by summation order (~1e-6 relative).

A down projection (more inputs than outputs, the FFN's ``wo``) keeps its weight stored
transposed, ``[in, out]`` in memory behind the usual ``[out, in]`` shape (:func:`lay_out_weight`):
oneDNN's forward and BLAS's weight gradient both run faster from that layout.

The backend is process-wide: ``auto`` (the default) picks ``onednn`` on AMD x86 CPUs and ``blas``
elsewhere; ``PEACE_CPU_GEMM=blas|onednn|auto`` or :func:`set_cpu_gemm` choose. Only fp32 CPU
tensors outside autocast and ``torch.compile`` take the oneDNN path; everything else (CUDA, bf16,
autocast, tensor subclasses such as DTensor) is ``torch.nn.functional.linear`` unchanged.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Chooses the fp32 CPU GEMM library of every process: ``auto``, ``blas`` or ``onednn``.
CPU_GEMM_ENV_VAR = "PEACE_CPU_GEMM"
CPU_GEMM_CHOICES = ("auto", "blas", "onednn")

_state: dict[str, str] = {}


def _cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The x86 vendor string (``AuthenticAMD``, ``GenuineIntel``) or ``""`` when unknown."""
    try:
        with cpuinfo.open() as lines:
            for line in lines:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's dense linear kernel."""
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def resolve_cpu_gemm(requested: str, *, vendor: str | None = None) -> tuple[str, str]:
    """``(backend, reason)`` for a requested choice; ``vendor`` overrides the detected CPU."""
    if requested not in CPU_GEMM_CHOICES:
        raise ValueError(
            f"{CPU_GEMM_ENV_VAR}={requested!r}: expected one of {', '.join(CPU_GEMM_CHOICES)}"
        )
    if requested == "onednn" and not onednn_available():
        raise ValueError(
            f"{CPU_GEMM_ENV_VAR}=onednn: this torch build has no oneDNN linear kernel "
            "(torch.backends.mkldnn); use blas or auto"
        )
    if requested != "auto":
        return requested, "chosen"
    vendor = _cpu_vendor() if vendor is None else vendor
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    if vendor == "AuthenticAMD" and is_x86 and onednn_available():
        return "onednn", "auto: AMD CPU, where oneDNN beats MKL"
    return "blas", "auto"


def set_cpu_gemm(requested: str) -> str:
    """Use ``requested`` (``auto``, ``blas`` or ``onednn``) from now on; returns the backend."""
    backend, reason = resolve_cpu_gemm(requested)
    _state.update(backend=backend, reason=reason)
    return backend


def cpu_gemm() -> str:
    """The backend in force (resolved from ``PEACE_CPU_GEMM`` on first use)."""
    if "backend" not in _state:
        set_cpu_gemm(os.environ.get(CPU_GEMM_ENV_VAR, "auto").strip() or "auto")
    return _state["backend"]


def describe_cpu_gemm() -> str:
    """One line for a command's start: the backend and why."""
    backend = cpu_gemm()
    return f"{backend} ({_state['reason']}; {CPU_GEMM_ENV_VAR} to change)"


def plain_tensor(tensor: torch.Tensor | None) -> bool:
    """None, a tensor or a parameter, but no tensor subclass (a DTensor shard, a fake or
    functional tensor), whose memory the CPU fast paths could not read directly."""
    return tensor is None or type(tensor) in (torch.Tensor, nn.Parameter)


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        cpu_gemm() == "onednn"  # first: the whole test on every linear call when BLAS is chosen
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.ndim >= 2
        and weight.ndim == 2
        and x.numel() > 0
        and plain_tensor(x)
        and plain_tensor(weight)
        and plain_tensor(bias)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN, whatever backend is chosen (no checks, no gradient;
    ``weight`` may be a transposed view). The benchmarks time the library with it."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear_no_grad(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` on the chosen backend, recording no gradient (for autograd
    Functions' own forward and backward)."""
    if _takes_onednn(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight``: a linear's input gradient, on the chosen backend."""
    if _takes_onednn(grad, weight, None):
        # oneDNN reads the transposed view in place: no copy of the weight.
        return onednn_linear(grad, weight.t(), None)
    return torch.matmul(grad, weight)


def weight_grad(
    flat_grad: torch.Tensor, flat_input: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``flat_grad.T @ flat_input``: a linear's weight gradient (BLAS is as fast or faster), laid
    out in memory as ``weight`` is, so that autograd accumulates it without a copy."""
    if stored_transposed(weight):
        return torch.matmul(flat_input.t(), flat_grad).t()
    return torch.matmul(flat_grad.t(), flat_input)


def stored_transposed(weight: torch.Tensor) -> bool:
    """Whether a ``[out, in]`` weight lies in memory as its transpose (``[in, out]`` rows)."""
    return (
        weight.ndim == 2 and not weight.is_contiguous() and weight.stride() == (1, weight.shape[0])
    )


def lay_out_weight(linear: nn.Linear) -> None:
    """Store the weight of a linear with more inputs than outputs as its transpose.

    A GEMM reads its ``[K, N]`` operand fastest with ``N`` contiguous, and a down projection's
    ``x @ W.T`` gets that only from ``[in, out]`` storage: oneDNN's forward of a 4:1 down
    projection ran 25 % faster from it, and BLAS's weight gradient 10-20 % faster written into it,
    with the input gradient unchanged (``benchmarks/gemm.py --compare layouts``). Shape, values and
    state-dict keys stay those of ``nn.Linear``; only the strides differ. The parameter object is
    kept (``.data`` is replaced), so an optimizer holding it is unaffected. Weights that are not
    plain tensors (DTensor shards) are left as they are.
    """
    weight = linear.weight
    if (
        linear.in_features > linear.out_features
        and plain_tensor(weight)
        and weight.ndim == 2
        and not stored_transposed(weight)
    ):
        with torch.no_grad():
            weight.data = weight.data.t().contiguous().t()


def _count_onednn_linear_flops() -> None:
    """Teach ``torch.utils.flop_counter`` oneDNN's linear (2 FLOPs per multiply-add, as for
    ``mm``), so that FLOP counts and MFU see the GEMMs that run there."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if not onednn_available():
        return
    target = torch.ops.mkldnn._linear_pointwise
    if target in flop_registry:
        return

    @register_flop_formula(target)
    def _flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        rows = math.prod(x_shape[:-1])
        return 2 * rows * x_shape[-1] * w_shape[0]


_count_onednn_linear_flops()


class _OneDNNLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` with the forward and input gradient on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if needs_x:
            grad_x = input_grad(flat_grad, weight).reshape(x.shape)
        if needs_weight:
            grad_weight = weight_grad(flat_grad, x.reshape(-1, x.shape[-1]), weight)
        if needs_bias and ctx.has_bias:
            grad_bias = flat_grad.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` on the chosen fp32 CPU backend, differentiable."""
    if not _takes_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        return _OneDNNLinear.apply(x, weight, bias)
    return onednn_linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and init) computed by :func:`linear`.

    A down projection (``in_features > out_features``) keeps its weight stored transposed
    (:func:`lay_out_weight`), also after ``load_state_dict`` (with ``assign=True`` too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lay_out_weight(self)
        self.register_load_state_dict_post_hook(_lay_out_after_load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _lay_out_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    assert isinstance(module, nn.Linear)
    lay_out_weight(module)
