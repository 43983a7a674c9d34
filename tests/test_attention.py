"""Attention backends agree with the math reference; backend resolution and its errors."""

from __future__ import annotations

import sys

import pytest
import torch

from peace_core import attention
from peace_core.attention import attend, resolve_backend

CUDA = torch.cuda.is_available()


def _inputs(
    batch: int = 2,
    heads: int = 3,
    length: int = 11,
    head_dim: int = 8,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    bias_batch: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Random q, k, v and a bias with a few padded (-inf) key columns in the last sample."""
    gen = torch.Generator().manual_seed(0)
    shape = (batch, heads, length, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    bias = torch.randn(bias_batch or batch, heads, length, length, generator=gen)
    if bias.shape[0] == batch:
        bias[-1, :, :, -3:] = float("-inf")
    bias = bias.to(device, dtype)
    for t in (q, k, v, bias):
        t.requires_grad_(True)
    return q, k, v, bias


def _forward_backward(backend: str, q, k, v, bias) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for t in (q, k, v, bias):
        if t is not None:
            t.grad = None
    out = attend(q, k, v, bias, backend)
    # A fixed random projection of the output makes every gradient entry matter.
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out.float() * weights.float()).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, bias) if t is not None]
    return out.detach(), grads


def test_math_matches_the_formula() -> None:
    q, k, v, bias = _inputs()
    out = attend(q, k, v, bias, "math")
    scores = (q.double() @ k.double().transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias.double()
    expected = scores.softmax(-1) @ v.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_explicit_scale_is_used() -> None:
    q, k, v, _ = _inputs()
    out = attend(q, k, v, None, "math", scale=0.5)
    expected = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attend(q, k, v, None, "sdpa", scale=0.5), out, rtol=1e-5, atol=1e-5)


def test_math_keeps_input_dtype_with_fp32_softmax() -> None:
    q, k, v, bias = _inputs(dtype=torch.bfloat16)
    out = attend(q, k, v, bias, "math")
    assert out.dtype == torch.bfloat16
    reference = attend(q.float(), k.float(), v.float(), bias.float(), "math")
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("bias_batch", [None, 1])
def test_sdpa_matches_math_forward_and_backward(bias_batch: int | None) -> None:
    q, k, v, bias = _inputs(bias_batch=bias_batch)
    out_math, grads_math = _forward_backward("math", q, k, v, bias)
    out_sdpa, grads_sdpa = _forward_backward("sdpa", q, k, v, bias)
    torch.testing.assert_close(out_sdpa, out_math, rtol=1e-5, atol=1e-5)
    assert len(grads_math) == 4
    for name, a, b in zip("qkv", grads_sdpa, grads_math):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")
    # The bias gradient is finite where keys are valid and exactly 0 on masked keys.
    torch.testing.assert_close(grads_sdpa[3], grads_math[3], rtol=1e-5, atol=1e-5)
    assert grads_math[3].abs().sum() > 0


def test_sdpa_matches_math_without_bias() -> None:
    q, k, v, _ = _inputs()
    out_math, grads_math = _forward_backward("math", q, k, v, None)
    out_sdpa, grads_sdpa = _forward_backward("sdpa", q, k, v, None)
    torch.testing.assert_close(out_sdpa, out_math, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_sdpa, grads_math):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padded_keys_do_not_influence_the_output() -> None:
    q, k, v, bias = _inputs()
    out = attend(q, k, v, bias, "sdpa").detach()
    v_changed = v.detach().clone()
    v_changed[-1, :, -3:] += 100.0  # values at the last sample's masked keys
    torch.testing.assert_close(attend(q, k, v_changed, bias, "sdpa"), out)


def test_aligned_bias_layout_values_and_gradient() -> None:
    bias = torch.randn(1, 3, 11, 11, requires_grad=True)
    aligned = attention._aligned_bias(bias, 2, 3, 11, 11)
    assert aligned.shape == (2, 3, 11, 11)
    assert aligned.stride(-1) == 1
    assert all(aligned.stride(d) % 8 == 0 for d in range(3))
    torch.testing.assert_close(aligned, bias.expand(2, 3, 11, 11))
    aligned.sum().backward()
    assert torch.equal(bias.grad, torch.full_like(bias, 2.0))  # summed over the expanded batch


def test_fewer_queries_attend_every_key_as_the_full_attention_does() -> None:
    q, k, v, bias = _inputs()
    rows = torch.tensor([0, 4, 7])
    full = attend(q, k, v, bias, "math")
    for backend in ("math", "sdpa"):
        some = attend(q[:, :, rows], k, v, bias[:, :, rows], backend)
        torch.testing.assert_close(some, full[:, :, rows], rtol=1e-5, atol=1e-5)
    aligned = attention._aligned_bias(torch.randn(1, 3, 1, 11), 2, 3, 4, 11)
    assert aligned.shape == (2, 3, 4, 11) and aligned.stride(2) % 8 == 0


def test_attend_errors_name_the_problem() -> None:
    q, k, v, bias = _inputs()
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        attend(q, k, v, bias, "flash")
    with pytest.raises(ValueError, match=r"q \[B,H,Nq,Dh\] and k, v \[B,H,N,Dh\]"):
        attend(q[0], k[0], v[0], None, "math")
    with pytest.raises(ValueError, match="matching B, H, Dh"):
        attend(q, k[:, :, :5], v, None, "math")
    with pytest.raises(ValueError, match="float tensor"):
        attend(q, k, v, torch.zeros(2, 3, 11, 11, dtype=torch.bool), "math")


@pytest.mark.skipif(not CUDA, reason="xformers needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_matches_math(dtype: torch.dtype) -> None:
    pytest.importorskip("xformers.ops")
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    q, k, v, bias = _inputs(device="cuda", dtype=dtype, length=13)
    out_math, grads_math = _forward_backward("math", q, k, v, bias)
    out_xf, grads_xf = _forward_backward("xformers", q, k, v, bias)
    torch.testing.assert_close(out_xf.float(), out_math.float(), rtol=tolerance, atol=tolerance)
    for a, b in zip(grads_xf, grads_math):
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance)


# ------------------------------------------------------------------------------------------------
# resolve_backend
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_probe(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(attention.ATTENTION_ENV_VAR, raising=False)
    attention.clear_backend_cache()
    yield
    attention.clear_backend_cache()


@pytest.fixture
def broken_xformers(monkeypatch: pytest.MonkeyPatch, fresh_probe):
    """Make ``import xformers.ops`` fail, as on an install without (or with a broken) xformers."""
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)


def test_auto_on_cpu_is_sdpa(fresh_probe) -> None:
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"


def test_concrete_names_pass_through_on_cpu(fresh_probe) -> None:
    assert resolve_backend("math", "cpu", torch.float32) == "math"
    assert resolve_backend("sdpa", "cpu", torch.float32) == "sdpa"


def test_xformers_on_cpu_is_a_clear_error(fresh_probe) -> None:
    with pytest.raises(ValueError, match=r"'xformers'.*needs a CUDA device.*'cpu'"):
        resolve_backend("xformers", "cpu", torch.float32)


def test_env_overrides_config(monkeypatch: pytest.MonkeyPatch, fresh_probe) -> None:
    monkeypatch.setenv(attention.ATTENTION_ENV_VAR, "math")
    assert resolve_backend("sdpa", "cpu", torch.float32) == "math"
    assert resolve_backend("auto", "cpu", torch.float32) == "math"
    monkeypatch.setenv(attention.ATTENTION_ENV_VAR, "xformers")
    with pytest.raises(ValueError, match="PEACE_ATTENTION environment variable"):
        resolve_backend("sdpa", "cpu", torch.float32)
    monkeypatch.setenv(attention.ATTENTION_ENV_VAR, "")
    assert resolve_backend("math", "cpu", torch.float32) == "math"


def test_unknown_names_are_errors(monkeypatch: pytest.MonkeyPatch, fresh_probe) -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash' from the config"):
        resolve_backend("flash", "cpu", torch.float32)
    monkeypatch.setenv(attention.ATTENTION_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="'fast' from the PEACE_ATTENTION"):
        resolve_backend("auto", "cpu", torch.float32)


def test_broken_xformers_never_crashes_auto(broken_xformers) -> None:
    # Even where CUDA is claimed, a failing import only means "use sdpa".
    assert resolve_backend("auto", "cuda", torch.float16) == "sdpa"
    reason = attention._xformers_failure("cuda", torch.float16)
    assert reason.startswith("import failed")


def test_broken_xformers_requested_explicitly_says_why(broken_xformers) -> None:
    with pytest.raises(RuntimeError, match=r"unusable.*import failed"):
        resolve_backend("xformers", "cuda", torch.float16)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_on_cuda_prefers_working_xformers(fresh_probe) -> None:
    pytest.importorskip("xformers.ops")
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "xformers"


def _sdpa_reference(q, k, v, bias, scale=None):
    """torch's own sdpa (its math path here: the bias takes a gradient)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


@pytest.mark.parametrize(
    ("bias_batch", "bias_heads", "queries"), [(None, 3, 11), (1, 3, 11), (1, 1, 11), (None, 3, 4)]
)
def test_biased_attention_matches_torch_sdpa(bias_batch, bias_heads, queries) -> None:
    """Where the bias takes a gradient on CPU, ``sdpa`` runs its own biased attention: values and
    every gradient (the bias's summed over its broadcast dimensions) as torch's sdpa gives them,
    for a shared or per-sample bias, heads broadcast, and fewer queries than keys."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, keys, head_dim = 2, 3, 11, 8
    q = torch.randn(batch, heads, queries, head_dim, generator=gen)
    # k and v as the projections give them: views of a [B, N, H, Dh] tensor.
    k, v = (torch.randn(batch, keys, heads, head_dim, generator=gen).transpose(1, 2) for _ in "kv")
    bias = torch.randn(bias_batch or batch, bias_heads, queries, keys, generator=gen)
    if bias.shape[0] == batch:
        bias[-1, :, :, -3:] = float("-inf")
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
    twins = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
    out = attend(*leaves, "sdpa", scale=0.3)
    assert type(out.grad_fn).__name__ == "_BiasedAttentionBackward"
    reference = _sdpa_reference(*twins, scale=0.3)
    weights = torch.randn(out.shape, generator=gen)
    (out * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    for name, got, want in zip(("q", "k", "v", "bias"), leaves, twins):
        assert got.grad.shape == want.grad.shape, name
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6, msg=name)
    if bias.shape[0] == batch:
        assert leaves[3].grad[-1, :, :, -3:].abs().max() == 0  # masked keys take no gradient


def test_biased_attention_gives_fully_masked_rows_zeros_as_sdpa_does() -> None:
    q, k, v, bias = _inputs()
    bias = bias.detach().clone()
    bias[0, 1, 2, :] = float("-inf")  # query 2 of head 1 may attend no key
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
    twins = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
    out = attend(*leaves, "sdpa")
    assert type(out.grad_fn).__name__ == "_BiasedAttentionBackward"
    assert torch.isfinite(out).all() and out[0, 1, 2].abs().max() == 0
    reference = _sdpa_reference(*twins)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    reference.sum().backward()
    for got, want in zip(leaves, twins):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)
    assert leaves[0].grad[0, 1, 2].abs().max() == 0


def test_biased_attention_only_where_torch_sdpa_has_no_fused_kernel() -> None:
    q, k, v, bias = _inputs()
    frozen = bias.detach()
    assert type(attend(q, k, v, frozen, "sdpa").grad_fn).__name__ != "_BiasedAttentionBackward"
    with torch.no_grad():
        assert attend(q, k, v, bias, "sdpa").grad_fn is None
    assert type(attend(q, k, v, bias, "sdpa").grad_fn).__name__ == "_BiasedAttentionBackward"
    assert "Biased" not in type(attend(q, k, v, bias, "math").grad_fn).__name__
