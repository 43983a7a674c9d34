"""The conformance suite every modality plugin runs.

In a plugin's tests::

    from peace_registry.conformance import ModalityConformance

    class TestVisionConformance(ModalityConformance):
        modality = "vision"

Each ``check_*`` function is plain Python raising ``AssertionError`` with a message saying what is
wrong, so ``peace plugins check`` runs the same checks without pytest. Everything is tiny (dim 32,
4 heads, depth 2, FFN 64) and fp32, to stay fast on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from peace_registry.contract import AdapterOutput, BuildContext, ModalitySpec, RelativePositions
from peace_registry.registry import Registry, get_registry

TINY_DIM = 32
TINY_HEADS = 4
TINY_DEPTH = 2
TINY_FFN_DIM = 64

Batch = dict[str, torch.Tensor]


@dataclass
class ConformanceSubject:
    """One modality under test: its spec, default options and a preprocessed example batch."""

    registry: Registry
    modality: str
    batch_size: int = 4
    seed: int = 0
    #: Non-default option values the components are built with (e.g. a path a test provides).
    option_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: Named variants to check instead of the defaults, by kind: ``{"masker": "block"}``.
    variants: Mapping[str, str] = field(default_factory=dict)
    _batch: Batch | None = field(default=None, repr=False)
    _reference: tuple[nn.Module, AdapterOutput] | None = field(default=None, repr=False)

    @property
    def spec(self) -> ModalitySpec:
        return self.registry.modality(self.modality)

    def options(self) -> BaseModel:
        return self.spec.options(**{**self.spec.check_options, **self.option_overrides})

    def context(self, *, num_bias_tables: int = 1, device: str | None = None) -> BuildContext:
        return BuildContext(
            modality=self.modality,
            dim=TINY_DIM,
            heads=TINY_HEADS,
            depth=TINY_DEPTH,
            ffn_dim=TINY_FFN_DIM,
            num_bias_tables=num_bias_tables,
            options=self.options(),
            device=device,
        )

    def preprocessor(self) -> Any:
        variant = self.variants.get("preprocessor")
        return self.registry.preprocessor(self.modality, variant).build(self.options())

    def batch(self) -> Batch:
        """A collated batch of ``examples(batch_size, seed)``; a fresh copy on every call so a
        component that modifies its input cannot affect later checks."""
        if self._batch is None:
            preprocessor = self.preprocessor()
            samples = [
                preprocessor(item) for item in preprocessor.examples(self.batch_size, self.seed)
            ]
            self._batch = dict(preprocessor.collate(samples))
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._batch.items()}

    def build_adapter(self, *, num_bias_tables: int = 1, device: str | None = None) -> nn.Module:
        ctx = self.context(num_bias_tables=num_bias_tables, device=device)
        adapter = self.registry.adapter(self.modality, self.variants.get("adapter")).build(ctx)
        assert isinstance(adapter, nn.Module), (
            f"{self.modality} adapter build() returned {type(adapter).__name__}, not an nn.Module"
        )
        return adapter

    def build_masker(self) -> Any:
        return self.registry.masker(self.modality, self.variants.get("masker")).build(
            self.context()
        )

    def ffn_spec(self) -> Any:
        return self.registry.ffn(self.modality, self.variants.get("ffn"))

    def encode(self, adapter: nn.Module, **kwargs: Any) -> AdapterOutput:
        out = adapter(self.batch(), **kwargs)
        assert isinstance(out, AdapterOutput), (
            f"{self.modality} adapter returned {type(out).__name__}, expected AdapterOutput"
        )
        return out

    def reference(self) -> tuple[nn.Module, AdapterOutput]:
        """An eval-mode adapter (one shared table) and its output on the batch, built once: the
        checks that only read them share them, which keeps heavy modalities fast."""
        if self._reference is None:
            adapter = self.build_adapter().eval()
            with torch.no_grad():
                self._reference = (adapter, self.encode(adapter))
        return self._reference

    def padding_mask(self) -> torch.Tensor:
        return self.reference()[1].padding_mask.clone()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_modality_spec(subject: ConformanceSubject) -> None:
    spec = subject.spec
    assert isinstance(spec, ModalitySpec), f"modality spec is {type(spec).__name__}"
    assert spec.name == subject.modality, f"spec.name {spec.name!r} != {subject.modality!r}"
    assert spec.input_keys, "input_keys is empty"
    assert issubclass(spec.options, BaseModel), "options must be a pydantic model class"
    spec.options()  # every field needs a default
    try:
        spec.options(**{**subject.option_overrides, "surely_not_an_option": 1})
    except ValidationError:
        pass
    else:
        raise AssertionError(f'{spec.options.__name__} accepts unknown fields: set extra="forbid"')


def check_preprocessor(subject: ConformanceSubject) -> None:
    preprocessor = subject.preprocessor()
    decoders = getattr(preprocessor, "decoders", None)
    assert isinstance(decoders, Mapping), "preprocessor.decoders must be a mapping"
    missing = [ext for ext in subject.spec.file_extensions if ext not in decoders]
    assert not missing, f"file extensions {missing} of the modality spec have no decoder"
    examples = preprocessor.examples(subject.batch_size, subject.seed)
    assert len(examples) == subject.batch_size, (
        f"examples({subject.batch_size}, {subject.seed}) returned {len(examples)} items"
    )
    first = [preprocessor(item) for item in examples]
    again = [preprocessor(item) for item in preprocessor.examples(subject.batch_size, subject.seed)]
    for index, (sample, repeat) in enumerate(zip(first, again)):
        assert isinstance(sample, Mapping) and sample, f"example {index} preprocessed to {sample!r}"
        for key, value in sample.items():
            assert isinstance(value, torch.Tensor), f"sample[{key!r}] is {type(value).__name__}"
            torch.testing.assert_close(
                value,
                repeat[key],
                msg=f"examples(count, seed) or preprocessing of {key!r} is "
                "not deterministic (train=False)",
            )
    bad_input = object()
    try:
        preprocessor(bad_input)
    except (TypeError, ValueError, LookupError, OSError) as exc:
        assert str(exc), "the error for a bad input has no message"
    else:
        raise AssertionError("preprocessing object() did not raise TypeError/ValueError")


def check_collate(subject: ConformanceSubject) -> None:
    batch = subject.batch()
    missing = [k for k in subject.spec.input_keys if k not in batch]
    assert not missing, f"collated batch lacks input_keys {missing} (has {sorted(batch)})"
    for key in subject.spec.input_keys:
        value = batch[key]
        assert isinstance(value, torch.Tensor), f"batch[{key!r}] is {type(value).__name__}"
        assert value.shape[0] == subject.batch_size, (
            f"batch[{key!r}] has leading size {value.shape[0]}, expected {subject.batch_size}"
        )


def _check_rel_pos(
    rel_pos: RelativePositions, adapter: nn.Module, *, size: int, length: int, tables: int
) -> None:
    index = rel_pos.index
    assert index.dtype == torch.long, f"rel_pos.index dtype is {index.dtype}, expected long"
    assert tuple(index.shape) in ((length, length), (size, length, length)), (
        f"rel_pos.index shape {tuple(index.shape)}, expected [{length},{length}] or "
        f"[{size},{length},{length}]"
    )
    assert len(rel_pos.tables) == tables, (
        f"{len(rel_pos.tables)} relative-position tables, expected num_bias_tables={tables}"
    )
    owned = {id(p) for p in adapter.parameters()}
    for number, table in enumerate(rel_pos.tables):
        assert isinstance(table, nn.Embedding), f"table {number} is {type(table).__name__}"
        assert table.embedding_dim == TINY_HEADS, (
            f"table {number} has {table.embedding_dim} columns, expected heads={TINY_HEADS}"
        )
        assert table.num_embeddings == rel_pos.tables[0].num_embeddings, "tables differ in rows"
        assert id(table.weight) in owned, f"table {number} is not a parameter of the adapter"
    if index.numel() and not index.is_meta:
        rows = rel_pos.tables[0].num_embeddings
        low, high = int(index.min()), int(index.max())
        assert low >= 0 and high < rows, f"rel_pos.index spans {low}..{high}, table has {rows} rows"


def check_adapter_forward(subject: ConformanceSubject, *, num_bias_tables: int = 1) -> None:
    if num_bias_tables == 1:
        adapter, out = subject.reference()
    else:
        adapter = subject.build_adapter(num_bias_tables=num_bias_tables).eval()
        with torch.no_grad():
            out = subject.encode(adapter)
    tokens, padding = out.tokens, out.padding_mask
    size = subject.batch_size
    assert tokens.ndim == 3 and tokens.shape[0] == size and tokens.shape[2] == TINY_DIM, (
        f"tokens shape {tuple(tokens.shape)}, expected [{size}, N, {TINY_DIM}]"
    )
    assert tokens.dtype == torch.float32, f"tokens dtype {tokens.dtype}, expected float32"
    assert torch.isfinite(tokens).all(), "tokens contain NaN or inf"
    length = tokens.shape[1]
    assert padding.dtype == torch.bool, f"padding_mask dtype {padding.dtype}, expected bool"
    assert tuple(padding.shape) == (size, length), (
        f"padding_mask shape {tuple(padding.shape)}, expected [{size}, {length}]"
    )
    assert not padding[:, 0].any(), "the CLS token (position 0) is marked as padding"
    if out.rel_pos is not None:
        _check_rel_pos(out.rel_pos, adapter, size=size, length=length, tables=num_bias_tables)


def check_adapter_precompute(subject: ConformanceSubject) -> bool:
    """An adapter's optional ``precompute`` (API 1.4) changes nothing: ``forward`` of its result
    equals ``forward`` of the batch, with and without ``keep``. False when there is none."""
    adapter, full = subject.reference()
    if getattr(adapter, "precompute", None) is None:
        return False
    keep = _random_keep(full.padding_mask, _generator(subject.seed))
    with torch.no_grad():
        prepared = adapter.precompute(subject.batch())
        for kwargs in ({}, {"keep": keep}):
            direct = subject.encode(adapter, **kwargs)
            shared = adapter(prepared, **kwargs)
            assert isinstance(shared, AdapterOutput), (
                f"forward of precompute()'s batch returned {type(shared).__name__}"
            )
            where = "with keep" if kwargs else "without keep"
            assert torch.allclose(shared.tokens, direct.tokens, atol=1e-6, rtol=1e-5), (
                f"{where}, forward(precompute(batch)) differs from forward(batch)"
            )
            assert torch.equal(shared.padding_mask, direct.padding_mask), (
                f"{where}, precompute changes the padding mask"
            )
    return True


def _random_keep(padding: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per sample: CLS plus a random subset of its valid positions (sample 0: CLS only, so that
    some rows are padded), sorted, padded with -1 to the longest."""
    rows = []
    for row, pad in enumerate(padding):
        valid = (~pad).nonzero().flatten()[1:]
        count = 0 if row == 0 else int(torch.randint(0, len(valid) + 1, (1,), generator=generator))
        chosen = valid[torch.randperm(len(valid), generator=generator)[:count]]
        rows.append(torch.cat([torch.zeros(1, dtype=torch.long), chosen.sort().values]))
    width = max(len(r) for r in rows)
    keep = torch.full((len(rows), width), -1, dtype=torch.long)
    for row, kept in enumerate(rows):
        keep[row, : len(kept)] = kept
    return keep


def check_adapter_keep(subject: ConformanceSubject) -> None:
    adapter, full = subject.reference()
    with torch.no_grad():
        keep = _random_keep(full.padding_mask, _generator(subject.seed))
        kept = subject.encode(adapter, keep=keep)
    size, width = keep.shape
    assert tuple(kept.tokens.shape) == (size, width, TINY_DIM), (
        f"with keep [{size},{width}], tokens shape is {tuple(kept.tokens.shape)}, expected "
        f"[{size}, {width}, {TINY_DIM}]"
    )
    assert kept.padding_mask.dtype == torch.bool
    assert torch.equal(kept.padding_mask, keep < 0), (
        "with keep, padding_mask must be True exactly at keep == -1 (all kept positions are valid)"
    )
    if full.rel_pos is None:
        assert kept.rel_pos is None, "rel_pos appears only when keep is given"
        return
    assert kept.rel_pos is not None, "rel_pos disappears when keep is given"
    full_index = full.rel_pos.index.expand(size, *full.rel_pos.index.shape[-2:])
    kept_index = kept.rel_pos.index.expand(size, width, width)
    safe = keep.clamp(min=0)
    expected = torch.stack([full_index[b][safe[b][:, None], safe[b][None, :]] for b in range(size)])
    pairs = (keep >= 0)[:, :, None] & (keep >= 0)[:, None, :]
    assert torch.equal(kept_index[pairs], expected[pairs]), (
        "relative-position indices with keep must equal the full sequence's indices at the kept "
        "positions (distances of the original positions)"
    )


def _masker_inputs(subject: ConformanceSubject) -> tuple[Any, Batch, torch.Tensor, torch.Tensor]:
    masker = subject.build_masker()
    batch, padding = subject.batch(), subject.padding_mask()
    units = masker.units(batch, padding)
    assert units.dtype == torch.long and units.shape == padding.shape, (
        f"units() gave {units.dtype} {tuple(units.shape)}, expected long {tuple(padding.shape)}"
    )
    assert (units[:, 0] == -1).all(), "units() must be -1 at CLS (position 0)"
    assert (units[padding] == -1).all(), "units() must be -1 at padding"
    return masker, batch, padding, units


def _check_mask_valid(
    mask: torch.Tensor, padding: torch.Tensor, units: torch.Tensor, view: str
) -> None:
    assert mask.dtype == torch.bool and mask.shape == padding.shape, (
        f"{view} mask is {mask.dtype} {tuple(mask.shape)}, expected bool {tuple(padding.shape)}"
    )
    assert not mask[:, 0].any(), f"{view} mask hides the CLS token"
    assert not (mask & padding).any(), f"{view} mask hides padding"
    assert not (mask & (units < 0)).any(), f"{view} mask hides positions whose unit is -1"


def check_masker_single(subject: ConformanceSubject) -> None:
    masker, batch, padding, units = _masker_inputs(subject)
    ratio = getattr(subject.options(), "mask_ratio", None)
    assert isinstance(ratio, (int, float)) and not isinstance(ratio, bool), (
        "the modality options need a numeric mask_ratio field"
    )
    mask = masker(batch, padding, generator=_generator(subject.seed))
    _check_mask_valid(mask, padding, units, "single-view")
    for row in range(mask.shape[0]):
        ids = units[row][units[row] >= 0].unique()
        hidden = 0
        for unit in ids:
            states = mask[row][units[row] == unit]
            assert states.all() or not states.any(), (
                f"sample {row}: unit {int(unit)} is partly hidden; units are hidden whole"
            )
            hidden += int(states.all())
        target = round(ratio * len(ids))
        assert abs(hidden - target) <= 1, (
            f"sample {row}: {hidden} of {len(ids)} units hidden, expected round({ratio} * "
            f"{len(ids)}) = {target} (±1)"
        )
    again = masker(batch, padding, generator=_generator(subject.seed))
    assert torch.equal(mask, again), "the masker is not deterministic for equal generator seeds"


def check_masker_joint(subject: ConformanceSubject) -> None:
    masker, batch, padding, units = _masker_inputs(subject)
    single = masker(batch, padding, generator=_generator(subject.seed))
    before = single.clone()
    joint = masker(
        batch, padding, generator=_generator(subject.seed + 1), joint=True, single_view_mask=single
    )
    assert torch.equal(single, before), "the joint view modified single_view_mask"
    _check_mask_valid(joint, padding, units, "joint-view")
    again = masker(
        batch, padding, generator=_generator(subject.seed + 1), joint=True, single_view_mask=single
    )
    assert torch.equal(joint, again), "the joint-view masker is not deterministic"


def check_ffn(subject: ConformanceSubject) -> bool:
    """Check the registered FFN; ``False`` when the modality registers none (core default)."""
    spec = subject.ffn_spec()
    if spec is None:
        return False
    ffn = spec.build(subject.context())
    assert isinstance(ffn, nn.Module), f"FFN build() returned {type(ffn).__name__}"
    x = torch.randn(subject.batch_size, 5, TINY_DIM, generator=_generator(subject.seed))
    y = ffn(x)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape, (
        f"FFN maps {tuple(x.shape)} to {tuple(getattr(y, 'shape', ()))}, expected the same shape"
    )
    assert y.dtype == torch.float32 and torch.isfinite(y).all(), "FFN output not finite float32"
    # The encoder hands an FFN any subset of a segment's positions (a student's kept units, the
    # rows a step reads), so each token's output must depend on that token alone.
    rows = [3, 0]
    some = ffn(x[:, rows])
    assert torch.allclose(some, y[:, rows], rtol=1e-5, atol=1e-5), (
        "FFN is not position-wise: its output at a token changed when other tokens were left out"
    )
    return True


def _outputs(adapter: nn.Module, subject: ConformanceSubject) -> list[torch.Tensor]:
    with torch.no_grad():
        out = subject.encode(adapter)
    values = [out.tokens]
    if out.rel_pos is not None:
        values.extend(table(out.rel_pos.index) for table in out.rel_pos.tables)
    return values


def check_state_dict_roundtrip(subject: ConformanceSubject) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(subject.seed)
        source = subject.build_adapter().eval()
        torch.manual_seed(subject.seed + 1)
        target = subject.build_adapter().eval()
    state = source.state_dict()
    assert state, "the adapter has no state (no parameters or buffers)"
    target.load_state_dict(state)
    for number, (a, b) in enumerate(zip(_outputs(source, subject), _outputs(target, subject))):
        torch.testing.assert_close(
            b, a, msg=f"output {number} differs after loading the other adapter's state dict"
        )


def check_meta_device(subject: ConformanceSubject) -> None:
    adapter = subject.build_adapter(num_bias_tables=TINY_DEPTH, device="meta")
    real = [n for n, t in [*adapter.named_parameters(), *adapter.named_buffers()] if not t.is_meta]
    assert not real, f"adapter built with device='meta' has real tensors: {real}"
    spec = subject.ffn_spec()
    if spec is not None:
        ffn = spec.build(subject.context(device="meta"))
        real = [n for n, t in [*ffn.named_parameters(), *ffn.named_buffers()] if not t.is_meta]
        assert not real, f"FFN built with device='meta' has real tensors: {real}"


def check_backward(subject: ConformanceSubject, *, num_bias_tables: int = 1) -> None:
    adapter = subject.build_adapter(num_bias_tables=num_bias_tables).train()
    out = subject.encode(adapter)
    loss = out.tokens.sum()
    if out.rel_pos is not None:
        for table in out.rel_pos.tables:
            loss = loss + table(out.rel_pos.index).sum()
    loss.backward()
    missing = [n for n, p in adapter.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"adapter parameters get no gradient: {missing}"


#: Every check by name, in order. ``check_ffn`` and ``check_adapter_precompute`` return False
#: when there is nothing to check.
CHECKS: dict[str, Callable[[ConformanceSubject], object]] = {
    "modality_spec": check_modality_spec,
    "preprocessor": check_preprocessor,
    "collate": check_collate,
    "adapter_forward_shared_table": partial(check_adapter_forward, num_bias_tables=1),
    "adapter_forward_per_layer_tables": partial(check_adapter_forward, num_bias_tables=TINY_DEPTH),
    "adapter_keep": check_adapter_keep,
    "adapter_precompute": check_adapter_precompute,
    "masker_single_view": check_masker_single,
    "masker_joint_view": check_masker_joint,
    "ffn": check_ffn,
    "state_dict_roundtrip": check_state_dict_roundtrip,
    "meta_device": check_meta_device,
    "backward_shared_table": partial(check_backward, num_bias_tables=1),
    "backward_per_layer_tables": partial(check_backward, num_bias_tables=TINY_DEPTH),
}


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Literal["passed", "failed", "skipped"]
    message: str = ""


def run_checks(
    registry: Registry, modality: str, variants: Mapping[str, str] | None = None
) -> list[CheckResult]:
    """Run every check outside pytest (``peace plugins check``); never raises for a failure.
    ``variants`` checks named component variants in place of the defaults."""
    subject = ConformanceSubject(registry, modality, variants=dict(variants or {}))
    results = []
    for name, check in CHECKS.items():
        try:
            outcome = check(subject)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
            results.append(CheckResult(name, "failed", reason))
            continue
        skipped = outcome is False
        results.append(
            CheckResult(name, "skipped" if skipped else "passed", "nothing to check" * skipped)
        )
    return results


class ModalityConformance:
    """Base class of a plugin's conformance tests; set ``modality`` in the subclass.

    Override :meth:`conformance_registry` to test against another registry than the installed
    one (e.g. ``Registry.from_plugins(...)``).
    """

    modality: ClassVar[str] = ""
    batch_size: ClassVar[int] = 4
    seed: ClassVar[int] = 0
    #: Option values to build with instead of the defaults (``check_modality_spec`` still checks
    #: that ``options()`` builds with none).
    option_overrides: ClassVar[Mapping[str, Any]] = {}
    #: Named variants to test in place of the defaults, by kind (``{"masker": "block"}``).
    variants: ClassVar[Mapping[str, str]] = {}
    _subjects: ClassVar[dict[tuple[type, int], ConformanceSubject]] = {}

    def conformance_registry(self) -> Registry:
        return get_registry()

    def subject(self) -> ConformanceSubject:
        assert self.modality, f"{type(self).__name__} must set the class attribute `modality`"
        registry = self.conformance_registry()
        key = (type(self), id(registry))
        cached = self._subjects.get(key)
        if cached is None or cached.registry is not registry:
            cached = ConformanceSubject(
                registry,
                self.modality,
                self.batch_size,
                self.seed,
                dict(self.option_overrides),
                dict(self.variants),
            )
            self._subjects[key] = cached
        return cached

    def test_modality_spec(self) -> None:
        check_modality_spec(self.subject())

    def test_preprocessor(self) -> None:
        check_preprocessor(self.subject())

    def test_collate(self) -> None:
        check_collate(self.subject())

    def test_adapter_forward_shared_table(self) -> None:
        check_adapter_forward(self.subject(), num_bias_tables=1)

    def test_adapter_forward_per_layer_tables(self) -> None:
        check_adapter_forward(self.subject(), num_bias_tables=TINY_DEPTH)

    def test_adapter_keep(self) -> None:
        check_adapter_keep(self.subject())

    def test_adapter_precompute(self) -> None:
        if not check_adapter_precompute(self.subject()):
            import pytest

            pytest.skip(f"{self.modality}'s adapter has no precompute (optional, API 1.4)")

    def test_masker_single_view(self) -> None:
        check_masker_single(self.subject())

    def test_masker_joint_view(self) -> None:
        check_masker_joint(self.subject())

    def test_ffn(self) -> None:
        if not check_ffn(self.subject()):
            import pytest

            pytest.skip(f"{self.modality} registers no FFN (it uses the core default)")

    def test_state_dict_roundtrip(self) -> None:
        check_state_dict_roundtrip(self.subject())

    def test_meta_device(self) -> None:
        check_meta_device(self.subject())

    def test_backward_shared_table(self) -> None:
        check_backward(self.subject(), num_bias_tables=1)

    def test_backward_per_layer_tables(self) -> None:
        check_backward(self.subject(), num_bias_tables=TINY_DEPTH)


__all__ = [
    "CHECKS",
    "TINY_DEPTH",
    "TINY_DIM",
    "TINY_FFN_DIM",
    "TINY_HEADS",
    "CheckResult",
    "ConformanceSubject",
    "ModalityConformance",
    "run_checks",
]
