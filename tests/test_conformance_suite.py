"""The conformance suite itself: the toy modality passes it, and deliberately broken variants of
the toy are caught by the check that is about their bug."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import pytest
import torch
from pydantic import BaseModel
from torch import nn

from peace_registry import AdapterOutput, BuildContext, ModalitySpec, Registry
from peace_registry.conformance import (
    CHECKS,
    ConformanceSubject,
    ModalityConformance,
    check_adapter_forward,
    check_adapter_keep,
    check_adapter_precompute,
    check_backward,
    check_ffn,
    check_masker_joint,
    check_masker_single,
    check_meta_device,
    check_modality_spec,
    check_preprocessor,
    check_state_dict_roundtrip,
    run_checks,
)
from peace_registry.testing import ToyAdapter, ToyFFN, ToyMasker, ToyOptions, ToyPlugin

TOY_REGISTRY = Registry.from_plugins({"toy": ToyPlugin()})


class TestToyConformance(ModalityConformance):
    """How a plugin uses the suite; here against an in-process registry."""

    modality = "toy"

    def conformance_registry(self) -> Registry:
        return TOY_REGISTRY


def test_run_checks_passes_the_toy_and_skips_a_missing_ffn() -> None:
    results = run_checks(Registry.from_plugins({"toy": ToyPlugin(ffn=False)}), "toy")
    assert [r.name for r in results] == list(CHECKS)
    assert {r.name: r.status for r in results if r.status != "passed"} == {
        "ffn": "skipped",
        "adapter_precompute": "skipped",
    }


def test_run_checks_reports_a_missing_modality_instead_of_raising() -> None:
    results = run_checks(TOY_REGISTRY, "nope")
    assert all(r.status == "failed" for r in results if r.name != "ffn")
    assert "unknown modality 'nope'" in results[0].message


# ---- broken variants ---------------------------------------------------------------------------


def subject_with(**specs: Any) -> ConformanceSubject:
    """A subject whose toy plugin has some specs replaced (``adapter=build`` etc.)."""
    plugin = ToyPlugin()
    for kind, value in specs.items():
        attribute = f"{kind}_spec"
        current = getattr(plugin, attribute)
        setattr(plugin, attribute, replace(current, build=value) if callable(value) else value)
    return ConformanceSubject(Registry.from_plugins({"toy": plugin}), "toy")


class PadsCls(ToyAdapter):
    def forward(self, batch: Mapping[str, torch.Tensor], keep: Any = None) -> AdapterOutput:
        out = super().forward(batch, keep)
        out.padding_mask[:, 0] = True
        return out


class IgnoresKeep(ToyAdapter):
    def forward(self, batch: Mapping[str, torch.Tensor], keep: Any = None) -> AdapterOutput:
        return super().forward(batch)


class ShiftsKeptIndex(ToyAdapter):
    """Re-numbers kept positions 0..K-1, losing the original distances."""

    def forward(self, batch: Mapping[str, torch.Tensor], keep: Any = None) -> AdapterOutput:
        out = super().forward(batch, keep)
        if keep is not None and out.rel_pos is not None:
            out.rel_pos.index = self.relative_index(keep.shape[1]).expand(len(keep), -1, -1)
        return out


class UnusedParameter(ToyAdapter):
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.forgotten = nn.Linear(2, 2)


class OneTableAlways(ToyAdapter):
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(replace(ctx, num_bias_tables=1))


class IndexOutOfRange(ToyAdapter):
    def forward(self, batch: Mapping[str, torch.Tensor], keep: Any = None) -> AdapterOutput:
        out = super().forward(batch, keep)
        assert out.rel_pos is not None
        out.rel_pos.index = out.rel_pos.index + 100
        return out


class IgnoresDevice(ToyAdapter):
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(replace(ctx, device=None))


class UnseededInit(ToyAdapter):
    """Initialises from a private generator: two builds differ even after loading state."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.register_buffer("noise", torch.randn(ctx.dim), persistent=False)

    def forward(self, batch: Mapping[str, torch.Tensor], keep: Any = None) -> AdapterOutput:
        out = super().forward(batch, keep)
        out.tokens = out.tokens + self.noise
        return out


class StalePrecompute(ToyAdapter):
    """Its precompute leaves a value that forward then reads in place of the real features."""

    def precompute(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "scaled": torch.tensor(2.0)}

    def forward(self, batch: Mapping[str, torch.Tensor], keep: Any = None) -> AdapterOutput:
        out = super().forward(batch, keep)
        if "scaled" in batch:
            out.tokens = out.tokens * batch["scaled"]
        return out


class HidesCls(ToyMasker):
    def __call__(self, batch: Any, padding_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        mask = super().__call__(batch, padding_mask, **kwargs)
        mask[:, 0] = True
        return mask


class UsesGlobalRandomness(ToyMasker):
    def __call__(self, batch: Any, padding_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs["generator"] = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
        return super().__call__(batch, padding_mask, **kwargs)


class HidesTooMuch(ToyMasker):
    def __call__(self, batch: Any, padding_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return ~padding_mask & (self.units(batch, padding_mask) >= 0)


class JointHidesPadding(ToyMasker):
    def __call__(self, batch: Any, padding_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        mask = super().__call__(batch, padding_mask, **kwargs)
        return mask | padding_mask if kwargs.get("joint") else mask


class LooseOptions(BaseModel):
    mask_ratio: float = 0.5


class UndecodablePreprocessor:
    def __init__(self, options: BaseModel) -> None:
        from peace_registry.testing import ToyPreprocessor

        self.inner = ToyPreprocessor(ToyOptions())
        self.decoders: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        return self.inner(item, train=train)


def masker(cls: type[ToyMasker]) -> Callable[[BuildContext], ToyMasker]:
    return lambda ctx: cls(ctx.options)  # type: ignore[arg-type]


BROKEN: dict[str, tuple[dict[str, Any], Callable[[ConformanceSubject], Any], str]] = {
    "cls-padded": ({"adapter": PadsCls}, check_adapter_forward, "CLS token"),
    "keep-ignored": ({"adapter": IgnoresKeep}, check_adapter_keep, "with keep"),
    "keep-loses-distances": (
        {"adapter": ShiftsKeptIndex},
        check_adapter_keep,
        "distances of the original positions",
    ),
    "unused-parameter": ({"adapter": UnusedParameter}, check_backward, "forgotten.weight"),
    "table-count": (
        {"adapter": OneTableAlways},
        lambda s: check_adapter_forward(s, num_bias_tables=2),
        "expected num_bias_tables=2",
    ),
    "index-out-of-range": ({"adapter": IndexOutOfRange}, check_adapter_forward, "table has"),
    "precompute-changes-output": (
        {"adapter": StalePrecompute},
        check_adapter_precompute,
        "forward(precompute(batch)) differs",
    ),
    "meta-ignored": ({"adapter": IgnoresDevice}, check_meta_device, "has real tensors"),
    "state-not-restored": ({"adapter": UnseededInit}, check_state_dict_roundtrip, "differs"),
    "masks-cls": ({"masker": masker(HidesCls)}, check_masker_single, "hides the CLS token"),
    "not-deterministic": (
        {"masker": masker(UsesGlobalRandomness)},
        check_masker_single,
        "not deterministic",
    ),
    "wrong-ratio": ({"masker": masker(HidesTooMuch)}, check_masker_single, "(±1)"),
    "joint-hides-padding": (
        {"masker": masker(JointHidesPadding)},
        check_masker_joint,
        "joint-view mask hides padding",
    ),
    "options-allow-extra": (
        {"modality": ModalitySpec("toy", "", ("values", "lengths"), ("toy",), LooseOptions)},
        check_modality_spec,
        'extra="forbid"',
    ),
    "extension-without-decoder": (
        {"preprocessor": UndecodablePreprocessor},
        check_preprocessor,
        "have no decoder",
    ),
}


@pytest.mark.parametrize(("specs", "check", "expected"), BROKEN.values(), ids=BROKEN.keys())
def test_the_suite_catches_a_broken_component(
    specs: dict[str, Any], check: Callable[[ConformanceSubject], Any], expected: str
) -> None:
    with pytest.raises(AssertionError) as caught:
        check(subject_with(**specs))
    assert expected in str(caught.value)


def test_run_checks_reports_the_broken_check_by_name() -> None:
    plugin = ToyPlugin()
    plugin.adapter_spec = replace(plugin.adapter_spec, build=UnusedParameter)
    results = {r.name: r for r in run_checks(Registry.from_plugins({"toy": plugin}), "toy")}
    assert results["backward_shared_table"].status == "failed"
    assert "forgotten.weight" in results["backward_shared_table"].message
    assert results["adapter_keep"].status == "passed"


def test_option_overrides_reach_the_components() -> None:
    subject = ConformanceSubject(TOY_REGISTRY, "toy", option_overrides={"max_length": 3})
    assert subject.batch()["values"].shape[1] <= 3
    check_adapter_forward(subject)
    check_masker_single(subject)


class MixesTokens(ToyFFN):
    """Adds the sequence mean: fine for shapes, wrong for an encoder that drops positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x.mean(dim=1, keepdim=True)


def test_check_ffn_catches_an_ffn_that_mixes_positions() -> None:
    assert check_ffn(subject_with(ffn=lambda ctx: ToyFFN(ctx))) is True
    with pytest.raises(AssertionError, match="FFN is not position-wise"):
        check_ffn(subject_with(ffn=lambda ctx: MixesTokens(ctx)))
