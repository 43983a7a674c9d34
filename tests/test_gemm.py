"""The fp32 CPU GEMM library choice (peace_core.gemm): selection, errors, exactness, fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peace_core import gemm

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")


def test_auto_picks_onednn_on_amd_and_blas_elsewhere(monkeypatch):
    monkeypatch.setattr(gemm.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(gemm, "onednn_available", lambda: True)
    assert gemm.resolve_cpu_gemm("auto", vendor="AuthenticAMD")[0] == "onednn"
    assert gemm.resolve_cpu_gemm("auto", vendor="GenuineIntel") == ("blas", "auto")
    assert gemm.resolve_cpu_gemm("auto", vendor="")[0] == "blas"
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    assert gemm.resolve_cpu_gemm("auto", vendor="AuthenticAMD")[0] == "blas"
    monkeypatch.setattr(gemm.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(gemm, "onednn_available", lambda: True)
    assert gemm.resolve_cpu_gemm("auto", vendor="AuthenticAMD")[0] == "blas"


def test_cpu_vendor_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert gemm._cpu_vendor(cpuinfo) == "AuthenticAMD"
    assert gemm._cpu_vendor(tmp_path / "missing") == ""


def test_bad_choices_are_refused_by_name(monkeypatch, backend):
    with pytest.raises(ValueError, match=r"PEACE_CPU_GEMM='mkl'.*auto, blas, onednn"):
        backend("mkl")
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    with pytest.raises(ValueError, match="no oneDNN linear kernel"):
        backend("onednn")


def test_environment_variable_sets_the_backend(monkeypatch, backend):
    gemm._state.clear()
    monkeypatch.setenv(gemm.CPU_GEMM_ENV_VAR, "blas")
    assert gemm.cpu_gemm() == "blas"
    assert gemm.describe_cpu_gemm() == "blas (chosen; PEACE_CPU_GEMM to change)"
    gemm._state.clear()
    monkeypatch.setenv(gemm.CPU_GEMM_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="PEACE_CPU_GEMM='fast'"):
        gemm.cpu_gemm()


def _grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(t is not None) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), [leaf.grad for leaf in leaves]


def _transposed_storage(weight: torch.Tensor) -> torch.Tensor:
    return weight.t().contiguous().t()


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("out_features", [40, 10])
def test_onednn_linear_matches_blas_values_and_gradients(backend, shape, with_bias, out_features):
    backend("onednn")
    torch.manual_seed(0)
    x, weight = torch.randn(shape), torch.randn(out_features, 24)
    if out_features < 24:  # a down projection, stored as gemm.Linear stores it
        weight = _transposed_storage(weight)
    bias = torch.randn(out_features) if with_bias else None
    inputs = (x, weight) + ((bias,) if with_bias else ())
    ours, ours_grads = _grads(gemm.linear, *inputs)
    reference, reference_grads = _grads(F.linear, *inputs)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = gemm.linear(x.requires_grad_(), weight, bias)
    assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward"


@needs_onednn
def test_onednn_reads_weights_updated_in_place(backend):
    backend("onednn")
    x, weight = torch.randn(6, 8), torch.randn(4, 8)
    before = gemm.linear(x, weight)
    with torch.no_grad():
        weight.mul_(-2.0)
    after = gemm.linear(x, weight)
    torch.testing.assert_close(after, before * -2.0, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_backward_helpers_match_matmul(backend):
    backend("onednn")
    grad, weight, flat_input = torch.randn(9, 12), torch.randn(12, 5), torch.randn(9, 5)
    torch.testing.assert_close(gemm.input_grad(grad, weight), grad @ weight)
    for layout in (weight, _transposed_storage(weight)):
        got = gemm.weight_grad(grad, flat_input, layout)
        torch.testing.assert_close(got, grad.t() @ flat_input)
        assert got.stride() == layout.stride()  # autograd accumulates it without a copy


def test_down_projections_store_their_weight_transposed():
    for in_features, out_features, transposed in [(16, 4, True), (4, 16, False), (8, 8, False)]:
        torch.manual_seed(0)
        ours = gemm.Linear(in_features, out_features)
        torch.manual_seed(0)
        plain = nn.Linear(in_features, out_features)
        assert gemm.stored_transposed(ours.weight) is transposed
        assert ours.weight.shape == plain.weight.shape
        assert torch.equal(ours.weight, plain.weight)  # the same init, only the strides differ
    # Loading keeps the layout, copied in or assigned, and so does an optimizer step.
    down = gemm.Linear(16, 4)
    weight = down.weight
    state = {key: torch.randn_like(value).contiguous() for key, value in down.state_dict().items()}
    down.load_state_dict(state)
    assert down.weight is weight and gemm.stored_transposed(down.weight)
    assert torch.equal(down.weight, state["weight"])
    down.load_state_dict(state, assign=True)
    assert gemm.stored_transposed(down.weight) and torch.equal(down.weight, state["weight"])
    optimizer = torch.optim.AdamW(down.parameters(), lr=0.1)
    down(torch.randn(3, 16)).sum().backward()
    assert down.weight.grad.stride() == down.weight.stride()
    optimizer.step()
    assert gemm.stored_transposed(down.weight)
    assert not torch.equal(down.weight, state["weight"])
    # The state dict reads as any nn.Linear's.
    plain = nn.Linear(16, 4)
    plain.load_state_dict(down.state_dict())
    x = torch.randn(2, 16)
    torch.testing.assert_close(plain(x), down(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_other_dtypes_autocast_and_empty_inputs_keep_torch_linear(backend):
    backend("onednn")
    weight = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    x64 = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(gemm.linear(x64, weight), F.linear(x64, weight))
    x, w32 = torch.randn(3, 8, requires_grad=True), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gemm.linear(x, w32)
    assert out.dtype == torch.bfloat16  # autocast's own linear ran
    empty = gemm.linear(torch.randn(0, 8), w32)
    assert empty.shape == (0, 4)


def test_blas_backend_is_torch_linear_exactly(backend):
    backend("blas")
    x, weight, bias = torch.randn(3, 5, 8), torch.randn(4, 8), torch.randn(4)
    assert torch.equal(gemm.linear(x, weight, bias), F.linear(x, weight, bias))
    assert torch.equal(gemm.linear_no_grad(x, weight, bias), F.linear(x, weight, bias))


def test_linear_module_is_an_nn_linear_with_the_same_state():
    torch.manual_seed(0)
    ours = gemm.Linear(8, 4)
    plain = nn.Linear(8, 4)
    plain.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Linear)
    assert list(ours.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_flop_counter_counts_onednn_gemms_as_blas_ones(backend):
    from torch.utils.flop_counter import FlopCounterMode

    x, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    counts = {}
    for name in ("blas", "onednn"):
        backend(name)
        with FlopCounterMode(display=False) as counter:
            gemm.linear(x, weight).sum().backward()
        counts[name] = counter.get_total_flops()
    assert counts["onednn"] == counts["blas"] == 3 * 2 * 10 * 8 * 4
