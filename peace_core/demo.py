"""The demo (``peace demo``, ``make demo``): the whole library on one CPU in minutes.

Steps, each a public piece of the library:

1. ``data``: the synthetic dataset (:func:`peace_core.data.synth.synthesize`): shapes and sounds
   with varied captions, train and held-out test splits, class prompt lists;
2. ``stage 1``: vision-language pretraining of the ``tiny`` preset with the shipped recipe
   (``configs/stage1_tiny.toml``: its text tokenizer is a byte-level BPE fitted to the training
   captions when the run starts, and travels with every checkpoint);
3. ``stage 2``: audio-language pretraining initialised from stage 1 with the shared layers and
   the vision parts frozen (``configs/stage2_tiny.toml``, ONE-PEACE's stage 2 generalised): the
   audio adapter, FFNs and head learn, and so do the text parts, while image-text batches mixed
   in ("rehearsal") keep text aligned with the frozen vision tower;
4. ``eval``: zero-shot retrieval and classification of the held-out images and sounds by the
   final (vision + audio + text) model, next to chance level;
5. ``report``: ``OUT/report`` with metrics.json, loss curves, similarity heatmaps, confusion
   matrices and a README.md summarising the run.

Both stages are the shipped tiny recipes with only data paths and step counts changed (a test
holds them equal); their configs are written to ``OUT/configs/`` so that
``peace pretrain OUT/configs/stage1.yaml`` repeats one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from peace_core.config import StrictModel
from peace_core.data.synth import SynthConfig
from peace_core.pretrain.objective import LossWeights
from peace_registry.errors import PeaceError

#: A file marking a folder as a demo's output (only such folders are cleared on a rerun).
MARKER = ".peace-demo"
#: What the demo writes under OUT; a rerun replaces exactly these.
PRODUCTS = ("data", "prompts", "configs", "stage1", "stage2", "report")


class DemoError(PeaceError, ValueError):
    """The demo cannot run as asked (e.g. its output folder holds something else)."""


class StagePlan(StrictModel):
    """One pretraining stage of the demo."""

    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0.0)
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    min_lr: float = Field(3e-6, ge=0.0, description="where the cosine schedule ends")
    weights: LossWeights = Field(default_factory=LossWeights)


class DemoPlan(StrictModel):
    """Every size and setting of a demo run (see :data:`FULL_PLAN` and :data:`QUICK_PLAN`)."""

    name: str
    synth: SynthConfig
    stage1: StagePlan
    stage2: StagePlan
    stage2_train_only: list[str] = Field(
        default_factory=lambda: ["audio"], description="what stage 2 trains (freeze.train_only)"
    )
    stage2_rehearsal: float = Field(
        0.0, ge=0.0, description="weight of image-text batches mixed into stage 2 (0: none)"
    )
    data_workers: int = Field(1, ge=0)
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; None: chosen (peace_core.threads)"
    )
    eval_batch_size: int = Field(100, gt=0)
    seed: int = Field(0, ge=0)


#: The shipped tiny recipes' settings (configs/stage1_tiny.toml, configs/stage2_tiny.toml; a test
#: holds them equal): the aligning contrast alone, AdamW at 3e-4, batches of 64, 5 % warm-up.
_ALIGN_ONLY = LossWeights(anchor=0.0, other=0.0, joint_anchor=0.0, joint_other=0.0)
_LR = 3e-4
#: The recipes' text options: a BPE fitted to the run's captions.
RECIPE_TEXT = {"tokenizer": {"kind": "fit", "vocab_size": 1024}, "max_tokens": 48}
#: Captions name the class (shape, kind of sound) always and each other attribute with
#: probability 0.25: when captions name every attribute, colour, size and position alone tell a
#: batch's captions apart and the model has little reason to learn shapes.
_CAPTION_DETAIL = 0.25
#: Enough samples that each is seen only about five times: a model from scratch that sees the
#: same few thousand images twenty times memorises them (training loss far down, held-out
#: accuracy near chance), and synthetic samples cost well under a millisecond each.

FULL_PLAN = DemoPlan(
    name="full",
    synth=SynthConfig(
        train_images=25000,
        train_sounds=10000,
        test_images=300,
        test_sounds=300,
        texts=0,
        caption_detail=_CAPTION_DETAIL,
    ),
    stage1=StagePlan(steps=2000, batch_size=64, lr=_LR, weights=_ALIGN_ONLY),
    stage2=StagePlan(steps=800, batch_size=64, lr=_LR, weights=_ALIGN_ONLY),
    stage2_train_only=["audio", "text"],
    stage2_rehearsal=0.25,
)
#: The full plan at reduced sizes (the CI end-to-end test): a few minutes, still learning.
QUICK_PLAN = FULL_PLAN.model_copy(
    update={
        "name": "quick",
        "synth": FULL_PLAN.synth.model_copy(
            update={
                "train_images": 15000,
                "train_sounds": 5000,
            }
        ),
        "stage1": FULL_PLAN.stage1.model_copy(update={"steps": 1200}),
        "stage2": FULL_PLAN.stage2.model_copy(update={"steps": 400}),
    }
)


@dataclass
class DemoResult:
    """What a demo run produced."""

    out: Path
    plan: DemoPlan
    metrics: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def report_dir(self) -> Path:
        return self.out / "report"

    def headline(self) -> dict[str, dict[str, float]]:
        """Zero-shot accuracy and chance per classified modality."""
        return {
            modality: {"accuracy": result["accuracy"], "chance": result["chance"]}
            for modality, result in self.metrics.get("classification", {}).items()
        }


# ------------------------------------------------------------------------------------ steps


def prepare_output(out: Path) -> None:
    """Make ``out`` ready: a new or empty folder, or a previous demo's (its products removed).

    Refuses a non-empty folder without the demo marker, so that nothing else is ever deleted.
    """
    if out.exists() and not out.is_dir():
        raise DemoError(f"demo output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DemoError(
            f"demo output {out} is not empty and was not written by peace demo; choose another "
            "--out or empty it"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in PRODUCTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    (out / MARKER).write_text("written by peace demo; rerunning it replaces this folder\n")


def extra_prompt_lists(out: Path) -> dict[str, Path]:
    """Prompt lists the demo adds to the dataset's own: image colour (json field ``colour``).

    Classifying the same images along a second attribute shows that one set of embeddings
    serves any prompt list, and that a prompt list can read its labels from any json field.
    """
    from peace_core.data.synth_image import COLOURS

    colour = {
        "classes": list(COLOURS),
        "templates": ["a {} shape.", "something {}.", "a {} object on a noisy background."],
        "label_field": "colour",
    }
    path = out / "prompts" / "vision_colour.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(colour, indent=2) + "\n", encoding="utf-8")
    return {"vision:colour": path}


def _dataset(data_dir: Path, kind: str, modalities: list[str], weight: float) -> dict[str, Any]:
    return {
        "name": f"synth_{kind}",
        "urls": str(data_dir / "train" / f"{kind}-*.tar"),
        "modalities": modalities,
        "weight": weight,
    }


def _data_section(
    datasets: list[dict[str, Any]], stage: StagePlan, plan: DemoPlan
) -> dict[str, Any]:
    return {
        "datasets": datasets,
        "batch_size": stage.batch_size,
        # Resampled shards: the schedule is counted in steps, whatever the dataset size.
        "epoch_samples": stage.steps * stage.batch_size,
        "shuffle_buffer": 1000,
        "workers": plan.data_workers,
        "seed": plan.seed,
    }


def _run_section(stage: StagePlan, output_dir: Path, plan: DemoPlan) -> dict[str, Any]:
    return {
        "objective": {"weights": stage.weights.model_dump(mode="json")},
        "optim": {"lr": stage.lr, "weight_decay": 0.05},
        "schedule": {
            "total_steps": stage.steps,
            "warmup_fraction": stage.warmup_fraction,
            "min_lr": stage.min_lr,
        },
        "output_dir": str(output_dir),
        "device": "cpu",
        "precision": "fp32",
        "log_every": max(1, stage.steps // 100),
        "checkpoint_every": stage.steps,
        "keep_checkpoints": 1,
        "auto_resume": False,
        "tensorboard": False,
        "seed": plan.seed + 3407,
        "threads": plan.threads,
    }


def stage1_config(out: Path, plan: DemoPlan) -> dict[str, Any]:
    """Vision-language pretraining of the tiny preset."""
    return {
        "model": {
            "preset": "tiny",
            "modalities": ["vision", "text"],
            "options": {"vision": {"image_size": plan.synth.image_size}, "text": RECIPE_TEXT},
        },
        "data": _data_section(
            [_dataset(out / "data", "image_text", ["vision", "text"], 1.0)], plan.stage1, plan
        ),
        **_run_section(plan.stage1, out / "stage1", plan),
    }


def stage2_config(out: Path, plan: DemoPlan, stage1_checkpoint: Path) -> dict[str, Any]:
    """Audio-language pretraining from stage 1, with the shared layers and vision frozen."""
    datasets = [_dataset(out / "data", "audio_text", ["audio", "text"], 1.0)]
    if plan.stage2_rehearsal > 0:
        datasets.append(
            _dataset(out / "data", "image_text", ["vision", "text"], plan.stage2_rehearsal)
        )
    return {
        "model": {
            "preset": "tiny",
            "modalities": ["vision", "audio", "text"],
            "init_from": str(stage1_checkpoint),
        },
        "freeze": {"train_only": list(plan.stage2_train_only), "reset_logit_scale": True},
        "data": _data_section(datasets, plan.stage2, plan),
        **_run_section(plan.stage2, out / "stage2", plan),
    }


# ------------------------------------------------------------------------------------ the run


def run_demo(
    out: str | os.PathLike[str] = "demo-out",
    *,
    quick: bool = False,
    plan: DemoPlan | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run every step of the demo into ``out`` (see the module docstring)."""
    from peace_core.config_io import save_config
    from peace_core.data.synth import synthesize
    from peace_core.evaluation.report import plot_loss_curves, write_evaluation_report
    from peace_core.evaluation.zero_shot import evaluate
    from peace_core.factory import from_pretrained
    from peace_core.pretrain.config import PretrainConfig
    from peace_core.pretrain.trainer import Trainer
    from peace_core.threads import apply_threads, plan_threads

    plan = plan or (QUICK_PLAN if quick else FULL_PLAN)
    out = Path(out)
    prepare_output(out)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def phase(name: str, begun: float) -> None:
        seconds[name] = round(time.perf_counter() - begun, 1)
        echo(f"[demo] {name}: {seconds[name]:.1f}s")

    begun = time.perf_counter()
    echo(f"[demo] {plan.name} run into {out}: writing the synthetic dataset")
    manifest = synthesize(out / "data", plan.synth, overwrite=True)
    phase("data", begun)

    results = {}
    stage_configs = {"stage1": stage1_config(out, plan)}
    for stage in ("stage1", "stage2"):
        begun = time.perf_counter()
        if stage == "stage2":
            stage_configs[stage] = stage2_config(out, plan, results["stage1"].checkpoint)
        config = PretrainConfig.model_validate(stage_configs[stage])
        save_config(config, out / "configs" / f"{stage}.yaml")
        echo(f"[demo] {stage}: {_describe_stage(config)}")
        trainer = Trainer(config, progress=progress, echo=echo)
        results[stage] = trainer.fit()
        phase(stage, begun)

    begun = time.perf_counter()
    threads = plan_threads(threads=plan.threads)  # evaluation reads its data in this process
    apply_threads(threads)
    echo(f"[demo] evaluation {threads.describe()}")
    model = from_pretrained(results["stage2"].model_path)
    prompts = {m: out / "data" / path for m, path in manifest["prompts"].items()}
    prompts.update(extra_prompt_lists(out))
    test_shards = [str(out / "data" / "test" / f"{kind}-*.tar") for kind in LAYOUT_TEST]
    evaluation = evaluate(model, test_shards, prompts, batch_size=plan.eval_batch_size)
    report = out / "report"
    plot_loss_curves(
        {
            "stage 1: vision-text": out / "stage1" / "metrics.jsonl",
            "stage 2: audio-text (shared layers frozen)": out / "stage2" / "metrics.jsonl",
        },
        report / "loss_curves.png",
    )
    phase("eval", begun)
    seconds["total"] = round(time.perf_counter() - started, 1)
    extra = {
        "demo": plan.name,
        "plan": plan.model_dump(mode="json"),
        "tokenizer_vocab_size": model.config.modalities["text"]["vocab_size"],
        "seconds": seconds,
        "model": str(results["stage2"].model_path),
        "training": {
            stage: {"steps": r.step, "final_loss": r.summary.get("final_loss")}
            for stage, r in results.items()
        },
    }
    metrics = write_evaluation_report(evaluation, report, extra=extra)
    metrics["files"]["loss_curves"] = "loss_curves.png"
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (report / "README.md").write_text(summary_markdown(metrics, out), encoding="utf-8")
    return DemoResult(out=out, plan=plan, metrics=metrics, seconds=seconds)


#: The held-out test datasets the demo evaluates on.
LAYOUT_TEST = ("image_text", "audio_text")


def _describe_stage(config: Any) -> str:
    weights, anchor = config.objective.weights, config.objective.anchor
    terms = [f"align {weights.align:g}"] + [
        f"dcl:{view} {weights.dcl(view, anchor):g}"
        for view in ("text", "vision", "audio", "joint:text", "joint:vision", "joint:audio")
        if weights.dcl(view, anchor) > 0 and view.split(":")[-1] in config.data.modalities
    ]
    frozen = config.freeze.train_only
    return (
        f"{config.schedule.total_steps} steps of {config.data.batch_size}, lr {config.optim.lr:g}, "
        f"loss {' + '.join(terms)}" + (f", training only {frozen}" if frozen else "")
    )


# ------------------------------------------------------------------------------------ summary


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, result, chance) for every headline number of a demo's metrics."""
    rows = []
    for modality, result in metrics.get("classification", {}).items():
        rows.append(
            (f"{modality} zero-shot accuracy", _pct(result["accuracy"]), _pct(result["chance"]))
        )
        if result.get("top5") is not None:
            rows.append(
                (f"{modality} zero-shot top-5", _pct(result["top5"]), _pct(result["chance_top5"]))
            )
    for modality, result in metrics.get("retrieval", {}).items():
        for direction, label in (
            ("item_to_text", f"{modality} → text"),
            ("text_to_item", f"text → {modality}"),
        ):
            for k in ("R@1", "R@5", "R@10"):
                rows.append(
                    (
                        f"{label} {k}",
                        _pct(result[direction][k]),
                        _pct(result["chance"][direction][k]),
                    )
                )
    return rows


def summary_markdown(metrics: dict[str, Any], out: Path) -> str:
    """The report folder's README.md."""
    plan = metrics["plan"]
    synth = plan["synth"]
    seconds = metrics["seconds"]
    lines = [
        "# peace demo report",
        "",
        f"Run `{metrics['demo']}` of `peace demo`: a `tiny` ONE-PEACE-style model pretrained on "
        "CPU on synthetic data, then evaluated zero-shot on held-out samples it never saw.",
        "",
        "1. **data**: "
        f"{synth['train_images']} training images (coloured shapes on clutter, "
        f"{synth['image_size']} px), {synth['train_sounds']} training sounds (tones, chirps, "
        f"beeps, bursts of static, clicks, sirens), each with a varied caption; "
        f"{synth['test_images']} test images and {synth['test_sounds']} test sounds.",
        f"2. **tokenizer**: a byte-level BPE of {metrics['tokenizer_vocab_size']} ids, fitted "
        'to the image captions when stage 1 started (the recipe\'s `tokenizer = {kind = "fit"}`).',
        f"3. **stage 1** (vision-text): {plan['stage1']['steps']} steps of "
        f"{plan['stage1']['batch_size']}, final loss {_loss(metrics, 'stage1')}.",
        f"4. **stage 2** (audio-text, initialised from stage 1, shared layers frozen, training "
        f"{' and '.join(plan['stage2_train_only'])}"
        + (
            f", image-text batches mixed in at weight {plan['stage2_rehearsal']:g}"
            if plan["stage2_rehearsal"]
            else ""
        )
        + f"): {plan['stage2']['steps']} steps of {plan['stage2']['batch_size']}, final "
        f"loss {_loss(metrics, 'stage2')}.",
        "5. **eval**: zero-shot classification (the class prompt lists, several templates "
        "averaged per class) and retrieval (each sample's caption is its positive).",
        "",
        "| metric | result | chance |",
        "|---|---|---|",
        *[f"| {what} | {value} | {chance} |" for what, value, chance in summary_rows(metrics)],
        "",
        "Time (s): "
        + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items() if name != "total")
        + f"; total {seconds['total']:.0f}.",
        "",
        "Notes:",
        "",
        f"- Captions always name the class (the shape; the kind of sound) and each other "
        f"attribute with probability {synth['caption_detail']:g}: when every caption names "
        "colour, size and position, those alone tell a batch's captions apart and a small model "
        "has little reason to learn shapes.",
        "- Both stages are the shipped tiny recipes (`configs/stage1_tiny.toml`, "
        "`configs/stage2_tiny.toml`) with only data paths and step counts changed. They train "
        "the aligning contrast only: on a CPU, each denoising view of the full ONE-PEACE "
        "objective costs another encoder pass a step.",
        "- `vision:colour` classifies the same test images by colour with the same zero-shot "
        "machinery (prompt list `../prompts/vision_colour.json`, labels from the json field "
        "`colour`).",
        "",
        "Files: `metrics.json` (every number), `loss_curves.png`, "
        + ", ".join(f"`{name}`" for key, name in metrics["files"].items() if key != "loss_curves")
        + ". The stage configs are in `../configs/` (`peace pretrain ../configs/stage1.yaml` "
        "repeats stage 1); the final model is `../stage2/model.safetensors` "
        "(`peace eval` and `peace embed` read it).",
        "",
    ]
    return "\n".join(lines)


def _loss(metrics: dict[str, Any], stage: str) -> str:
    loss = metrics["training"][stage]["final_loss"]
    return "—" if loss is None else f"{loss:.3f}"
