"""``peace plugins list|check`` and the CLI's error handling, in-process and as a subprocess."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from peace_core.cli import SUBCOMMANDS, main
from peace_registry.testing import on_sys_path, write_plugin_distribution

_counter = itertools.count()

GOOD = """
from peace_registry.testing import ToyPlugin

PEACE_PLUGIN_API = "1.0"
plugin = ToyPlugin({modality!r}, architecture={architecture!r})
"""
BROKEN = "raise RuntimeError('the wheel is incomplete')\n"


def add_dist(root: Path, dist: str, name: str, body: str, *, attr: str | None = None) -> None:
    module = f"peace_cli_tmp_{next(_counter)}"
    write_plugin_distribution(
        root,
        dist,
        version="3.1.4",
        entry_points={name: f"{module}:{attr}" if attr else module},
        files={f"{module}.py": textwrap.dedent(body)},
    )


def add_good(root: Path, modality: str = "cli_toy", architecture: str = "cli-toy-tiny") -> None:
    body = GOOD.format(modality=modality, architecture=architecture)
    add_dist(root, f"peace-{modality}", modality, body, attr="plugin")


def run_peace(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PEACE_STRICT_PLUGINS="1")
    env.pop("PEACE_DISABLE_PLUGINS", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "peace_core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Strict on purpose: `peace plugins` must still work with a broken plugin.
    monkeypatch.setenv("PEACE_STRICT_PLUGINS", "1")
    monkeypatch.delenv("PEACE_DISABLE_PLUGINS", raising=False)
    with on_sys_path(tmp_path / "site") as path:
        yield path


def listed(capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    payload = json.loads(capsys.readouterr().out)
    return {plugin["name"]: plugin for plugin in payload["plugins"]}


def test_list_json_reports_good_and_broken_plugins_even_in_strict_mode(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_good(root)
    add_dist(root, "peace-broken", "broken", BROKEN)
    assert main(["plugins", "list", "--json"]) == 0
    plugins = listed(capsys)
    good, broken = plugins["cli_toy"], plugins["broken"]
    assert (good["dist"], good["version"], good["status"]) == ("peace-cli_toy", "3.1.4", "ok")
    assert good["registers"]["modality"] == ["cli_toy"]
    assert good["registers"]["architecture"] == ["cli-toy-tiny"]
    assert broken["status"] == "failed"
    assert "RuntimeError: the wheel is incomplete" in broken["error"]


def test_list_table_names_plugins_and_errors(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_good(root)
    add_dist(root, "peace-broken", "broken", BROKEN)
    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    assert "cli_toy" in out and "peace-cli_toy" in out and "3.1.4" in out
    assert "failed" in out and "RuntimeError" in out


def test_check_passes_a_working_plugin(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_good(root)
    assert main(["plugins", "check", "cli_toy"]) == 0
    out = capsys.readouterr().out
    assert "OK   plugin 'cli_toy' (peace-cli_toy 3.1.4)" in out
    assert "OK   modality cli_toy: 13/13 checks passed" in out
    assert "OK   architecture cli-toy-tiny: config valid" in out


def test_check_fails_on_a_broken_plugin(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_good(root)
    add_dist(root, "peace-broken", "broken", BROKEN)
    assert main(["plugins", "check", "broken"]) == 1
    assert "FAIL plugin 'broken' (peace-broken 3.1.4) failed" in capsys.readouterr().out


def test_check_fails_on_a_component_that_does_not_work(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = """
    from dataclasses import replace
    from peace_registry.testing import ToyMasker, ToyPlugin

    PEACE_PLUGIN_API = "1.0"

    class HidesCls(ToyMasker):
        def __call__(self, batch, padding_mask, **kwargs):
            mask = super().__call__(batch, padding_mask, **kwargs)
            mask[:, 0] = True
            return mask

    plugin = ToyPlugin("sloppy")
    plugin.masker_spec = replace(plugin.masker_spec, build=lambda ctx: HidesCls(ctx.options))
    """
    add_dist(root, "peace-sloppy", "sloppy", body, attr="plugin")
    assert main(["plugins", "check", "sloppy"]) == 1
    out = capsys.readouterr().out
    assert "FAIL modality sloppy" in out
    assert "masker_single_view: AssertionError: single-view mask hides the CLS token" in out


def test_check_reports_an_invalid_architecture(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = """
    from peace_registry import ArchitectureSpec, hookimpl

    PEACE_PLUGIN_API = "1.0"

    @hookimpl
    def peace_register_architectures(register):
        register(ArchitectureSpec("odd", "heads do not divide dim", {"encoder": {"dim": 30}}))
    """
    add_dist(root, "peace-odd", "odd", body)
    assert main(["plugins", "check", "odd"]) == 1
    out = capsys.readouterr().out
    assert "FAIL architecture odd: invalid config" in out and "divisible by heads" in out


def test_unknown_plugin_name_is_a_one_line_error(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_good(root)
    assert main(["plugins", "check", "cli_toi"]) == 1
    captured = capsys.readouterr()
    [line] = captured.err.strip().splitlines()
    assert line.startswith("peace plugins: error: unknown plugin 'cli_toi'")
    assert "did you mean 'cli_toy'?" in line
    assert "Traceback" not in captured.err


def test_usage_errors_exit_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["plugins"]) == 2
    assert main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert "peace-core" in capsys.readouterr().out
    assert "plugins" in SUBCOMMANDS


def test_installed_plugins_are_listed_with_dists_and_versions() -> None:
    result = run_peace("plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    expected = {"core": "peace-core", "vision": "peace-vision", "audio": "peace-audio"}
    expected["text"] = "peace-text"
    for name, dist in expected.items():
        assert plugins[name]["dist"] == dist
        assert plugins[name]["version"] == importlib.metadata.version(dist)


def test_a_throwaway_distribution_is_discovered_by_a_subprocess(tmp_path: Path) -> None:
    add_good(tmp_path, modality="sub_toy", architecture="sub-toy-tiny")
    add_dist(tmp_path, "peace-sub-broken", "sub_broken", BROKEN)
    result = run_peace("plugins", "list", "--json", pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["sub_toy"]["dist"] == "peace-sub_toy"
    assert plugins["sub_toy"]["status"] == "ok"
    assert plugins["sub_toy"]["registers"]["modality"] == ["sub_toy"]
    assert plugins["sub_broken"]["status"] == "failed"


def test_a_subcommand_that_fails_to_import_does_not_break_the_others(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import peace_core.cli as cli

    monkeypatch.setattr(cli, "SUBCOMMANDS", ("plugins", "no_such_subcommand"))
    assert main(["no_such_subcommand"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "the 'no_such_subcommand' command is unavailable: ModuleNotFoundError" in line
    assert main(["plugins", "--help"]) == 0
