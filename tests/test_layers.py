"""GeGLUFFN, LayerScale, DropPath and the fusion weight initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peace_core.init import LINEAR_INIT_STD, SCRATCH_TRUNCATION, init_fusion_weights
from peace_core.layers import DropPath, GeGLUFFN, LayerScale


def test_geglu_ffn_structure_and_formula() -> None:
    torch.manual_seed(0)
    ffn = GeGLUFFN(8, 24, eps=1e-6)
    assert ffn.wi_0.bias is None and ffn.wi_1.bias is None and ffn.wo.bias is not None
    assert ffn.wi_0.weight.shape == (24, 8) and ffn.wo.weight.shape == (8, 24)
    assert ffn.norm.normalized_shape == (24,) and ffn.norm.eps == 1e-6
    nn.init.normal_(ffn.norm.weight)
    nn.init.normal_(ffn.norm.bias)
    x = torch.randn(2, 5, 8)
    gated = F.gelu(x @ ffn.wi_0.weight.T, approximate="none") * (x @ ffn.wi_1.weight.T)
    normed = F.layer_norm(gated, (24,), ffn.norm.weight, ffn.norm.bias, eps=1e-6)
    expected = normed @ ffn.wo.weight.T + ffn.wo.bias
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-6)


def test_geglu_ffn_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="ffn_dim"):
        GeGLUFFN(8, 0)


def test_geglu_ffn_device_and_dtype() -> None:
    ffn = GeGLUFFN(4, 8, device="meta", dtype=torch.float16)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in ffn.parameters())


def test_layer_scale_multiplies_per_channel() -> None:
    scale = LayerScale(3, 0.5)
    assert torch.equal(scale.gamma.data, torch.full((3,), 0.5))
    with torch.no_grad():
        scale.gamma.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.ones(2, 4, 3)
    assert torch.equal(scale(x)[0, 0], torch.tensor([1.0, 2.0, 3.0]))
    scale.reset_parameters()
    assert torch.equal(scale.gamma.data, torch.full((3,), 0.5))


def test_drop_path_identity_in_eval_and_at_zero() -> None:
    x = torch.randn(4, 3, 2)
    assert DropPath(0.0).train()(x) is x
    assert DropPath(0.7).eval()(x) is x


def test_drop_path_drops_whole_samples_and_rescales() -> None:
    torch.manual_seed(0)
    drop = DropPath(0.5).train()
    x = torch.ones(256, 3, 2)
    out = drop(x)
    per_sample = out.reshape(256, -1)
    # Each sample is either all zero or all 1/keep: the mask is [B,1,1].
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2.0).all(1))
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert 0.35 < kept < 0.65
    # Unbiased on average.
    assert abs(out.mean().item() - 1.0) < 0.2


def test_drop_path_rejects_bad_probability() -> None:
    with pytest.raises(ValueError, match="DropPath"):
        DropPath(1.0)


def _filled_module() -> nn.Sequential:
    module = nn.Sequential(GeGLUFFN(64, 256), LayerScale(64, 1e-3), nn.LayerNorm(64))
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(5.0)
    return module


def test_init_fusion_weights_scratch_scales_with_fan_in() -> None:
    torch.manual_seed(0)
    module = _filled_module()
    init_fusion_weights(module, "scratch")
    ffn, scale, norm = module
    for linear in (ffn.wi_0, ffn.wi_1, ffn.wo):
        w = linear.weight
        std = linear.in_features**-0.5
        assert w.abs().max().item() <= SCRATCH_TRUNCATION * std
        # A normal cut at ±2 std keeps ~88 % of its spread.
        assert 0.8 * std < w.std().item() < std
    assert torch.equal(ffn.wo.bias, torch.zeros(64))
    assert torch.equal(norm.weight, torch.ones(64))
    assert torch.equal(scale.gamma.data, torch.full((64,), 1e-3))


def test_init_fusion_weights_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unknown init scheme 'xavier'"):
        init_fusion_weights(nn.Identity(), "xavier")  # type: ignore[arg-type]


def test_init_fusion_weights_official() -> None:
    torch.manual_seed(0)
    module = _filled_module()
    init_fusion_weights(module, "official")
    ffn, scale, norm = module
    for linear in (ffn.wi_0, ffn.wi_1, ffn.wo):
        w = linear.weight
        assert w.abs().max().item() <= LINEAR_INIT_STD
        # Truncated at ±1 std: the spread is well under 0.02 yet clearly non-zero.
        assert 0.005 < w.std().item() < LINEAR_INIT_STD
    assert torch.equal(ffn.wo.bias, torch.zeros(64))
    for ln in (ffn.norm, norm):
        assert torch.equal(ln.weight, torch.ones_like(ln.weight))
        assert torch.equal(ln.bias, torch.zeros_like(ln.bias))
    assert torch.equal(scale.gamma.data, torch.full((64,), 1e-3))


def test_geglu_recomputed_inner_part_gives_the_plain_gradients() -> None:
    torch.manual_seed(0)
    ffn = GeGLUFFN(16, 48)
    torch.nn.init.normal_(ffn.norm.weight, 1.0, 0.3)
    torch.nn.init.normal_(ffn.norm.bias, 0.0, 0.3)
    x = torch.randn(3, 5, 16, requires_grad=True)
    weights = torch.randn(3, 5, 16)

    def plain(x: torch.Tensor) -> torch.Tensor:
        return ffn.wo(ffn.norm(F.gelu(ffn.wi_0(x)) * ffn.wi_1(x)))

    inputs = [x, *ffn.parameters()]
    got = torch.autograd.grad((ffn(x) * weights).sum(), inputs)
    want = torch.autograd.grad((plain(x) * weights).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), plain(x), atol=0, rtol=0)


def test_geglu_backward_recomputes_under_the_forwards_autocast() -> None:
    torch.manual_seed(1)
    ffn = GeGLUFFN(16, 48)
    x = torch.randn(2, 7, 16, requires_grad=True)
    inputs = [x, *ffn.parameters()]
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ffn(x) if fused else ffn.wo(ffn.norm(F.gelu(ffn.wi_0(x)) * ffn.wi_1(x)))
        assert out.dtype == torch.bfloat16
        results.append(torch.autograd.grad(out.float().square().sum(), inputs))
    for got, want in zip(*results):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
