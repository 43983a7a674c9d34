"""The registry built from in-process plugin objects: lookups, validation and fault rules."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings
from dataclasses import replace
from typing import Any

import pytest

import peace_registry
from peace_registry import (
    PLUGIN_API_VERSION,
    AdapterSpec,
    CheckpointFormatError,
    ComponentConflictError,
    ConvertedCheckpoint,
    ModalitySpec,
    PeaceError,
    PluginApiVersionError,
    PluginApiWarning,
    PluginDisabledError,
    PluginFailedError,
    PluginLoadError,
    PluginLoadWarning,
    Registry,
    UnknownComponentError,
    hookimpl,
)
from peace_registry.registry import get_registry, reset_registry
from peace_registry.testing import ToyOptions, ToyPlugin, temporary_plugins, use_registry


def lenient(plugins: dict[str, object], **kwargs: Any) -> tuple[Registry, list[str]]:
    """A non-strict registry and the load warnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = Registry.from_plugins(plugins, strict=False, **kwargs)
    return registry, [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]


class Hooks:
    """A plugin object assembled from plain functions, one per hook name."""

    def __init__(self, api: str | None = "1.0", **hooks: Any) -> None:
        if api is not None:
            self.PEACE_PLUGIN_API = api
        for name, function in hooks.items():
            marked = hasattr(function, "peace_impl")  # bound hookimpls of another plugin
            setattr(self, name, function if marked else hookimpl(function))


def modality_only(name: str) -> Hooks:
    spec = ModalitySpec(name, "d", ("x",), (), ToyOptions)
    return Hooks(peace_register_modalities=lambda register: register(spec))


# ---- lookups -----------------------------------------------------------------------------------


def test_lookups_return_the_registered_specs_with_provenance() -> None:
    toy = ToyPlugin("toy", architecture="toy-tiny")
    registry = Registry.from_plugins({"toy": toy})
    assert registry.modalities() == ["toy"]
    assert registry.architectures() == ["toy-tiny"]
    assert registry.modality("toy") is toy.modality_spec
    assert registry.adapter("toy") is toy.adapter_spec
    assert registry.ffn("toy") is toy.ffn_spec
    assert registry.masker("toy") is toy.masker_spec
    assert registry.preprocessor("toy") is toy.preprocessor_spec
    assert registry.architecture("toy-tiny") is toy.architecture_spec
    record = registry.component_record("adapter", "toy")
    assert (record.plugin, record.dist) == ("toy", "in-process")
    [plugin] = registry.plugins()
    assert plugin.status == "ok" and plugin.error is None
    assert plugin.registers() == {
        "modality": ["toy"],
        "adapter": ["toy"],
        "ffn": ["toy"],
        "masker": ["toy"],
        "preprocessor": ["toy"],
        "architecture": ["toy-tiny"],
    }


def test_ffn_is_optional_but_other_components_are_not() -> None:
    registry = Registry.from_plugins({"toy": ToyPlugin(ffn=False), "bare": modality_only("bare")})
    assert registry.ffn("toy") is None
    assert registry.ffn("bare") is None
    with pytest.raises(UnknownComponentError, match=r"'bare' is registered .* no plugin registers"):
        registry.adapter("bare")


def test_unknown_modality_lists_what_is_available_and_suggests_the_closest() -> None:
    registry = Registry.from_plugins({"a": ToyPlugin("vision"), "b": ToyPlugin("audio")})
    with pytest.raises(UnknownComponentError) as caught:
        registry.modality("visoin")
    message = str(caught.value)
    assert "unknown modality 'visoin'; did you mean 'vision'?" in message
    assert "Available modalities: 'audio', 'vision'." in message
    assert caught.value.suggestion == "vision"
    assert isinstance(caught.value, LookupError)
    with pytest.raises(UnknownComponentError, match=r"'xyz'\. Available"):
        registry.adapter("xyz")
    with pytest.raises(UnknownComponentError, match="unknown architecture 'tiny'"):
        registry.architecture("tiny")


# ---- duplicates and conflicts ------------------------------------------------------------------


def test_identical_re_registration_is_a_no_op() -> None:
    toy = ToyPlugin("toy")

    def modalities(register: Any) -> None:
        register(toy.modality_spec)
        register(toy.modality_spec)

    def adapters(register: Any) -> None:
        register(toy.adapter_spec)
        register(replace(toy.adapter_spec))  # equal, not the same object

    twice = Hooks(peace_register_modalities=modalities, peace_register_adapters=adapters)
    registry = Registry.from_plugins({"toy": toy, "echo": twice})
    assert registry.modality("toy") is toy.modality_spec
    assert registry.conflicts() == []
    assert registry.plugin("echo").status == "ok"


def test_same_plugin_registering_different_specs_for_one_key_fails() -> None:
    first = ModalitySpec("toy", "one", ("x",), (), ToyOptions)
    second = ModalitySpec("toy", "two", ("x",), (), ToyOptions)
    plugin = Hooks(peace_register_modalities=lambda register: [register(first), register(second)])
    registry, caught = lenient({"dup": plugin})
    assert registry.plugin("dup").status == "failed"
    assert "registered twice with different objects" in registry.plugin("dup").error
    assert len(caught) == 1


def test_same_component_from_two_plugins_is_a_conflict_naming_both() -> None:
    registry, _ = lenient({"one": ToyPlugin("toy"), "two": ToyPlugin("toy")})
    with pytest.raises(ComponentConflictError) as caught:
        registry.modality("toy")
    assert "plugin 'one'" in str(caught.value) and "plugin 'two'" in str(caught.value)
    with pytest.raises(ComponentConflictError):
        registry.adapter("toy")
    assert registry.modalities() == []  # both registrations dropped
    assert registry.plugin("one").status == "ok"
    assert any("more than one plugin" in p for p in registry.plugin("two").problems)
    assert any("more than one plugin" in p for p in registry.problems())
    with pytest.raises(ComponentConflictError):
        Registry.from_plugins({"one": ToyPlugin("toy"), "two": ToyPlugin("toy")}, strict=True)


# ---- broken plugins ----------------------------------------------------------------------------


def test_a_hook_raising_fails_its_plugin_and_drops_its_partial_registrations() -> None:
    toy = ToyPlugin("toy")

    def explode(register: Any) -> None:
        raise RuntimeError("adapter weights missing")

    broken = Hooks(
        peace_register_modalities=toy.peace_register_modalities, peace_register_adapters=explode
    )
    registry, caught = lenient({"broken": broken, "fine": ToyPlugin("other")})
    assert registry.modalities() == ["other"]
    record = registry.plugin("broken")
    assert record.status == "failed"
    assert record.error == "peace_register_adapters raised RuntimeError: adapter weights missing"
    assert len(caught) == 1 and "plugin 'broken'" in caught[0]
    with pytest.raises(PluginFailedError) as failure:
        registry.modality("toy")  # it registered "toy" before failing
    assert "failed to load" in str(failure.value) and "adapter weights missing" in str(
        failure.value
    )
    assert "unknown" not in str(failure.value)


def test_strict_mode_re_raises_with_the_cause_chained() -> None:
    def explode(register: Any) -> None:
        raise RuntimeError("boom")

    with pytest.raises(PluginLoadError, match=r"plugin 'bad'.*boom") as caught:
        Registry.from_plugins({"bad": Hooks(peace_register_modalities=explode)}, strict=True)
    assert isinstance(caught.value.__cause__, RuntimeError)


def registering(hook: str, *objects: Any) -> dict[str, Any]:
    """Hooks for a plugin whose ``hook`` registers ``objects``."""

    def register_all(register: Any) -> None:
        for obj in objects:
            register(obj)

    return {hook: register_all}


def spec(*, keys: tuple[str, ...] = ("x",), exts: tuple[str, ...] = (), options: Any = ToyOptions):
    return ModalitySpec("t", "", keys, exts, options)


MODALITIES, ADAPTERS = "peace_register_modalities", "peace_register_adapters"
INVALID_REGISTRATIONS = {
    "wrong-type": (
        registering(ADAPTERS, spec()),
        "peace_register_adapters registers AdapterSpec objects, got ModalitySpec",
    ),
    "bad-name": (
        registering(ADAPTERS, AdapterSpec("Bad-Name", dict)),
        "invalid modality name 'Bad-Name'",
    ),
    "no-input-keys": (registering(MODALITIES, spec(keys=())), "input_keys must be a non-empty"),
    "dotted-ext": (registering(MODALITIES, spec(exts=(".jpg",))), "without the dot"),
    "options-not-pydantic": (
        registering(MODALITIES, spec(options=dict)),
        "options must be a pydantic BaseModel class",
    ),
    "returns-instead": (
        {MODALITIES: lambda register: [spec()]},
        "returned list: call register",
    ),
    "orphan": (
        registering(ADAPTERS, AdapterSpec("ghost", dict)),
        "adapter for modality 'ghost', but no plugin registers that modality",
    ),
}


@pytest.mark.parametrize(
    ("hooks", "expected"), INVALID_REGISTRATIONS.values(), ids=INVALID_REGISTRATIONS.keys()
)
def test_invalid_registrations_fail_the_plugin(hooks: dict[str, Any], expected: str) -> None:
    registry, caught = lenient({"bad": Hooks(**hooks), "toy": ToyPlugin()})
    record = registry.plugin("bad")
    assert record.status == "failed"
    assert expected in record.error
    assert registry.plugin("toy").status == "ok"
    assert len(caught) == 1


def test_a_plugin_swallowing_the_register_error_still_fails() -> None:
    def sneaky(register: Any) -> None:
        with contextlib.suppress(TypeError):
            register("not a spec")

    registry, _ = lenient({"sneaky": Hooks(peace_register_modalities=sneaky)})
    assert registry.plugin("sneaky").status == "failed"
    assert "registers ModalitySpec objects, got str" in registry.plugin("sneaky").error


def test_register_called_after_the_hook_returned_is_refused() -> None:
    kept: list[Any] = []
    registry = Registry.from_plugins(
        {"late": Hooks(peace_register_modalities=lambda register: kept.append(register))}
    )
    assert registry.modalities() == []
    with pytest.raises(TypeError, match="called after the hook returned"):
        kept[0](ToyPlugin().modality_spec)


def test_typo_in_a_hook_name_is_caught_with_a_suggestion() -> None:
    typo = Hooks(peace_register_modalitys=lambda register: None)
    registry, caught = lenient({"typo": typo})
    error = registry.plugin("typo").error
    assert "unknown hook 'peace_register_modalitys'" in error
    assert "did you mean 'peace_register_modalities'?" in error
    assert len(caught) == 1


def test_hook_defined_without_the_marker_is_reported() -> None:
    class Unmarked:
        PEACE_PLUGIN_API = "1.0"

        def peace_register_modalities(self, register: Any) -> None:
            register(ToyPlugin().modality_spec)

    registry, _ = lenient({"unmarked": Unmarked()})
    assert "without the @hookimpl marker" in registry.plugin("unmarked").error


def test_orphan_components_of_a_failed_modality_plugin_are_blamed_on_that_plugin() -> None:
    def explode(register: Any) -> None:
        raise ImportError("no module named 'heavy'")

    toy = ToyPlugin("toy")
    extra_adapter = Hooks(peace_register_adapters=toy.peace_register_adapters)
    registry, caught = lenient(
        {"toy": Hooks(peace_register_modalities=explode), "x": extra_adapter}
    )
    assert registry.plugin("x").status == "ok"  # not its fault
    assert len(caught) == 1
    with pytest.raises(PluginFailedError, match=r"plugin 'toy'.*no module named 'heavy'"):
        registry.adapter("toy")


def test_disabled_plugins_are_not_loaded_and_lookups_say_so() -> None:
    registry = Registry.from_plugins(
        {"toy": ToyPlugin(), "other": ToyPlugin("other")}, disabled=["toy"]
    )
    assert registry.plugin("toy").status == "disabled"
    assert registry.modalities() == ["other"]
    with pytest.raises(PluginDisabledError, match="disabled by PEACE_DISABLE_PLUGINS"):
        registry.modality("toy")


# ---- API versions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "upgrade"),
    [("2.0", "upgrade peace-core"), ("0.3", "upgrade the plugin")],
)
def test_major_api_mismatch_skips_the_plugin_saying_which_side_to_upgrade(
    declared: str, upgrade: str
) -> None:
    plugin = ToyPlugin()
    plugin.PEACE_PLUGIN_API = declared
    registry, caught = lenient({"toy": plugin})
    record = registry.plugin("toy")
    assert record.status == "skipped"
    assert upgrade in record.error and declared in record.error
    assert len(caught) == 1 and upgrade in caught[0]
    with pytest.raises(PluginFailedError, match=f"was skipped: .*{upgrade}"):
        registry.modality("toy")
    with pytest.raises(PluginApiVersionError):
        Registry.from_plugins({"toy": plugin}, strict=True)


def test_newer_minor_api_loads_with_a_warning() -> None:
    plugin = ToyPlugin()
    plugin.PEACE_PLUGIN_API = "1.7"
    with pytest.warns(
        PluginApiWarning, match=rf"targets plugin API 1.7, newer than {PLUGIN_API_VERSION} "
    ):
        registry = Registry.from_plugins({"toy": plugin})
    assert registry.plugin("toy").status == "ok"
    assert registry.plugin("toy").warnings
    assert registry.modalities() == ["toy"]


@pytest.mark.parametrize("declared", ["1", 1.0, "one.zero"])
def test_malformed_api_version_fails_the_plugin(declared: object) -> None:
    plugin = ToyPlugin()
    plugin.PEACE_PLUGIN_API = declared  # type: ignore[assignment]
    registry, _ = lenient({"toy": plugin})
    assert registry.plugin("toy").status == "failed"
    assert "must be a 'MAJOR.MINOR' string" in registry.plugin("toy").error


# ---- checkpoint conversion ---------------------------------------------------------------------


def test_convert_checkpoint_asks_plugins_until_one_handles_it() -> None:
    def converter(tag: str) -> Any:
        def convert(checkpoint: Any, source: str) -> ConvertedCheckpoint | None:
            if checkpoint.get("format") != tag:
                return None
            return ConvertedCheckpoint({"name": tag}, {}, source_format=tag)

        return convert

    registry = Registry.from_plugins(
        {
            "a": Hooks(peace_convert_checkpoint=converter("a")),
            "b": Hooks(peace_convert_checkpoint=converter("b")),
        }
    )
    assert registry.convert_checkpoint({"format": "a"}, "x.pt").source_format == "a"
    assert registry.convert_checkpoint({"format": "b"}, "x.pt").source_format == "b"
    with pytest.raises(CheckpointFormatError, match=r"x.pt .*plugin 'a'.*plugin 'b'"):
        registry.convert_checkpoint({"format": "c"}, "x.pt")


def test_convert_checkpoint_errors_name_the_plugin() -> None:
    def explode(checkpoint: Any, source: str) -> None:
        raise KeyError("encoder.layers.0")

    registry = Registry.from_plugins({"bad": Hooks(peace_convert_checkpoint=explode)})
    with pytest.raises(PeaceError, match=r"converter of plugin 'bad'.*KeyError") as caught:
        registry.convert_checkpoint({}, "model.pt")
    assert isinstance(caught.value.__cause__, KeyError)
    wrong = Registry.from_plugins({"w": Hooks(peace_convert_checkpoint=lambda checkpoint: {})})
    with pytest.raises(PeaceError, match="returned dict, expected ConvertedCheckpoint"):
        wrong.convert_checkpoint({}, "model.pt")
    with pytest.raises(CheckpointFormatError, match="no converter installed"):
        Registry.from_plugins({}).convert_checkpoint({}, "model.pt")


# ---- the process-wide registry -----------------------------------------------------------------


def test_get_registry_discovers_once_and_reset_forgets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_discover(cls: type[Registry], **kwargs: Any) -> Registry:
        calls.append(kwargs)
        return Registry.from_plugins({"toy": ToyPlugin()})

    monkeypatch.setattr(Registry, "discover", classmethod(fake_discover))
    with use_registry(None):
        first = get_registry()
        assert get_registry() is first
        assert len(calls) == 1
        reset_registry()
        assert get_registry() is not first
        assert len(calls) == 2


def test_temporary_plugins_swaps_the_global_registry_and_restores_it() -> None:
    before = Registry.from_plugins({})
    with use_registry(before):
        with temporary_plugins({"toy": ToyPlugin()}) as registry:
            assert peace_registry.get_registry() is registry
            assert registry.modalities() == ["toy"]
        assert peace_registry.get_registry() is before


def test_pytest_fixtures(peace_temporary_plugin: Any) -> None:
    registry = peace_temporary_plugin(ToyPlugin("fixture_mod"), name="fixture")
    assert peace_registry.get_registry() is registry
    assert registry.plugin("fixture").status == "ok"
    assert registry.modalities() == ["fixture_mod"]


def test_importing_peace_registry_is_cheap_and_discovers_nothing() -> None:
    code = (
        "import sys, peace_registry\n"
        "names = ('torch', 'pydantic', 'peace_core', 'peace_vision')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


@pytest.fixture
def hermetic_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery that finds only a toy plugin, whatever is installed."""
    fake = classmethod(lambda cls, **kwargs: Registry.from_plugins({"toy": ToyPlugin()}))
    monkeypatch.setattr(Registry, "discover", fake)


def test_fresh_registry_fixture(hermetic_discovery: None, peace_registry_fresh: Registry) -> None:
    assert peace_registry_fresh.modalities() == ["toy"]
    assert get_registry() is peace_registry_fresh
