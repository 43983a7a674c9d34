"""Faulty plugins at build and forward time, reserved names, and ``peace plugins check``.

Each fault is in a throwaway plugin *distribution* (``peace_registry.testing``), discovered like an
installed one. Its error names the plugin and its distribution and says what was expected, and a
good plugin in the same registry keeps building and running. Registration-time faults (malformed
names, wrong spec types, conflicts...) are covered in ``test_registry.py``; here only the reserved
names are new.
"""

from __future__ import annotations

import itertools
import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from peace_core import create_model
from peace_core.cli import main
from peace_core.model import PeaceModel
from peace_registry import (
    MODALITY_NAME_PATTERN,
    RESERVED_MODALITY_NAMES,
    ComponentBuildError,
    ComponentOutputError,
    Registry,
)
from peace_registry.testing import discover_in, write_plugin_distribution

_counter = itertools.count()
TINY = {"dim": 32, "depth": 2, "heads": 4, "ffn_dim": 64}
VERSION = "2.0.1"

#: The plugin module: a toy modality (``peace_registry.testing.ToyPlugin``), then ``{fault}``.
PLUGIN = """
from dataclasses import replace

import torch
from peace_registry.testing import ToyAdapter, ToyPlugin

PEACE_PLUGIN_API = "1.0"
plugin = ToyPlugin({modality!r})
{fault}
"""

FAULTS = {
    "good": "",
    "adapter_raises": """
def explode(ctx):
    raise RuntimeError("adapter weights missing")

plugin.adapter_spec = replace(plugin.adapter_spec, build=explode)
""",
    "adapter_not_a_module": """
plugin.adapter_spec = replace(plugin.adapter_spec, build=lambda ctx: {"not": "a module"})
""",
    "ffn_raises": """
def explode(ctx):
    raise ValueError("ffn_dim must be even")

plugin.ffn_spec = replace(plugin.ffn_spec, build=explode)
""",
    "masker_raises": """
def explode(ctx):
    raise ImportError("no module named 'scipy'")

plugin.masker_spec = replace(plugin.masker_spec, build=explode)
""",
    "preprocessor_raises": """
def explode(options):
    raise OSError("vocabulary file missing")

plugin.preprocessor_spec = replace(plugin.preprocessor_spec, build=explode)
""",
    "wrong_dtype": """
class Float64Adapter(ToyAdapter):
    def forward(self, batch, keep=None):
        out = super().forward(batch, keep)
        return replace(out, tokens=out.tokens.double())

plugin.adapter_spec = replace(plugin.adapter_spec, build=Float64Adapter)
""",
    "bf16_tokens": """
class Bfloat16Adapter(ToyAdapter):
    def forward(self, batch, keep=None):
        out = super().forward(batch, keep)
        return replace(out, tokens=out.tokens.bfloat16())

plugin.adapter_spec = replace(plugin.adapter_spec, build=Bfloat16Adapter)
""",
    "huge_tokens": """
class HugeAdapter(ToyAdapter):
    def forward(self, batch, keep=None):
        out = super().forward(batch, keep)
        return replace(out, tokens=out.tokens * 1e30)

plugin.adapter_spec = replace(plugin.adapter_spec, build=HugeAdapter)
""",
    "wrong_shape": """
class NarrowAdapter(ToyAdapter):
    def forward(self, batch, keep=None):
        out = super().forward(batch, keep)
        return replace(out, tokens=out.tokens[..., :-1])

plugin.adapter_spec = replace(plugin.adapter_spec, build=NarrowAdapter)
""",
    "wrong_mask": """
class LongMaskAdapter(ToyAdapter):
    def forward(self, batch, keep=None):
        out = super().forward(batch, keep)
        return replace(out, padding_mask=out.padding_mask.long())

plugin.adapter_spec = replace(plugin.adapter_spec, build=LongMaskAdapter)
""",
    "returns_tensor": """
class TensorAdapter(ToyAdapter):
    def forward(self, batch, keep=None):
        return super().forward(batch, keep).tokens

plugin.adapter_spec = replace(plugin.adapter_spec, build=TensorAdapter)
""",
}


def add_plugin(root: Path, name: str, fault: str = "", *, modality: str | None = None) -> None:
    """A distribution ``peace-<name>`` with one entry point ``name`` registering the modality
    ``modality`` (default ``name``) with ``fault`` applied."""
    module = f"peace_fault_tmp_{next(_counter)}"
    body = PLUGIN.format(modality=modality or name, fault=textwrap.dedent(fault))
    write_plugin_distribution(
        root,
        f"peace-{name}",
        version=VERSION,
        entry_points={name: f"{module}:plugin"},
        files={f"{module}.py": body},
    )


def registry_of(root: Path, *faults: str) -> Registry:
    """The good plugin plus one plugin per fault, named after it; only those (hermetic)."""
    for name in ("good", *faults):
        add_plugin(root, name, FAULTS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return discover_in(root, strict=False)


def build(registry: Registry, *modalities: str) -> PeaceModel:
    config = {"encoder": TINY, "modalities": {name: {} for name in modalities}}
    return create_model(config, registry=registry).eval()


def named(plugin: str, kind: str) -> str:
    """How errors name a component of a plugin here: kind, plugin, distribution and version."""
    return re.escape(f"the {plugin} {kind} from plugin '{plugin}' (peace-{plugin} {VERSION})")


def run_good(model: PeaceModel) -> None:
    """The good modality, in a model or registry where another plugin is broken, still works."""
    batch = model.preprocess(good=[[0.5, -1.0, 2.0], [3.0]])
    with torch.no_grad():
        embedding = model(batch)["good"].embedding
    assert embedding.shape == (2, TINY["dim"]) and torch.isfinite(embedding).all()


# --------------------------------------------------------------------------------------------
# Build time: create_model names the plugin whose factory failed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "kind", "cause"),
    [
        ("adapter_raises", "adapter", "failed to build: RuntimeError: adapter weights missing"),
        (
            "adapter_not_a_module",
            "adapter",
            "returned dict from its factory; expected an nn.Module",
        ),
        ("ffn_raises", "ffn", "failed to build: ValueError: ffn_dim must be even"),
    ],
)
def test_a_factory_failing_at_build_is_named_and_the_rest_builds(
    root: Path, fault: str, kind: str, cause: str
) -> None:
    registry = registry_of(root, fault)
    with pytest.raises(ComponentBuildError, match=f"^{named(fault, kind)} {re.escape(cause)}"):
        build(registry, "good", fault)
    run_good(build(registry, "good"))


def test_the_factory_error_is_chained_and_the_cli_can_print_it(root: Path) -> None:
    registry = registry_of(root, "adapter_raises")
    with pytest.raises(ComponentBuildError) as caught:
        build(registry, "adapter_raises")
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert isinstance(caught.value, ValueError)  # callers catching ValueError still do


@pytest.mark.parametrize(
    ("fault", "kind", "use", "cause"),
    [
        ("masker_raises", "masker", "masker", "ImportError: no module named 'scipy'"),
        ("preprocessor_raises", "preprocessor", "preprocessor", "OSError: vocabulary file"),
    ],
)
def test_components_built_on_first_use_name_their_plugin(
    root: Path, fault: str, kind: str, use: str, cause: str
) -> None:
    registry = registry_of(root, fault)
    model = build(registry, "good", fault)  # built lazily: the model itself builds
    with pytest.raises(ComponentBuildError, match=f"{named(fault, kind)} failed to build: {cause}"):
        getattr(model, use)(fault)
    assert model.masker("good") is not None
    run_good(model)


# --------------------------------------------------------------------------------------------
# Forward time: a model names the plugin whose adapter returned the wrong thing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "wrong", "expected"),
    [
        (
            "wrong_dtype",
            "returned tokens of shape (2, 4, 32), torch.float64 on cpu",
            "expected [B, N >= 1, 32] floating-point tokens in torch.float32 on cpu (the model's",
        ),
        (
            "wrong_shape",
            "returned tokens of shape (2, 4, 31), torch.float32 on cpu",
            "expected [B, N >= 1, 32] floating-point tokens in torch.float32",
        ),
        (
            "wrong_mask",
            "returned a padding_mask torch.int64 of shape (2, 4)",
            "expected bool of shape (2, 4) (the tokens' [B, N], True at padding)",
        ),
        (
            "returns_tensor",
            "returned Tensor",
            "expected an AdapterOutput(tokens, padding_mask, rel_pos)",
        ),
    ],
)
def test_an_adapter_returning_the_wrong_thing_is_named_at_forward(
    root: Path, fault: str, wrong: str, expected: str
) -> None:
    registry = registry_of(root, fault)
    model = build(registry, "good", fault)
    batch = model.preprocess(**{fault: [[1.0, 2.0, 3.0], [4.0]]}, good=[[1.0], [2.0, 3.0]])
    message = f"{named(fault, 'adapter')} {re.escape(wrong)}; {re.escape(expected)}"
    for joint in (False, True):  # alone, and fused with the good modality
        with torch.no_grad(), pytest.raises(ComponentOutputError, match=f"^{message}"):
            model(batch, joint=joint)
    with torch.no_grad(), pytest.raises(ComponentOutputError, match=message):
        model.branch(fault)({fault: batch[fault]})
    run_good(model)


def test_under_autocast_tokens_may_come_in_the_compute_dtype(root: Path) -> None:
    registry = registry_of(root, "bf16_tokens", "wrong_dtype")
    model = build(registry, "bf16_tokens", "wrong_dtype")
    batch = model.preprocess(bf16_tokens=[[1.0, 2.0]], wrong_dtype=[[1.0, 2.0]])
    expected = re.escape("in torch.float32 or torch.bfloat16 on cpu (the model's dtype and device")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embedding = model({"bf16_tokens": batch["bf16_tokens"]})["bf16_tokens"].embedding
        assert torch.isfinite(embedding.float()).all()
        with pytest.raises(ComponentOutputError, match=f"torch.float64 on cpu; .*{expected}"):
            model({"wrong_dtype": batch["wrong_dtype"]})
    with torch.no_grad(), pytest.raises(ComponentOutputError, match=r"bfloat16 on cpu; .*float32"):
        model({"bf16_tokens": batch["bf16_tokens"]})  # outside autocast: the model's dtype only


def test_finite_tokens_that_overflow_the_encoder_name_the_adapter(root: Path) -> None:
    registry = registry_of(root, "huge_tokens")
    model = build(registry, "good", "huge_tokens")
    batch = model.preprocess(huge_tokens=[[1.0, 2.0]])
    message = "the fusion encoder overflowed on finite tokens (largest magnitude "
    with torch.no_grad(), pytest.raises(ComponentOutputError) as caught:
        model(batch)
    assert message in str(caught.value)
    assert re.search(
        f"of {named('huge_tokens', 'adapter')}; .* should normalise", str(caught.value)
    )
    model.train()  # training leaves it to the trainer's non-finite-loss check: no sync here
    assert not torch.isfinite(model(batch)["huge_tokens"].embedding).all()
    run_good(model.eval())


# --------------------------------------------------------------------------------------------
# Reserved names
# --------------------------------------------------------------------------------------------


def test_every_attribute_of_torchs_module_dict_is_reserved() -> None:
    # ModuleDict refuses its own attributes as keys; the list in the contract is written out (no
    # torch at discovery), so this catches a torch upgrade that adds one.
    attributes = {
        name
        for name in [*dir(nn.ModuleDict), *vars(nn.ModuleDict())]
        if MODALITY_NAME_PATTERN.match(name)
    }
    missing = attributes - set(RESERVED_MODALITY_NAMES)
    assert not missing, f"add these to peace_registry.contract._MODULE_DICT_ATTRIBUTES: {missing}"
    for name, reason in RESERVED_MODALITY_NAMES.items():
        if "ModuleDict" in reason:
            with pytest.raises(KeyError, match="already exists"):
                nn.ModuleDict({name: nn.Identity()})


@pytest.mark.parametrize(
    ("modality", "why"),
    [
        ("type", "an attribute of torch's nn.ModuleDict"),
        ("training", "an attribute of torch's nn.ModuleDict"),
        ("batch_size", "a parameter of PeaceModel.encode"),
    ],
)
def test_a_reserved_modality_name_fails_its_plugin_by_name(
    root: Path, modality: str, why: str
) -> None:
    add_plugin(root, "good")
    add_plugin(root, "reserved", modality=modality)
    with pytest.warns(UserWarning) as caught:
        registry = discover_in(root, strict=False)
    record = registry.plugin("reserved")
    assert record.status == "failed"
    assert f"invalid modality name {modality!r}: it is reserved ({why}" in record.error
    [warning] = [str(w.message) for w in caught if "reserved" in str(w.message)]
    assert f"plugin 'reserved' (peace-reserved {VERSION}) failed to load" in warning
    assert registry.modalities() == ["good"]
    # It failed on import, before registering anything: asking for the name points at it.
    with pytest.raises(LookupError, match=f"plugin 'reserved' .*{modality!r}: it is reserved"):
        registry.modality(modality)
    run_good(build(registry, "good"))


# --------------------------------------------------------------------------------------------
# peace plugins check: every broken plugin reported, the good one still passing
# --------------------------------------------------------------------------------------------


def test_check_reports_each_broken_plugin_and_passes_the_good_one(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = ["adapter_raises", "wrong_dtype", "wrong_shape", "preprocessor_raises"]
    for name in ("good", *broken):
        add_plugin(root, name, FAULTS[name])
    add_plugin(root, "reserved", modality="float")
    assert main(["plugins", "check", "good", *broken, "reserved"]) == 1
    out = capsys.readouterr().out
    blocks = {
        block.split("'")[1]: block
        for block in re.split(r"\n(?=(?:OK  |FAIL) plugin )", out.strip())
        if block.startswith(("OK   plugin", "FAIL plugin"))
    }
    assert set(blocks) == {"good", *broken, "reserved"}
    assert f"OK   plugin 'good' (peace-good {VERSION})" in blocks["good"]
    assert "OK   modality good: 13/13 checks passed" in blocks["good"]
    expectations = {
        "adapter_raises": "RuntimeError: adapter weights missing",
        "wrong_dtype": "tokens dtype torch.float64, expected float32",
        "wrong_shape": "tokens shape (4, 8, 31), expected [4, N, 32]",
        "preprocessor_raises": "OSError: vocabulary file missing",
        "reserved": "invalid modality name 'float': it is reserved",
    }
    for name, expected in expectations.items():
        block = blocks[name]
        first = block.splitlines()[0]
        assert first.startswith(f"FAIL plugin '{name}' (peace-{name} {VERSION})"), block
        assert expected in block, block
    assert out.strip().endswith("1/6 plugins passed")


def test_check_names_every_unknown_plugin_before_checking_any(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_plugin(root, "good")
    assert main(["plugins", "check", "good", "goood_typo"]) == 1
    captured = capsys.readouterr()
    assert "unknown plugin 'goood_typo'" in captured.err
    assert "checks passed" not in captured.out
