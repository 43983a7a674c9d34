"""GeGLUFFN, LayerScale, DropPath, embedding_lookup and the fusion weight initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peace_core import layers
from peace_core.init import LINEAR_INIT_STD, SCRATCH_TRUNCATION, init_fusion_weights
from peace_core.layers import DropPath, GeGLUFFN, LayerScale, normed_linears


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


def _norm_and_linears(seed: int) -> tuple[nn.LayerNorm, list[nn.Linear]]:
    torch.manual_seed(seed)
    norm = nn.LayerNorm(16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    linears = [nn.Linear(16, 16), nn.Linear(16, 16, bias=False), nn.Linear(16, 8)]
    return norm, linears


@pytest.mark.parametrize("merge_heads", [False, True])
def test_normed_linears_keep_only_the_input_and_give_the_plain_gradients(
    merge_heads: bool,
) -> None:
    norm, linears = _norm_and_linears(0)
    shape = (3, 4, 5, 4) if merge_heads else (3, 5, 16)  # [B, H, N, d] or [B, N, D]
    x = torch.randn(*shape, requires_grad=True)

    def plain(x: torch.Tensor) -> list[torch.Tensor]:
        h = x.transpose(1, 2).reshape(3, 5, 16) if merge_heads else x
        return [linear(norm(h)) for linear in linears]

    inputs = [x, *norm.parameters(), *(p for linear in linears for p in linear.parameters())]
    weights = [torch.randn(3, 5, linear.out_features) for linear in linears]

    def loss(outputs: list[torch.Tensor]) -> torch.Tensor:
        return sum((out * w).sum() for out, w in zip(outputs, weights))

    got = torch.autograd.grad(
        loss(list(normed_linears(x, norm, linears, merge_heads=merge_heads))), inputs
    )
    want = torch.autograd.grad(loss(plain(x)), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for a, b in zip(normed_linears(x, norm, linears, merge_heads=merge_heads), plain(x)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    # What the graph keeps: the input, not a normalised [B, N, D] copy.
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        normed_linears(x, norm, linears, merge_heads=merge_heads)
    activations = [t for t in kept if t.shape[:1] == (3,)]
    assert len(activations) == 1 and activations[0].shape == x.shape


def test_normed_linears_only_some_outputs_used_and_under_autocast() -> None:
    norm, linears = _norm_and_linears(1)
    x = torch.randn(2, 7, 16, requires_grad=True)
    inputs = [x, *norm.parameters(), linears[0].weight, linears[0].bias]
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first = normed_linears(x, norm, linears)[0] if fused else linears[0](norm(x))
        assert first.dtype == torch.bfloat16
        results.append(torch.autograd.grad(first.float().square().sum(), inputs))
    for got, want in zip(*results):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------- embedding_lookup


def _tables(rows: int = 50, dim: int = 8, padding_idx: int | None = 3) -> tuple[nn.Embedding, ...]:
    torch.manual_seed(0)
    table = nn.Embedding(rows, dim, padding_idx=padding_idx)
    twin = nn.Embedding(rows, dim, padding_idx=padding_idx)
    twin.load_state_dict(table.state_dict())
    return table, twin


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_lookup_on_fresh_pages_matches_nn_embedding(monkeypatch, padding_idx):
    monkeypatch.setattr(layers, "FRESH_PAGES_MIN_BYTES", 0)
    table, twin = _tables(padding_idx=padding_idx)
    ids = torch.tensor([[1, 3, 7, 7], [3, 0, 49, 7]])  # repeats accumulate; 3 may be padding
    out = layers.embedding_lookup(table, ids)
    assert "LookupOnFreshPages" in type(out.grad_fn).__name__
    grad = torch.randn(2, 4, 8)
    (out * grad).sum().backward()
    (twin(ids) * grad).sum().backward()
    torch.testing.assert_close(out, twin(ids))
    torch.testing.assert_close(table.weight.grad, twin.weight.grad)
    # autograd adopted the gradient as it was built (on the mapped pages), without a copy
    assert not table.weight.grad.untyped_storage().resizable()
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[ids.unique()] = False
    assert table.weight.grad[untouched].abs().max() == 0
    if padding_idx is not None:
        assert table.weight.grad[padding_idx].abs().max() == 0


def test_embedding_lookup_gradient_accumulates_and_takes_in_place_updates(monkeypatch):
    monkeypatch.setattr(layers, "FRESH_PAGES_MIN_BYTES", 0)
    table, twin = _tables()
    optimizers = [torch.optim.AdamW(t.parameters(), lr=0.1) for t in (table, twin)]
    for ids in (torch.tensor([[1, 2, 2]]), torch.tensor([[2, 5, 9]])):  # two accumulated passes
        layers.embedding_lookup(table, ids).pow(2).sum().backward()
        twin(ids).pow(2).sum().backward()
    torch.testing.assert_close(table.weight.grad, twin.weight.grad)
    for t, optimizer in zip((table, twin), optimizers):
        torch.nn.utils.clip_grad_norm_(t.parameters(), 0.5)  # scales the gradient in place
        optimizer.step()
    torch.testing.assert_close(table.weight, twin.weight)


def test_embedding_lookup_takes_the_fresh_pages_only_where_they_pay():
    small, _ = _tables()  # far under the threshold
    ids = torch.tensor([[1, 2]])
    assert type(layers.embedding_lookup(small, ids).grad_fn).__name__ == "EmbeddingBackward0"
    rows = layers.FRESH_PAGES_MIN_BYTES // (4 * 64)
    large = nn.Embedding(rows, 64)
    assert "LookupOnFreshPages" in type(layers.embedding_lookup(large, ids).grad_fn).__name__
    with torch.no_grad():
        assert layers.embedding_lookup(large, ids).grad_fn is None
    scaled = nn.Embedding(rows, 64, scale_grad_by_freq=True)
    assert type(layers.embedding_lookup(scaled, ids).grad_fn).__name__ == "EmbeddingBackward0"
