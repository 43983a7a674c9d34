"""Synthetic dataset generators are plugins too: ``peace data synth --kind NAME`` finds them through
the ``peace_register_datasets`` hook; the demo's own dataset is registered the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from peace_core.cli import main
from peace_core.cli.plugins import check_plugin
from peace_registry import DatasetGenerator, DatasetSpec, PluginLoadError, Registry, hookimpl
from peace_registry.testing import temporary_plugins


class CountOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    count: int = 2


def write_counts(out, options: CountOptions, *, overwrite: bool = False, jobs=None) -> dict:
    root = Path(out)
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and not overwrite:
        raise FileExistsError(f"{root} already holds a counting dataset")
    (root / "train").mkdir(parents=True, exist_ok=True)
    manifest = {
        "seed": options.seed,
        "datasets": {"train/counts": {"count": options.count, "shards": [], "urls": ""}},
    }
    manifest_path.write_text(json.dumps(manifest))
    return manifest


class CountingPlugin:
    PEACE_PLUGIN_API = "1.3"

    @hookimpl
    def peace_register_datasets(self, register):
        register(
            DatasetSpec(
                "counts", "numbers", lambda: DatasetGenerator(CountOptions, generate=write_counts)
            )
        )


@pytest.fixture
def registry():
    with temporary_plugins({"counting": CountingPlugin()}, installed=True) as registry:
        yield registry


def test_a_plugin_dataset_is_written_by_peace_data_synth(registry, tmp_path, capsys):
    assert {"counts", "demo"} <= set(registry.datasets())
    out = tmp_path / "counts"
    assert main(["data", "synth", str(out), "--kind", "counts", "--set", "count=5"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["datasets"]["train/counts"]["count"] == 5
    assert "train/counts" in capsys.readouterr().out
    assert main(["data", "synth", str(out), "--kind", "counts", "--seed", "3"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "synth", str(out), "--kind", "counts", "--seed", "3", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3


def test_bad_kinds_flags_and_options_are_named(registry, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["data", "synth", out, "--kind", "countz"]) == 1
    assert "'countz'" in capsys.readouterr().err
    # The demo's flags belong to the demo: another kind says how to set its own options.
    assert main(["data", "synth", out, "--kind", "counts", "--train-images", "3"]) == 1
    err = capsys.readouterr().err
    assert "--train-images" in err and "--set FIELD=VALUE" in err and "count" in err
    assert main(["data", "synth", out, "--kind", "counts", "--set", "cuont=3"]) == 1
    assert "cuont" in capsys.readouterr().err


def test_peace_plugins_check_loads_the_dataset(registry, capsys):
    assert check_plugin(registry, registry.plugin("counting"))
    assert "OK   dataset counts: loads; options seed, count" in capsys.readouterr().out


def test_a_dataset_needs_a_plain_name_and_a_loader():
    class Bad:
        PEACE_PLUGIN_API = "1.3"

        @hookimpl
        def peace_register_datasets(self, register):
            register(DatasetSpec("My Data", "x", lambda: None))

    with pytest.raises(PluginLoadError, match="invalid dataset name 'My Data'"):
        Registry.discover(strict=True, extra_plugins={"bad": Bad()})
