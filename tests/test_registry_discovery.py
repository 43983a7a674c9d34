"""Discovery through real entry points: throwaway plugin distributions on ``sys.path``, plus
checks over the installed plugins (import cost, nothing discovered at import)."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from peace_registry import (
    ComponentConflictError,
    PluginApiWarning,
    PluginDisabledError,
    PluginFailedError,
    PluginLoadError,
    PluginLoadWarning,
    Registry,
    get_registry,
)
from peace_registry.testing import discover_in, write_plugin_distribution

_counter = itertools.count()

TOY_PLUGIN = """
from peace_registry.testing import ToyPlugin

PEACE_PLUGIN_API = {api!r}
plugin = ToyPlugin({modality!r})
"""


def add_plugin(root: Path, dist: str, body: str, *, name: str, version: str = "0.1.0") -> str:
    """Write a distribution ``dist`` with one entry point ``name`` -> a fresh module holding
    ``body``; return the module name. Bodies defining ``plugin`` are pointed at that object."""
    module = f"peace_tmp_plugin_{next(_counter)}"
    target = f"{module}:plugin" if "\nplugin = " in body else module
    write_plugin_distribution(
        root,
        dist,
        version=version,
        entry_points={name: target},
        files={f"{module}.py": textwrap.dedent(body)},
    )
    return module


def toy(modality: str, api: str = "1.0") -> str:
    return TOY_PLUGIN.format(api=api, modality=modality)


def load(root: Path, **kwargs: object) -> tuple[Registry, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = discover_in(root, **kwargs)  # type: ignore[arg-type]
    return registry, list(caught)


def load_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]


def test_a_broken_plugin_gives_one_warning_and_the_others_keep_working(root: Path) -> None:
    add_plugin(root, "peace-good", toy("good"), name="good", version="1.2.3")
    add_plugin(
        root, "peace-broken", "import peace_no_such_dependency\n", name="broken", version="0.4.0"
    )
    registry, caught = load(root)
    assert registry.modalities() == ["good"]
    assert registry.plugin("good").status == "ok"
    assert registry.plugin("good").version == "1.2.3"
    [message] = load_warnings(caught)
    for part in (
        "plugin 'broken'",
        "peace-broken 0.4.0",
        "ModuleNotFoundError: No module named 'peace_no_such_dependency'",
        "PEACE_DISABLE_PLUGINS=broken",
    ):
        assert part in message
    record = registry.plugin("broken")
    assert record.status == "failed" and "peace_no_such_dependency" in record.error
    with pytest.raises(PluginFailedError) as failure:
        registry.modality("broken")
    text = str(failure.value)
    assert "failed to load" in text and "peace_no_such_dependency" in text
    assert "unknown" not in text


def test_failed_plugin_is_blamed_by_its_distribution_name(root: Path) -> None:
    add_plugin(root, "peace-imu", "raise RuntimeError('bad wheel')\n", name="imu_plugin")
    registry, _ = load(root)
    with pytest.raises(PluginFailedError, match="bad wheel"):
        registry.adapter("imu")


def test_unknown_names_mention_plugins_that_failed(root: Path) -> None:
    add_plugin(root, "peace-good", toy("good"), name="good")
    add_plugin(root, "somebody-else", "raise RuntimeError('bad wheel')\n", name="mystery")
    registry, _ = load(root)
    with pytest.raises(LookupError) as caught:
        registry.modality("depth")
    text = str(caught.value)
    assert "unknown modality 'depth'" in text
    assert "Available modalities: 'good'." in text
    assert "plugin 'mystery' (somebody-else 0.1.0): importing" in text


def test_strict_mode_re_raises_with_the_cause(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_plugin(root, "peace-broken", "import peace_no_such_dependency\n", name="broken")
    monkeypatch.setenv("PEACE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="plugin 'broken'") as caught:
        discover_in(root)
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


def test_same_component_from_two_distributions_names_both(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_plugin(root, "peace-imu", toy("imu"), name="imu", version="1.0.0")
    add_plugin(root, "imu-fork", toy("imu"), name="imu_fork", version="2.0.0")
    registry, _ = load(root)
    with pytest.raises(ComponentConflictError) as caught:
        registry.modality("imu")
    text = str(caught.value)
    assert "peace-imu 1.0.0" in text and "imu-fork 2.0.0" in text
    assert registry.modalities() == []
    monkeypatch.setenv("PEACE_STRICT_PLUGINS", "1")
    with pytest.raises(ComponentConflictError, match=r"peace-imu 1\.0\.0"):
        discover_in(root)


def test_the_same_object_registered_by_two_plugins_is_a_no_op(root: Path) -> None:
    shared = add_plugin(root, "peace-imu", toy("imu"), name="imu")
    again = f"""
    from peace_registry import hookimpl
    from {shared} import plugin as original

    PEACE_PLUGIN_API = "1.0"

    @hookimpl
    def peace_register_modalities(register):
        register(original.modality_spec)
    """
    add_plugin(root, "peace-imu-extra", again, name="imu_again")
    registry, caught = load(root)
    assert registry.modalities() == ["imu"]
    assert registry.conflicts() == [] and load_warnings(caught) == []


@pytest.mark.parametrize(
    ("api", "upgrade"), [("2.0", "upgrade peace-core"), ("0.9", "upgrade the plugin")]
)
def test_api_major_mismatch_is_skipped_saying_which_side_to_upgrade(
    root: Path, api: str, upgrade: str
) -> None:
    add_plugin(root, "peace-imu", toy("imu", api=api), name="imu")
    registry, caught = load(root)
    record = registry.plugin("imu")
    assert record.status == "skipped"
    assert upgrade in record.error
    [message] = load_warnings(caught)
    assert upgrade in message and "was skipped" in message
    with pytest.raises(PluginFailedError, match=upgrade):
        registry.modality("imu")


def test_newer_minor_api_warns_and_loads(root: Path) -> None:
    add_plugin(root, "peace-imu", toy("imu", api="1.9"), name="imu")
    registry, caught = load(root)
    assert registry.modalities() == ["imu"]
    api_warnings = [w for w in caught if issubclass(w.category, PluginApiWarning)]
    assert len(api_warnings) == 1 and "1.9" in str(api_warnings[0].message)
    assert load_warnings(caught) == []


def test_missing_api_declaration_fails(root: Path) -> None:
    add_plugin(root, "peace-imu", "x = 1\n", name="imu")
    registry, _ = load(root)
    assert registry.plugin("imu").status == "failed"
    assert "does not declare the plugin API" in registry.plugin("imu").error


def test_disabled_plugins_are_never_imported(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = add_plugin(root, "peace-imu", toy("imu"), name="imu")
    add_plugin(root, "peace-depth", toy("depth"), name="depth")
    monkeypatch.setenv("PEACE_DISABLE_PLUGINS", " imu , unrelated")
    registry, caught = load(root)
    assert module not in sys.modules
    assert registry.plugin("imu").status == "disabled"
    assert registry.modalities() == ["depth"]
    assert caught == []
    with pytest.raises(PluginDisabledError, match="disabled by PEACE_DISABLE_PLUGINS"):
        registry.modality("imu")


def test_typo_in_a_hook_name_is_the_plugins_error(root: Path) -> None:
    body = """
    from peace_registry import hookimpl

    PEACE_PLUGIN_API = "1.0"

    @hookimpl
    def peace_register_adapter(register):
        pass
    """
    add_plugin(root, "peace-typo", body, name="typo")
    add_plugin(root, "peace-imu", toy("imu"), name="imu")
    registry, caught = load(root)
    error = registry.plugin("typo").error
    assert "unknown hook 'peace_register_adapter'" in error
    assert "did you mean 'peace_register_adapters'?" in error
    assert len(load_warnings(caught)) == 1
    assert registry.modalities() == ["imu"]


def test_get_registry_sees_a_new_distribution(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_plugin(root, "peace-imu", toy("imu"), name="imu_toy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whatever else is installed may be mid-development
        registry = get_registry()
    assert "imu" in registry.modalities()
    assert registry.component_record("modality", "imu").dist == "peace-imu"


# ---- the installed environment -----------------------------------------------------------------


def installed_entry_modules() -> list[str]:
    return sorted({ep.module for ep in importlib.metadata.entry_points(group="peace.plugins")})


@pytest.mark.parametrize("module", installed_entry_modules())
def test_plugin_entry_modules_do_not_import_torch(module: str) -> None:
    code = (
        f"import json, sys, importlib; importlib.import_module({module!r}); "
        "print(json.dumps([m for m in ('torch', 'torchaudio') if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [], f"importing {module} imports torch: keep it lazy"


def test_importing_the_libraries_discovers_no_plugin() -> None:
    entry_modules = installed_entry_modules()
    assert "peace_core.builtin_plugin" in entry_modules
    code = (
        "import json, sys, peace_registry, peace_core\n"
        f"print(json.dumps([m for m in {entry_modules!r} if m in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
