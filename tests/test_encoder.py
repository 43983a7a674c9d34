"""The fusion encoder: routing, block-diagonal bias, padding, backends, sizes, training, parity."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from peace_core.config import EncoderConfig, ModelConfig
from peace_core.encoder import (
    FusionBlock,
    FusionEncoder,
    Segment,
    SharedAttention,
    build_attention_bias,
)
from peace_core.layers import GeGLUFFN, LayerScale
from peace_core.presets import PRESETS, describe, get_preset
from peace_registry.contract import RelativePositions

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"
PARITY = FIXTURES / "one_peace_parity_a"

DIM, HEADS, FFN = 32, 4, 64


def make_encoder(
    modalities: tuple[str, ...] = ("text", "vision"),
    *,
    depth: int = 2,
    device: str | None = None,
    seed: int = 0,
    **overrides,
) -> FusionEncoder:
    torch.manual_seed(seed)  # deterministic weights whatever ran before
    config = EncoderConfig(dim=DIM, depth=depth, heads=HEADS, ffn_dim=FFN, **overrides)
    factories = {m: (lambda: GeGLUFFN(DIM, FFN, device=device)) for m in modalities}
    encoder = FusionEncoder(config, factories, device=device)
    # LayerScale 1e-6 would make every block almost the identity: use visible values in tests.
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, LayerScale):
                module.gamma.fill_(0.5)
    return encoder


def random_tables(count: int, rows: int = 12, seed: int = 0) -> list[nn.Embedding]:
    gen = torch.Generator().manual_seed(seed)
    tables = []
    for _ in range(count):
        table = nn.Embedding(rows, HEADS)
        with torch.no_grad():
            table.weight.copy_(torch.randn(rows, HEADS, generator=gen))
        tables.append(table)
    return tables


def distance_index(length: int, rows: int = 12) -> torch.Tensor:
    """A 1-D relative index that depends only on i - j (clamped), like the real buckets."""
    positions = torch.arange(length)
    half = (rows - 1) // 2
    return (positions[:, None] - positions[None, :]).clamp(-half, half) + half


def segment(
    modality: str,
    length: int,
    *,
    batch: int = 2,
    padded: int = 0,
    tables: list[nn.Embedding] | None = None,
    seed: int = 0,
    requires_grad: bool = False,
) -> Segment:
    """Random tokens with ``padded`` padding positions at the end of the last sample."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, DIM, generator=gen).requires_grad_(requires_grad)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    if padded:
        mask[-1, length - padded :] = True
    rel_pos = None if tables is None else RelativePositions(distance_index(length), tables)
    return Segment(modality, tokens, mask, rel_pos)


# ------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------


def test_parameter_names_match_the_converter_layout() -> None:
    keys = set(make_encoder().state_dict())
    for key in (
        "blocks.0.attn_norm.weight",
        "blocks.0.attn.q_proj.bias",
        "blocks.0.attn.k_proj.weight",
        "blocks.0.attn.v_proj.bias",
        "blocks.0.attn.inner_norm.weight",
        "blocks.0.attn.out_proj.bias",
        "blocks.0.attn_scale.gamma",
        "blocks.0.ffn_norm.bias",
        "blocks.1.ffns.text.wi_0.weight",
        "blocks.1.ffns.vision.norm.weight",
        "blocks.1.ffn_scale.gamma",
        "final_norms.vision.weight",
    ):
        assert key in keys, key
    assert "blocks.0.attn.k_proj.bias" not in keys


def test_drop_path_ramps_linearly_and_layer_scale_can_be_off() -> None:
    encoder = make_encoder(depth=5, drop_path=0.4, layer_scale_init=None)
    rates = [block.drop_path.p for block in encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert isinstance(encoder.blocks[0].attn_scale, nn.Identity)
    assert isinstance(encoder.blocks[0].ffn_scale, nn.Identity)


@pytest.mark.parametrize(
    ("scheme", "q_bound", "wo_bound"),
    [("official", 0.02, 0.02), ("scratch", 2 * DIM**-0.5, 2 * FFN**-0.5)],
)
def test_constructor_initialises_weights(scheme: str, q_bound: float, wo_bound: float) -> None:
    config = EncoderConfig(
        dim=DIM, depth=2, heads=HEADS, ffn_dim=FFN, layer_scale_init=1e-3, init=scheme
    )
    encoder = FusionEncoder(config, {"text": lambda: GeGLUFFN(DIM, FFN)})
    block = encoder.blocks[1]
    assert block.attn.q_proj.weight.abs().max() <= q_bound
    # Not a smaller scheme's values: the spread is over a third of the bound.
    assert block.attn.q_proj.weight.std() > q_bound / 3
    assert torch.equal(block.attn.q_proj.bias, torch.zeros(DIM))
    assert block.ffns["text"].wi_0.weight.abs().max() <= q_bound
    assert block.ffns["text"].wo.weight.abs().max() <= wo_bound
    assert torch.equal(block.attn_scale.gamma.data, torch.full((DIM,), 1e-3))


def test_one_peace_4b_parameter_count_on_meta() -> None:
    d, f, depth = 1536, 6144, 40
    config = EncoderConfig(dim=d, depth=depth, heads=24, ffn_dim=f, layer_scale_init=1e-6)
    modalities = ("vision", "audio", "text")
    factories = {m: (lambda: GeGLUFFN(d, f, device="meta")) for m in modalities}
    encoder = FusionEncoder(config, factories, device="meta")
    assert all(p.device.type == "meta" for p in encoder.parameters())

    shared = sum(
        p.numel() for n, p in encoder.blocks[0].named_parameters() if not n.startswith("ffns.")
    )
    ffn = sum(p.numel() for p in encoder.blocks[0].ffns["text"].parameters())
    # q/k/v/out (k without bias) + attn LN + Sub-LN + FFN LN + two LayerScales.
    assert shared == 4 * d * d + 3 * d + 3 * 2 * d + 2 * d == 9_454_080
    assert ffn == 3 * d * f + 2 * f + d == 28_325_376
    total = sum(p.numel() for p in encoder.parameters())
    assert total == depth * (shared + 3 * ffn) + 3 * 2 * d
    assert round(total / 1e9, 3) == 3.777


# ------------------------------------------------------------------------------------------------
# Routing
# ------------------------------------------------------------------------------------------------


def test_each_ffn_receives_exactly_its_segment_slice() -> None:
    encoder = make_encoder(("text", "vision", "audio"))
    seen: dict[str, list[torch.Tensor]] = {"norm": [], "text": [], "vision": [], "audio": []}
    block = encoder.blocks[0]
    block.ffn_norm.register_forward_hook(lambda m, i, o: seen["norm"].append(o))
    for name, ffn in block.ffns.items():
        ffn.register_forward_hook(lambda m, i, o, name=name: seen[name].append(i[0]))
    segments = [segment("vision", 5, seed=1), segment("text", 3, seed=2), segment("audio", 4)]
    encoder(segments)
    normed = seen["norm"][0]
    assert torch.equal(seen["vision"][0], normed[:, 0:5])
    assert torch.equal(seen["text"][0], normed[:, 5:8])
    assert torch.equal(seen["audio"][0], normed[:, 8:12])
    assert all(len(v) == 1 for v in seen.values())


def test_tokens_of_one_modality_never_reach_another_ffn() -> None:
    # One block: a text output depends on the vision FFN only through later layers, so none.
    encoder = make_encoder(depth=1)
    out = encoder([segment("text", 4), segment("vision", 6, seed=1)])
    out.hidden[0].square().sum().backward()
    vision_grads = [p.grad for p in encoder.blocks[0].ffns["vision"].parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in vision_grads)
    assert torch.count_nonzero(encoder.blocks[0].ffns["text"].wo.weight.grad) > 0

    encoder.zero_grad(set_to_none=True)
    encoder([segment("text", 4)]).hidden[0].sum().backward()
    assert all(p.grad is None for p in encoder.blocks[0].ffns["vision"].parameters())
    assert all(p.grad is None for p in encoder.final_norms["vision"].parameters())


def test_three_modalities_and_repeated_modalities_run() -> None:
    encoder = make_encoder(("text", "vision", "audio"))
    tables = random_tables(1)
    segments = [
        segment("text", 5, padded=2, tables=tables),
        segment("vision", 7, seed=1, tables=random_tables(1, seed=1)),
        segment("audio", 6, padded=1, seed=2),
        segment("text", 3, seed=3),
    ]
    out = encoder(segments, return_layer_states=True)
    assert [h.shape for h in out.hidden] == [(2, n, DIM) for n in (5, 7, 6, 3)]
    assert all(torch.isfinite(h).all() for h in out.hidden)
    assert [m is s.padding_mask for m, s in zip(out.padding_mask, segments)] == [True] * 4
    assert len(out.layer_states) == 2 and out.layer_states[-1].shape == (2, 21, DIM)
    # The hidden states are the last layer state, split and through each modality's final norm.
    last_audio = out.layer_states[-1][:, 12:18]
    torch.testing.assert_close(out.hidden[2], encoder.final_norms["audio"](last_audio))
    assert encoder(segments).layer_states is None


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_extra_padding_leaves_valid_outputs_unchanged(backend: str) -> None:
    encoder = make_encoder(attention=backend).eval()
    text_tables, vision_tables = random_tables(2), random_tables(2, seed=1)
    base = [segment("text", 5, tables=text_tables), segment("vision", 6, tables=vision_tables)]
    reference = encoder(base)

    def padded_copy(seg: Segment, extra: int, seed: int) -> Segment:
        garbage = torch.randn(2, extra, DIM, generator=torch.Generator().manual_seed(seed)) * 50
        tokens = torch.cat([seg.tokens, garbage], dim=1)
        mask = torch.cat([seg.padding_mask, torch.ones(2, extra, dtype=torch.bool)], dim=1)
        rel_pos = RelativePositions(distance_index(tokens.shape[1]), seg.rel_pos.tables)
        return Segment(seg.modality, tokens, mask, rel_pos)

    padded = [padded_copy(base[0], 3, seed=5), padded_copy(base[1], 2, seed=6)]
    out = encoder(padded)
    torch.testing.assert_close(out.hidden[0][:, :5], reference.hidden[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.hidden[1][:, :6], reference.hidden[1], rtol=1e-5, atol=1e-5)

    # Without key masking the padded positions are attended, so valid outputs change...
    unmasked = encoder(padded, mask_padding=False)
    assert (unmasked.hidden[0][:, :5] - reference.hidden[0]).abs().max() > 1e-3
    # ...but padded inputs are still zeroed first, so their content does not matter.
    other_garbage = [padded_copy(base[0], 3, seed=7), padded_copy(base[1], 2, seed=8)]
    again = encoder(other_garbage, mask_padding=False)
    for a, b in zip(again.hidden, unmasked.hidden):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Attention bias
# ------------------------------------------------------------------------------------------------


def test_bias_is_block_diagonal_with_masked_padded_keys() -> None:
    text_tables, vision_tables = random_tables(1), random_tables(1, seed=1)
    segments = [
        segment("text", 4, padded=1, tables=text_tables),
        segment("audio", 3),  # no relative positions: its diagonal block is 0
        segment("vision", 5, padded=2, tables=vision_tables),
    ]
    bias = build_attention_bias(segments, 0, heads=HEADS)
    assert bias.shape == (2, HEADS, 12, 12)
    expected_text = text_tables[0](distance_index(4)).permute(2, 0, 1)
    expected_vision = vision_tables[0](distance_index(5)).permute(2, 0, 1)

    sample0 = bias[0]  # no padding in sample 0
    torch.testing.assert_close(sample0[:, :4, :4], expected_text)
    torch.testing.assert_close(sample0[:, 7:, 7:], expected_vision)
    assert torch.count_nonzero(sample0[:, 4:7, 4:7]) == 0
    off_diagonal = torch.ones(12, 12, dtype=torch.bool)
    for start, stop in ((0, 4), (4, 7), (7, 12)):
        off_diagonal[start:stop, start:stop] = False
    assert torch.count_nonzero(sample0[:, off_diagonal]) == 0

    sample1 = bias[1]  # padded keys: text position 3, vision positions 10 and 11
    padded_keys = torch.tensor([3, 10, 11])
    assert torch.all(sample1[:, :, padded_keys] == float("-inf"))
    valid_keys = torch.tensor([i for i in range(12) if i not in (3, 10, 11)])
    torch.testing.assert_close(sample1[:, :, valid_keys], sample0[:, :, valid_keys])


def test_bias_without_padding_mask_keeps_padded_keys() -> None:
    segments = [segment("text", 4, padded=2, tables=random_tables(1))]
    bias = build_attention_bias(segments, 0, heads=HEADS, mask_padding=False)
    assert torch.isfinite(bias).all()
    assert bias.shape == (1, HEADS, 4, 4)  # [n,n] index and nothing masked: broadcast in B


def test_bias_shared_versus_per_layer_tables() -> None:
    per_layer = random_tables(3)
    segments = [segment("text", 4, tables=per_layer)]
    for layer in range(3):
        bias = build_attention_bias(segments, layer, heads=HEADS, mask_padding=False)
        expected = per_layer[layer](distance_index(4)).permute(2, 0, 1)
        torch.testing.assert_close(bias[0], expected)
    shared = [segment("text", 4, tables=per_layer[:1])]
    for layer in range(3):
        bias = build_attention_bias(shared, layer, heads=HEADS, mask_padding=False)
        torch.testing.assert_close(bias[0], per_layer[0](distance_index(4)).permute(2, 0, 1))


def test_bias_accepts_per_sample_index() -> None:
    tables = random_tables(1)
    index = torch.stack([distance_index(4), distance_index(4).flip(0)])
    seg = Segment("text", torch.randn(2, 4, DIM), torch.zeros(2, 4, dtype=torch.bool))
    seg.rel_pos = RelativePositions(index, tables)
    bias = build_attention_bias([seg], 0, heads=HEADS, mask_padding=False)
    assert bias.shape == (2, HEADS, 4, 4)
    torch.testing.assert_close(bias[1], tables[0](index[1]).permute(2, 0, 1))


def test_bias_is_none_or_key_only_without_relative_positions() -> None:
    plain = [segment("text", 4), segment("vision", 3)]
    assert build_attention_bias(plain, 0, heads=HEADS, mask_padding=False) is None
    padded = [segment("text", 4, padded=1), segment("vision", 3)]
    bias = build_attention_bias(padded, 0, heads=HEADS)
    assert bias.shape == (2, 1, 1, 7)
    assert torch.count_nonzero(bias[0]) == 0
    assert bias[1, 0, 0, 3] == float("-inf") and torch.count_nonzero(bias[1, 0, 0, :3]) == 0


def test_shared_bias_is_built_once_per_forward() -> None:
    encoder = make_encoder(depth=3)
    lookups = {"shared": 0, "per_layer": 0}

    def counting(tables: list[nn.Embedding], key: str) -> list[nn.Embedding]:
        for table in tables:
            table.register_forward_hook(lambda *_: lookups.__setitem__(key, lookups[key] + 1))
        return tables

    encoder([segment("text", 4, tables=counting(random_tables(1), "shared"))])
    encoder([segment("text", 4, tables=counting(random_tables(3), "per_layer"))])
    assert lookups == {"shared": 1, "per_layer": 3}


def test_per_layer_copies_of_a_shared_table_give_the_same_output() -> None:
    encoder = make_encoder(depth=3).eval()
    shared = random_tables(1)
    copies = [nn.Embedding.from_pretrained(shared[0].weight.detach().clone()) for _ in range(3)]
    a = encoder([segment("text", 6, padded=2, tables=shared)])
    b = encoder([segment("text", 6, padded=2, tables=copies)])
    torch.testing.assert_close(a.hidden[0], b.hidden[0])


# ------------------------------------------------------------------------------------------------
# Backends, checkpointing, compile, training
# ------------------------------------------------------------------------------------------------


def _loss_and_grads(encoder: FusionEncoder, backend: str, tables: list[nn.Embedding]):
    encoder.set_attention_backend(backend)
    encoder.zero_grad(set_to_none=True)
    for table in tables:
        table.weight.grad = None
    segments = [
        segment("text", 5, padded=2, tables=tables[:1], requires_grad=True),
        segment("vision", 7, padded=1, seed=1, tables=tables[1:], requires_grad=True),
    ]
    out = encoder(segments)
    weights = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(3))
    loss = (torch.cat(out.hidden, dim=1) * weights).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    grads["text_table"] = tables[0].weight.grad.clone()
    grads["vision_table"] = tables[1].weight.grad.clone()
    grads["text_tokens"] = segments[0].tokens.grad.clone()
    return torch.cat(out.hidden, dim=1).detach(), grads


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float, name: str) -> None:
    """Max abs difference within ``tol`` times the reference's magnitude (at least 1)."""
    scale = max(1.0, want.abs().max().item())
    error = (got - want).abs().max().item()
    assert error <= tol * scale, f"{name}: max error {error:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_math_and_sdpa_agree_through_the_encoder(seed: int) -> None:
    encoder = make_encoder(depth=2, seed=seed)
    tables = [random_tables(1, seed=seed)[0], random_tables(1, seed=seed + 10)[0]]
    out_math, grads_math = _loss_and_grads(encoder, "math", tables)
    out_sdpa, grads_sdpa = _loss_and_grads(encoder, "sdpa", tables)
    assert_close_to_scale(out_sdpa, out_math, 1e-5, "hidden")
    assert grads_math.keys() == grads_sdpa.keys()
    for name, grad in grads_math.items():
        assert_close_to_scale(grads_sdpa[name], grad, 1e-5, name)
    assert grads_math["text_table"].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers needs CUDA")
def test_xformers_agrees_through_the_encoder() -> None:
    pytest.importorskip("xformers.ops")
    encoder = make_encoder(depth=2, device="cuda")
    tables = [t.cuda() for t in (random_tables(1)[0], random_tables(1, seed=1)[0])]

    def run(backend: str):
        encoder.set_attention_backend(backend)
        encoder.zero_grad(set_to_none=True)
        for t in tables:
            t.weight.grad = None
        segs = [
            segment("text", 5, padded=2, tables=tables[:1]),
            segment("vision", 7, padded=1, seed=1, tables=tables[1:]),
        ]
        segs = [
            Segment(s.modality, s.tokens.cuda(), s.padding_mask.cuda(), s.rel_pos) for s in segs
        ]
        for s in segs:
            s.rel_pos.index = s.rel_pos.index.cuda()
        out = torch.cat(encoder(segs).hidden, dim=1)
        out.square().sum().backward()
        return out.detach(), [t.weight.grad.clone() for t in tables]

    out_math, table_grads_math = run("math")
    out_xf, table_grads_xf = run("xformers")
    torch.testing.assert_close(out_xf, out_math, rtol=1e-5, atol=1e-5)
    for a, b in zip(table_grads_xf, table_grads_math):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = make_encoder(depth=2, drop_path=0.3).train()
    checkpointed = make_encoder(depth=2, drop_path=0.3, grad_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    tables = [random_tables(1)[0], random_tables(1, seed=1)[0]]
    results = []
    for encoder in (plain, checkpointed):
        torch.manual_seed(1)  # same drop-path draws; checkpointing must replay them identically
        results.append(_loss_and_grads(encoder, "sdpa", tables))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


def _pass(encoder, tables, read, *, grad_checkpointing=False, **options):
    """One seeded forward of a padded text+vision pair with per-layer tables; ``read(hidden)``
    is the loss. Returns the hidden states and every gradient (parameters, tables, tokens)."""
    encoder.zero_grad(set_to_none=True)
    encoder.config = encoder.config.model_copy(update={"grad_checkpointing": grad_checkpointing})
    for table in tables:
        table.weight.grad = None
    segments = [
        segment("text", 5, padded=2, tables=tables[:2], requires_grad=True),
        segment("vision", 7, padded=1, seed=1, tables=tables[2:], requires_grad=True),
    ]
    torch.manual_seed(7)  # the same drop-path draws in every pass
    hidden = encoder(segments, **options).hidden
    read(hidden).backward()
    grads = {name: p.grad for name, p in encoder.named_parameters() if p.grad is not None}
    grads |= {f"table{i}": t.weight.grad for i, t in enumerate(tables)}
    grads |= {f"tokens{i}": s.tokens.grad for i, s in enumerate(segments)}
    return [h.detach() for h in hidden], grads


def _assert_same(got, want) -> None:
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert_close_to_scale(got[name], grad, 1e-5, name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_output_rows_compute_only_the_wanted_rows_with_the_same_values_and_gradients(
    checkpointing: bool,
) -> None:
    encoder = make_encoder(depth=2, drop_path=0.3).train()
    tables = random_tables(4)
    wanted = [
        torch.tensor([[0, 1, 0, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool),
        torch.tensor([[0, 0, 0, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool),
    ]
    weights = [torch.randn(2, n, DIM, generator=torch.Generator().manual_seed(n)) for n in (5, 7)]

    def read(hidden):
        return sum((h * w * m[..., None]).sum() for h, w, m in zip(hidden, weights, wanted))

    full, full_grads = _pass(encoder, tables, read)
    some, some_grads = _pass(
        encoder, tables, read, grad_checkpointing=checkpointing, output_rows=wanted
    )
    for got, want, mask in zip(some, full, wanted):
        assert got.shape == want.shape
        assert_close_to_scale(got[mask], want[mask], 1e-5, "wanted rows")
        assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    _assert_same(some_grads, full_grads)
    # None keeps every row of that segment.
    everything, _ = _pass(encoder, tables, read, output_rows=[None, wanted[1]])
    assert_close_to_scale(everything[0], full[0], 1e-5, "all rows")


def test_first_rows_grad_only_keeps_values_and_the_cls_gradients() -> None:
    encoder = make_encoder(depth=2, drop_path=0.3).train()
    tables = random_tables(4)
    weights = torch.randn(2, 2, DIM, generator=torch.Generator().manual_seed(5))

    def read(hidden):  # the CLS state of each segment, as the aligning contrast reads it
        return (torch.stack([h[:, 0] for h in hidden], dim=1) * weights).sum()

    full, full_grads = _pass(encoder, tables, read)
    first, first_grads = _pass(encoder, tables, read, first_rows_grad_only=True)
    for got, want in zip(first, full):  # every row, drop-path draws included
        assert_close_to_scale(got, want, 1e-5, "hidden")
    _assert_same(first_grads, full_grads)
    with pytest.raises(ValueError, match="not both"):
        encoder([segment("text", 3)], output_rows=[None], first_rows_grad_only=True)
    with pytest.raises(ValueError, match=r"output_rows for segment 'text' must be bool \[2,3\]"):
        encoder([segment("text", 3)], output_rows=[torch.ones(2, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="1 entries for 2 segments"):
        encoder([segment("text", 3), segment("vision", 2)], output_rows=[None])


def test_graph_is_whole_under_dynamo() -> None:
    encoder = make_encoder(depth=2).eval()
    tables = random_tables(1)
    segments = [segment("text", 5, padded=2, tables=tables), segment("vision", 4, seed=1)]
    compiled = torch.compile(encoder, backend="eager", fullgraph=True)
    expected = encoder(segments).hidden
    got = compiled(segments).hidden
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager() -> None:
    encoder = make_encoder(depth=2).train()
    tables = random_tables(1)
    segments = [segment("text", 5, padded=2, tables=tables), segment("vision", 4, seed=1)]
    compiled = torch.compile(encoder)
    got = compiled(segments).hidden
    torch.cat([g.flatten() for g in got]).sum().backward()
    expected = encoder(segments).hidden
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_tiny_encoder_learns_a_regression() -> None:
    torch.manual_seed(0)
    encoder = make_encoder(("text", "vision"), depth=2, attention="sdpa")
    tables = random_tables(1)
    optimizer = torch.optim.AdamW(
        [*encoder.parameters(), *tables[0].parameters()], lr=3e-3, weight_decay=0.0
    )
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(8, 6, DIM, generator=gen)
    vision = torch.randn(8, 5, DIM, generator=gen)
    target = torch.randn(8, DIM, generator=gen)
    no_pad = torch.zeros(8, 6, dtype=torch.bool)
    losses = []
    for _ in range(20):
        rel_pos = RelativePositions(distance_index(6), tables)
        segments = [
            Segment("text", text, no_pad, rel_pos),
            Segment("vision", vision, no_pad[:, :5]),
        ]
        cls = encoder(segments).hidden[0][:, 0]
        loss = (cls - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert tables[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_bad_segments_are_clear_errors() -> None:
    encoder = make_encoder(depth=2)
    with pytest.raises(KeyError, match=r"'audio'.*no FFN.*\['text', 'vision'\]"):
        encoder([segment("audio", 3)])
    with pytest.raises(ValueError, match="at least one segment"):
        encoder([])
    bad_dim = Segment("text", torch.randn(2, 3, DIM + 1), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"tokens must be \[B,N,{DIM}\]"):
        encoder([bad_dim])
    with pytest.raises(ValueError, match="batch size 3 differs"):
        encoder([segment("text", 3), segment("vision", 3, batch=3)])
    bad_mask = Segment("text", torch.randn(2, 3, DIM), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="padding_mask must be bool"):
        encoder([bad_mask])
    with pytest.raises(ValueError, match="1 shared or 2 per-layer"):
        encoder([segment("text", 3, tables=random_tables(3))])
    wrong_index = segment("text", 3, tables=random_tables(1))
    wrong_index.rel_pos.index = distance_index(4)
    with pytest.raises(ValueError, match=r"index must be \[3,3\]"):
        encoder([wrong_index])
    wrong_heads = segment("text", 3)
    wrong_heads.rel_pos = RelativePositions(distance_index(3), [nn.Embedding(12, HEADS + 1)])
    with pytest.raises(ValueError, match="one per head"):
        encoder([wrong_heads])


def test_bad_construction_is_a_clear_error() -> None:
    config = EncoderConfig(dim=DIM, depth=1, heads=HEADS, ffn_dim=FFN)
    with pytest.raises(ValueError, match="at least one modality"):
        FusionEncoder(config, {})
    with pytest.raises(ValueError, match="invalid modality name 'Text'"):
        FusionEncoder(config, {"Text": lambda: GeGLUFFN(DIM, FFN)})
    with pytest.raises(TypeError, match="factory for 'text' returned int"):
        FusionEncoder(config, {"text": lambda: 3})
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        SharedAttention(DIM, HEADS, backend="flash")
    with pytest.raises(ValueError, match="divisible"):
        SharedAttention(DIM, 5)
    with pytest.raises(ValueError, match="at least one"):
        FusionBlock(DIM, HEADS, nn.ModuleDict(), layer_scale_init=None)


# ------------------------------------------------------------------------------------------------
# Parity with the official implementation (fixture computed by the official code)
# ------------------------------------------------------------------------------------------------

_OFFICIAL_MODALITY = {"text": "text", "image": "vision", "audio": "audio"}
_FFN_PARTS = {"0.wi_0": "wi_0", "0.wi_1": "wi_1", "2": "norm", "3": "wo"}


def _official_fusion_state(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the fixture's ``fusion_model.*`` keys onto this encoder's names (test-local)."""
    prefix = "encoder_wrapper.fusion_model."
    simple = {
        "self_attn_layer_norm": "attn_norm",
        "final_layer_norm": "ffn_norm",
        "self_attn.ln": "attn.inner_norm",
        "gamma_1": "attn_scale.gamma",
        "gamma_2": "ffn_scale.gamma",
    }
    state = {}
    for key, value in model.items():
        if not key.startswith(prefix) or key.endswith("version"):
            continue
        key = key[len(prefix) :]
        if m := re.fullmatch(r"(text|image|audio)_layer_norm\.(\w+)", key):
            state[f"final_norms.{_OFFICIAL_MODALITY[m[1]]}.{m[2]}"] = value
            continue
        layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", key).groups()
        if m := re.fullmatch(r"(text|image|audio)_ffn\.(0\.wi_0|0\.wi_1|2|3)\.(\w+)", rest):
            rest = f"ffns.{_OFFICIAL_MODALITY[m[1]]}.{_FFN_PARTS[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"self_attn\.(\w+_proj)\.(\w+)", rest):
            rest = f"attn.{m[1]}.{m[2]}"
        elif rest in simple:  # gamma_1 / gamma_2
            rest = simple[rest]
        else:
            stem, leaf = rest.rsplit(".", 1)
            rest = f"{simple[stem]}.{leaf}"
        state[f"blocks.{layer}.{rest}"] = value
    return state


@pytest.fixture(scope="module")
def official():
    if not PARITY.is_dir():
        pytest.skip(f"parity fixture not found at {PARITY}")
    model = torch.load(PARITY / "checkpoint.pt", weights_only=True)["model"]
    expected = torch.load(PARITY / "expected.pt", weights_only=True)
    config = EncoderConfig(dim=64, depth=2, heads=4, ffn_dim=128, attention="sdpa")
    factories = {m: (lambda: GeGLUFFN(64, 128)) for m in ("text", "vision", "audio")}
    encoder = FusionEncoder(config, factories).eval()
    encoder.load_state_dict(_official_fusion_state(model), strict=True)
    return encoder, model, expected


def _official_segments(model, expected, *names: str) -> list[Segment]:
    from peace_core.rel_pos import token_bucket_index

    def table(adapter: str) -> list[nn.Embedding]:
        weight = model[f"encoder_wrapper.{adapter}_adapter.rel_pos_table_list.0.weight"]
        return [nn.Embedding.from_pretrained(weight)]

    segments = []
    for name in names:
        tokens = expected[f"{name}_adapter_out"]
        mask = expected[f"{name}_padding_mask"]
        length = tokens.shape[1]
        if name == "image":
            index = model["encoder_wrapper.image_adapter.rp_bucket"]
        else:
            index = token_bucket_index(length, 16 if name == "text" else 32)
        modality = _OFFICIAL_MODALITY[name]
        segments.append(Segment(modality, tokens, mask, RelativePositions(index, table(name))))
    return segments


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("names", [("text",), ("image",), ("audio",), ("text", "image")])
def test_matches_the_official_fusion_encoder(official, backend: str, names: tuple) -> None:
    encoder, model, expected = official
    encoder.set_attention_backend(backend)
    with torch.no_grad():
        out = encoder(_official_segments(model, expected, *names), return_layer_states=True)
    if len(names) == 1:
        (name,) = names
        want, mask = expected[f"{name}_hidden"], expected[f"{name}_padding_mask"]
        got = out.hidden[0]
        states = expected[f"{name}_layer_states"]
        for layer, state in enumerate(out.layer_states):
            torch.testing.assert_close(state[~mask], states[layer][~mask], rtol=1e-5, atol=1e-5)
    else:
        want, mask = expected["vl_hidden"], expected["vl_padding_mask"]
        got = torch.cat(out.hidden, dim=1)
    torch.testing.assert_close(got[~mask], want[~mask], rtol=1e-5, atol=1e-5)


def test_matches_the_official_joint_text_audio(official) -> None:
    encoder, model, expected = official
    encoder.set_attention_backend("sdpa")
    with torch.no_grad():
        out = encoder(_official_segments(model, expected, "text", "audio"))
    got, mask = torch.cat(out.hidden, dim=1), expected["al_padding_mask"]
    torch.testing.assert_close(got[~mask], expected["al_hidden"][~mask], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_model_configs(name: str) -> None:
    config = ModelConfig(**get_preset(name))
    assert config.name == name
    assert config.modalities == {}  # presets name no modality: built by name, all installed ones
    assert describe(name) == PRESETS[name]["description"] and len(describe(name)) > 10


def test_preset_sizes() -> None:
    sizes = {
        name: ModelConfig(**get_preset(name)).encoder for name in ("tiny", "base", "one-peace-4b")
    }
    assert (sizes["tiny"].dim, sizes["tiny"].depth, sizes["tiny"].heads) == (128, 2, 4)
    assert sizes["tiny"].ffn_dim == 256
    assert (sizes["base"].dim, sizes["base"].depth, sizes["base"].ffn_dim) == (768, 12, 3072)
    official = sizes["one-peace-4b"]
    assert (official.dim, official.depth, official.heads, official.ffn_dim) == (1536, 40, 24, 6144)
    assert official.layer_scale_init == 1e-6 and official.drop_path == 0.4
    assert official.rel_pos_tables == "shared"


def test_tiny_preset_builds_and_runs() -> None:
    config = ModelConfig(**get_preset("tiny")).encoder
    encoder = FusionEncoder(config, {"text": lambda: GeGLUFFN(config.dim, config.ffn_dim)})
    tokens = torch.randn(2, 5, config.dim)
    out = encoder([Segment("text", tokens, torch.zeros(2, 5, dtype=torch.bool))])
    assert out.hidden[0].shape == (2, 5, 128)


def test_get_preset_is_a_copy_and_unknown_names_suggest() -> None:
    preset = get_preset("tiny")
    preset["encoder"]["dim"] = 3
    assert PRESETS["tiny"]["config"]["encoder"]["dim"] == 128
    with pytest.raises(KeyError, match="did you mean 'tiny'"):
        get_preset("tiyn")
    with pytest.raises(KeyError, match="available presets"):
        describe("huge")


@pytest.mark.slow
def test_compiled_blocks_match_eager_outputs_and_gradients() -> None:
    eager = make_encoder(depth=2)
    compiled = make_encoder(depth=2, compile=True)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # names unchanged
    compiled.load_state_dict(eager.state_dict())
    tables = random_tables(2)
    for padded in (0, 2):  # the second shape recompiles
        segs = [
            segment("text", 5, padded=padded, tables=tables[:1], requires_grad=True),
            segment("vision", 9, seed=1, tables=tables[1:]),
        ]
        results = []
        for encoder in (eager, compiled):
            out = torch.cat(encoder(segs).hidden, dim=1)
            grads = torch.autograd.grad(out.square().sum(), [segs[0].tokens, *encoder.parameters()])
            results.append((out, grads))
        (out_eager, grads_eager), (out_compiled, grads_compiled) = results
        assert_close_to_scale(out_compiled, out_eager, 1e-5, "hidden")
        for got, want in zip(grads_compiled, grads_eager):
            assert_close_to_scale(got, want, 1e-5, "gradient")


def test_meta_device_context_builds_an_encoder_without_values() -> None:
    with torch.device("meta"):
        config = EncoderConfig(dim=DIM, depth=3, heads=HEADS, ffn_dim=FFN, drop_path=0.2)
        encoder = FusionEncoder(config, {"text": lambda: GeGLUFFN(DIM, FFN)})
    assert all(p.is_meta for p in encoder.parameters())
    assert [block.drop_path.p for block in encoder.blocks] == pytest.approx([0.0, 0.1, 0.2])
