"""Wheels of the core and of every first-party plugin hold only their own import packages: no
generic top-level names (``plugins``, ``registry``, ``tests``) may land in site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = sorted(p.parent for p in (REPO / "plugins").glob("[!_]*/pyproject.toml"))


def top_level_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name.split("/", 1)[0] for name in archive.namelist()}


def build_wheel(project: Path, outdir: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"building {project.name} failed:\n{result.stderr[-3000:]}"
    [wheel] = outdir.glob("*.whl")
    return wheel


@pytest.mark.slow
def test_core_wheel_holds_only_peace_core_and_peace_registry(tmp_path: Path) -> None:
    wheel = build_wheel(REPO, tmp_path)
    names = top_level_names(wheel)
    dist_info = {n for n in names if n.endswith(".dist-info")}
    assert names - dist_info == {"peace_core", "peace_registry"}
    with zipfile.ZipFile(wheel) as archive:
        [entry_points] = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "[peace.plugins]" in text and "core = peace_core.builtin_plugin" in text
    assert "peace = peace_core.cli:main" in text


@pytest.mark.slow
@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=[p.name for p in PLUGIN_DIRS])
def test_plugin_wheel_holds_only_its_package(plugin_dir: Path, tmp_path: Path) -> None:
    names = top_level_names(build_wheel(plugin_dir, tmp_path))
    dist_info = {n for n in names if n.endswith(".dist-info")}
    assert names - dist_info == {f"peace_{plugin_dir.name}"}
