"""The copy-me plugin template works as its README says: copy it, rename it by plain text
substitution, build a wheel, install it; peace then discovers the new modality through its entry
point, ``peace plugins check`` passes and the copy's own tests pass against the installed wheel.

Everything is installed into a temporary ``--target`` directory put on ``PYTHONPATH`` of the
subprocesses; the shared environment is never touched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "plugins" / "_template"
CONTRIBUTING = REPO / "CONTRIBUTING.md"

#: What the template's README tells a user to replace, in this order.
RENAMES = {
    "peace_template": "peace_wristband",
    "peace-template": "peace-wristband",
    "Signal": "Wristband",
    "signal": "wristband",
}
#: Files a user edits after copying; their text must not mention the template any more.
SOURCE_SUFFIXES = {".py", ".toml", ".md"}


def copy_and_rename(destination: Path) -> Path:
    shutil.copytree(
        TEMPLATE,
        destination,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".*_cache"),
    )
    (destination / "conftest.py").unlink()  # the README: only the peace repository needs it
    (destination / "src" / "peace_template").rename(destination / "src" / "peace_wristband")
    for path in destination.rglob("*"):
        if path.is_file() and path.suffix in SOURCE_SUFFIXES:
            text = path.read_text(encoding="utf-8")
            for old, new in RENAMES.items():
                text = text.replace(old, new)
            path.write_text(text, encoding="utf-8")
    return destination


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """``python args...``; its stdout (stderr too when it fails)."""
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"python {' '.join(args)} failed:\n{output[-4000:]}"
    return result.stdout


@pytest.mark.slow
def test_a_renamed_copy_builds_installs_is_discovered_and_passes_its_tests(tmp_path: Path) -> None:
    project = copy_and_rename(tmp_path / "peace-wristband")
    leftovers = [
        str(path.relative_to(project))
        for path in project.rglob("*")
        if path.is_file()
        and path.suffix in {".py", ".toml"}
        and re.search("signal|template", path.read_text(encoding="utf-8"), re.IGNORECASE)
    ]
    assert not leftovers, f"the README's renames miss something in {leftovers}"
    # CONTRIBUTING.md shows the renamed pyproject.toml in full: it is the one built below.
    shown = re.search(r"```toml\n(\[build-system\].*?)```", CONTRIBUTING.read_text(), re.DOTALL)
    assert shown and shown[1] == (project / "pyproject.toml").read_text(), "CONTRIBUTING.md differs"

    # Build and install exactly as a user without network would.
    dist, site = tmp_path / "dist", tmp_path / "site"
    run("-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), cwd=project)
    [wheel] = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_text = archive.read(entry_points).decode()
    assert {n.split("/", 1)[0] for n in names if ".dist-info/" not in n} == {"peace_wristband"}
    assert "[peace.plugins]\nwristband = peace_wristband.plugin" in entry_text
    pip = ("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--target")
    run(*pip, str(site), "--disable-pip-version-check", str(wheel), cwd=tmp_path)

    env = dict(os.environ, PYTHONPATH=str(site), PEACE_STRICT_PLUGINS="1")
    env.pop("PEACE_DISABLE_PLUGINS", None)

    # (a) discovered through its entry point, and the command-line checks pass.
    listing = run("-m", "peace_core.cli", "plugins", "list", "--json", cwd=tmp_path, env=env)
    record = {p["name"]: p for p in json.loads(listing)["plugins"]}["wristband"]
    assert (record["dist"], record["entry"]) == ("peace-wristband", "peace_wristband.plugin")
    assert record["status"] == "ok", record
    kinds = ("modality", "adapter", "masker", "preprocessor")
    assert record["registers"] == {kind: ["wristband"] for kind in kinds}
    check = run("-m", "peace_core.cli", "plugins", "check", "wristband", cwd=tmp_path, env=env)
    assert re.search(r"OK\s+modality wristband: (\d+)/\1 checks passed", check), check
    assert "1/1 plugins passed" in check, check

    # (b) the copy's own tests (conformance suite + behaviour), against the installed wheel.
    tests = run("-m", "pytest", "-v", "-p", "no:cacheprovider", "tests", cwd=project, env=env)
    for name in ("adapter_keep", "masker_single_view", "meta_device", "backward_per_layer_tables"):
        assert f"TestWristbandConformance::test_{name} PASSED" in tests, tests
    # skipped: no FFN (core default) and no adapter precompute (optional)
    summary = re.search(r"(\d+) passed, 2 skipped\b", tests)
    assert summary and int(summary[1]) >= 20, tests

    assert importlib.util.find_spec("peace_wristband") is None, "installed outside the temp dir"
