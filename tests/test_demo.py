"""``peace demo``: its pieces (output folder, stage configs, summary) and, marked slow, the quick
demo end to end, which must learn: zero-shot accuracy above chance for images and sounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peace_core.cli import main
from peace_core.demo import (
    FULL_PLAN,
    MARKER,
    QUICK_PLAN,
    DemoError,
    prepare_output,
    stage1_config,
    stage2_config,
    summary_rows,
)
from peace_core.pretrain.config import PretrainConfig, load_pretrain_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_output_folder_is_only_cleared_when_a_demo_wrote_it(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match="not written by peace demo"):
        prepare_output(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"

    demo = tmp_path / "demo"
    prepare_output(demo)  # a new folder
    assert (demo / MARKER).is_file()
    (demo / "stage1").mkdir()
    (demo / "stage1" / "old.pt").write_text("x")
    (demo / "notes.txt").write_text("kept")
    prepare_output(demo)  # a previous demo: its products go, nothing else
    assert not (demo / "stage1").exists()
    assert (demo / "notes.txt").read_text() == "kept"


def test_plans_fit_their_budgets() -> None:
    # The quick plan is a strict reduction of the full one.
    assert QUICK_PLAN.stage1.steps < FULL_PLAN.stage1.steps
    assert QUICK_PLAN.stage2.steps < FULL_PLAN.stage2.steps
    assert QUICK_PLAN.synth.train_images < FULL_PLAN.synth.train_images


def test_stage_configs_are_valid_pretraining_configs(tmp_path: Path) -> None:
    first = PretrainConfig.model_validate(stage1_config(tmp_path, QUICK_PLAN))
    assert first.model.modalities == ["vision", "text"]
    assert first.data.modalities == ["text", "vision"]
    assert first.schedule.total_steps == QUICK_PLAN.stage1.steps
    assert first.model.options["text"]["tokenizer"]["kind"] == "fit"
    assert not first.auto_resume  # a rerun must not continue an old run

    checkpoint = tmp_path / "stage1" / "checkpoints" / "step_00000001.pt"
    second = PretrainConfig.model_validate(stage2_config(tmp_path, QUICK_PLAN, checkpoint))
    assert second.model.init_from == str(checkpoint)
    assert second.model.modalities == ["vision", "audio", "text"]
    assert second.freeze.train_only == QUICK_PLAN.stage2_train_only
    assert "vision" not in second.freeze.train_only and second.freeze.reset_logit_scale
    weights = {d.name: d.weight for d in second.data.datasets}
    assert weights == {"synth_audio_text": 1.0, "synth_image_text": QUICK_PLAN.stage2_rehearsal}
    assert second.objective.weights.dcl("text", second.objective.anchor) == 0.0

    alone = QUICK_PLAN.model_copy(update={"stage2_rehearsal": 0.0})
    second = PretrainConfig.model_validate(stage2_config(tmp_path, alone, checkpoint))
    assert second.data.modalities == ["audio", "text"]


#: What a demo stage may change in a shipped recipe: data paths and sizes, step counts, and
#: where and how often it writes (the library's defaults are what it trains with).
_RUN_FIELDS = {"output_dir", "device", "precision", "log_every", "checkpoint_every"}
_RUN_FIELDS |= {"keep_checkpoints", "auto_resume", "tensorboard", "seed"}


def _learning_settings(config: PretrainConfig) -> dict:
    raw = config.model_dump(mode="json", exclude=_RUN_FIELDS)
    raw["schedule"].pop("total_steps")
    raw["model"].pop("init_from")
    raw["model"]["options"].pop("vision", None)  # the synthetic images' size
    data = raw.pop("data")
    raw["batch_size"] = data["batch_size"]
    raw["dataset_weights"] = sorted((d["modalities"], d["weight"]) for d in data["datasets"])
    return raw


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_demo_stages_are_the_shipped_recipes(tmp_path: Path, stage: str) -> None:
    recipe = load_pretrain_config(CONFIGS / f"{stage}_tiny.toml")
    checkpoint = tmp_path / "stage1" / "checkpoints" / "step_00000001.pt"
    raw = stage1_config(tmp_path, FULL_PLAN) if stage == "stage1" else None
    raw = raw or stage2_config(tmp_path, FULL_PLAN, checkpoint)
    demo = PretrainConfig.model_validate(raw)
    assert _learning_settings(demo) == _learning_settings(recipe)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.*")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    config = load_pretrain_config(path)
    assert (config.schedule.total_steps or config.schedule.epochs) and config.data.datasets


def test_summary_rows_pair_results_with_chance() -> None:
    metrics = {
        "classification": {
            "vision": {"accuracy": 0.5, "chance": 1 / 6, "top5": 0.9, "chance_top5": 5 / 6},
            "audio": {"accuracy": 0.75, "chance": 0.25, "top5": None, "chance_top5": None},
        },
        "retrieval": {
            "audio": {
                "item_to_text": {"R@1": 0.1, "R@5": 0.2, "R@10": 0.3},
                "text_to_item": {"R@1": 0.4, "R@5": 0.5, "R@10": 0.6},
                "chance": {
                    "item_to_text": {"R@1": 0.01, "R@5": 0.05, "R@10": 0.1},
                    "text_to_item": {"R@1": 0.01, "R@5": 0.05, "R@10": 0.1},
                },
            }
        },
    }
    rows = summary_rows(metrics)
    assert rows[0] == ("vision zero-shot accuracy", "50.0%", "16.7%")
    assert rows[1] == ("vision zero-shot top-5", "90.0%", "83.3%")
    assert rows[2] == ("audio zero-shot accuracy", "75.0%", "25.0%")
    assert ("text → audio R@10", "60.0%", "10.0%") in rows
    assert len(rows) == 3 + 6


def test_demo_refuses_a_foreign_output_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "paper.md").write_text("x")
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 1
    assert "not written by peace demo" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_learns_above_chance(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "results next to chance" in printed
    report = out / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    # Six balanced classes each (shapes; kinds of sound): chance is 1/6; demand clearly more.
    for task in ("vision", "audio"):
        result = metrics["classification"][task]
        assert result["chance"] == pytest.approx(1 / 6)
        assert result["accuracy"] > 1.5 * result["chance"], (task, result["accuracy"])
    assert metrics["classification"]["vision:colour"]["accuracy"] > 1.5 / 6
    for modality in ("vision", "audio"):
        retrieval = metrics["retrieval"][modality]
        for k in ("R@5", "R@10"):
            assert retrieval["item_to_text"][k] > 1.5 * retrieval["chance"]["item_to_text"][k]
            assert retrieval["text_to_item"][k] > 1.5 * retrieval["chance"]["text_to_item"][k]
    for name in (
        "README.md",
        "loss_curves.png",
        "confusion_vision.png",
        "confusion_audio.png",
        "similarity_vision.png",
        "similarity_audio.png",
    ):
        assert (report / name).is_file(), name
    readme = (report / "README.md").read_text()
    assert "| vision zero-shot accuracy |" in readme
    assert (out / "configs" / "stage1.yaml").is_file()
    assert (out / "stage2" / "model.safetensors").is_file()
