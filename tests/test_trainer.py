"""The pretraining trainer: freezing, exact resume, the run state on its own, optimizer groups,
schedule, configs, CLI."""

from __future__ import annotations

import copy
import io
import json
import math
import random
import tarfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from training_helpers import (
    MICRO_DECODER,
    MICRO_MODEL,
    losses,
    micro_dataset,
    single_process,
    stage1_config,
    torchrun,
)

from peace_core import from_pretrained
from peace_core.checkpoint import CheckpointError, read_checkpoint
from peace_core.cli import main as peace_main
from peace_core.config_io import ConfigError, load_config, read_config_file
from peace_core.data.pipeline import raw_samples
from peace_core.data.stats import DataStats
from peace_core.pretrain.build import build_model
from peace_core.pretrain.config import PretrainConfig, load_pretrain_config
from peace_core.pretrain.freeze import FreezeConfig, apply_freeze
from peace_core.pretrain.logging import read_metrics, tensorboard_tag, truncate_metrics
from peace_core.pretrain.objective import PretrainObjective
from peace_core.pretrain.optim import (
    ResolvedSchedule,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    lr_at,
    param_groups,
)
from peace_core.pretrain.run_state import (
    CheckpointStore,
    RunState,
    config_changes,
    find_checkpoint,
    stats_from_plain,
    stats_to_plain,
)
from peace_core.pretrain.runtime import IsolatedRng, RunContext, resolve_precision
from peace_core.pretrain.strategy import TrainingStrategy
from peace_core.pretrain.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Tiny tensors: several threads only fight over a shared CPU (orders of magnitude slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("PEACE_THREADS", "1")  # what the trainer applies
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return micro_dataset(tmp_path_factory.mktemp("synth"))


def validated(raw: dict[str, Any]) -> PretrainConfig:
    return load_config(PretrainConfig, base=raw)


def all_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.objective.state_dict().items()}


# ---- optimizer groups and schedule ---------------------------------------------------------


def test_no_decay_on_biases_norms_tokens_positions_and_logit_scale() -> None:
    model = build_model(validated(stage1_config(Path("."), Path("."))).model)
    objective = PretrainObjective(model, validated(stage1_config(Path("."), Path("."))).objective)
    groups = {g["group"]: g for g in param_groups(objective, 0.05)}
    no_decay, decay = set(groups["no_decay"]["names"]), set(groups["decay"]["names"])
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05
    named = dict(objective.named_parameters())
    assert no_decay | decay == set(named) and not no_decay & decay
    for name, param in named.items():
        if param.ndim < 2:
            assert name in no_decay, name  # biases, norm gains, LayerScale gammas, logit_scale
    for name in (
        "model.logit_scale",
        "model.adapters.vision.cls_token",
        "model.adapters.vision.pos_embed",
        "model.adapters.text.pos_embed.weight",
        "model.adapters.text.rel_pos_tables.0.weight",
        "model.encoder.blocks.0.attn_scale.gamma",
        "model.encoder.blocks.0.attn.q_proj.bias",
        "model.encoder.final_norms.text.weight",
        "decoder.mask_tokens.text",
        "decoder.positions.vision.weight",
    ):
        assert name in no_decay, name
    for name in (
        "model.adapters.text.token_embed.weight",
        "model.encoder.blocks.0.attn.q_proj.weight",
        "model.encoder.blocks.0.ffns.vision.wo.weight",
        "model.projections.vision.weight",
        "decoder.mask_heads.text.weight",
    ):
        assert name in decay, name


def test_weight_decay_moves_only_decayed_parameters() -> None:
    raw = stage1_config(Path("."), Path("."), optim={"lr": 0.1, "weight_decay": 0.5})
    config = validated(raw)
    objective = PretrainObjective(build_model(config.model), config.objective)
    before = {n: p.detach().clone() for n, p in objective.named_parameters()}
    optimizer = build_optimizer(objective, config.optim)
    for param in objective.parameters():
        param.grad = torch.zeros_like(param)  # no gradient signal: only decay can move weights
    optimizer.step()
    decayed = set(next(g for g in optimizer.param_groups if g["group"] == "decay")["names"])
    for name, param in objective.named_parameters():
        moved = not torch.equal(param.detach(), before[name])
        assert moved == (name in decayed and bool(before[name].abs().sum() > 0)), name


def test_frozen_parameters_are_left_out_of_the_groups() -> None:
    layer = torch.nn.Linear(3, 3)
    layer.bias.requires_grad_(False)
    groups = param_groups(layer, 0.1)
    assert [g["names"] for g in groups] == [["weight"]]
    layer.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        param_groups(layer, 0.1)


def test_schedule_values() -> None:
    schedule = ResolvedSchedule(total_steps=110, warmup_steps=10, min_lr=1e-5, kind="cosine")
    peak = 1e-3
    assert lr_at(0, peak, schedule) == pytest.approx(1e-4)
    assert lr_at(4, peak, schedule) == pytest.approx(5e-4)
    assert lr_at(9, peak, schedule) == pytest.approx(peak)
    assert lr_at(10, peak, schedule) == pytest.approx(peak)
    assert lr_at(60, peak, schedule) == pytest.approx((peak + 1e-5) / 2)
    assert lr_at(35, peak, schedule) == pytest.approx(
        1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.25))
    )
    assert lr_at(110, peak, schedule) == pytest.approx(1e-5)
    assert lr_at(500, peak, schedule) == pytest.approx(1e-5)
    constant = ResolvedSchedule(total_steps=10, warmup_steps=0, min_lr=0.0, kind="constant")
    assert lr_at(7, peak, constant) == peak


def test_the_scheduler_drives_the_optimizer_step_by_step() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    schedule = ResolvedSchedule(total_steps=8, warmup_steps=2, min_lr=1e-6, kind="cosine")
    scheduler = build_scheduler(optimizer, 1e-3, schedule)
    seen = []
    for _ in range(9):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(step, 1e-3, schedule) for step in range(9)])


def test_schedule_resolution_and_errors() -> None:
    resolved = ScheduleConfig(total_steps=200, warmup_fraction=0.1).resolve()
    assert (resolved.total_steps, resolved.warmup_steps) == (200, 20)
    by_epochs = ScheduleConfig(epochs=2.5, warmup_fraction=0.1).resolve(steps_per_epoch=40)
    assert (by_epochs.total_steps, by_epochs.warmup_steps) == (100, 10)
    assert ScheduleConfig(total_steps=5).resolve().warmup_steps == 0
    with pytest.raises(ValueError, match="needs a known epoch length"):
        ScheduleConfig(epochs=1).resolve()
    with pytest.raises(
        ValueError, match=r"exactly one of schedule.total_steps and schedule.epochs"
    ):
        ScheduleConfig(total_steps=5, epochs=1)
    with pytest.raises(ValueError, match=r"at most one of schedule.warmup_steps"):
        ScheduleConfig(total_steps=5, warmup_steps=1, warmup_fraction=0.1)
    with pytest.raises(ValueError, match="must be shorter than the schedule"):
        ScheduleConfig(total_steps=5, warmup_steps=5).resolve()


# ---- configs -------------------------------------------------------------------------------


def test_a_typo_in_the_pretrain_config_lists_valid_fields(tmp_path: Path) -> None:
    raw = stage1_config(tmp_path, tmp_path, optim={"lrr": 1e-3})
    with pytest.raises(ConfigError) as caught:
        validated(raw)
    message = str(caught.value)
    assert "optim.lrr: unknown field (did you mean 'lr'?)" in message
    assert "valid fields of optim: betas, eps, lr, no_decay_names, weight_decay" in message

    raw = stage1_config(tmp_path, tmp_path, clip_nrom=1.0)
    with pytest.raises(ConfigError, match=r"clip_nrom: unknown field \(did you mean 'clip_norm'"):
        validated(raw)

    raw = stage1_config(tmp_path, tmp_path)
    raw["model"]["config"]["encoder"]["dimm"] = 8
    with pytest.raises(ConfigError, match=r"model.config.encoder.dimm: unknown field \(did you"):
        validated(raw)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"precision": "fp8"}, r"precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ({"device": "tpu:0"}, r"unknown device 'tpu:0'"),
        ({"grad_accum_steps": 0}, r"grad_accum_steps: Input should be greater than or equal to 1"),
        ({"schedule": {"total_steps": 4, "min_lr": 1.0}}, r"min_lr \(1.0\) is above optim.lr"),
        ({"freeze": {"train_only": ["audio"]}}, r"freeze.train_only names \['audio'\]"),
        ({"model": {"preset": "tiny", "config": MICRO_MODEL}}, r"not both"),
        ({"model": {"modalities": ["text"]}}, r"give model.preset, model.config or model.init"),
    ],
)
def test_inconsistent_settings_are_rejected(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    raw = stage1_config(tmp_path, tmp_path)
    raw.update(change)
    with pytest.raises(ConfigError, match=message):
        validated(raw)


def test_data_modalities_must_be_built(tmp_path: Path) -> None:
    raw = stage1_config(tmp_path, tmp_path)
    raw["model"]["modalities"] = ["text"]
    with pytest.raises(ConfigError, match=r"data needs modalities \['vision'\]"):
        validated(raw)


def test_set_overrides_and_toml_yaml_parity(tmp_path: Path) -> None:
    stage1 = load_pretrain_config(
        REPO / "configs" / "stage1_tiny.toml",
        ["optim.lr=3e-4", "data.datasets.0.weight=2", "model.modalities=[text, vision]"],
    )
    assert stage1.optim.lr == 3e-4
    assert stage1.data.datasets[0].weight == 2.0
    assert stage1.model.modalities == ["text", "vision"]
    # The same config written as YAML reads the same.
    raw = read_config_file(REPO / "configs" / "stage1_tiny.toml")
    import yaml

    (tmp_path / "same.yaml").write_text(yaml.safe_dump(raw))
    assert load_pretrain_config(tmp_path / "same.yaml") == load_pretrain_config(
        REPO / "configs" / "stage1_tiny.toml"
    )


def test_example_configs_hold_the_official_hyper_parameters() -> None:
    stage1 = load_pretrain_config(REPO / "configs" / "stage1_4b.yaml")
    stage2 = load_pretrain_config(REPO / "configs" / "stage2_4b.yaml")
    for config in (stage1, stage2):
        assert config.model.preset == "one-peace-4b"
        assert (config.optim.betas, config.optim.eps, config.optim.weight_decay) == (
            (0.9, 0.98),
            1e-8,
            0.05,
        )
        assert (config.clip_norm, config.seed, config.schedule.min_lr) == (3.0, 3407, 1e-6)
        assert config.precision == "bf16" and config.grad_checkpointing
    assert (stage1.optim.lr, stage1.schedule.total_steps, stage1.schedule.warmup_steps) == (
        5e-4,
        200_000,
        3000,
    )
    assert stage1.data.batch_size == 32 and stage1.model.modalities == ["vision", "text"]
    weights = stage1.objective.weights
    assert (weights.anchor, weights.other, weights.joint_anchor, weights.joint_other) == (
        0.5,
        1.0,
        0.5,
        0.5,
    )
    assert (stage2.optim.lr, stage2.schedule.epochs, stage2.schedule.warmup_fraction) == (
        2e-4,
        10,
        0.1,
    )
    assert stage2.data.batch_size == 16
    assert stage2.freeze.train_only == ["audio"] and stage2.freeze.reset_logit_scale
    assert stage2.objective.weights.dcl("audio", "text") == 1.0
    assert stage2.objective.weights.dcl("text", "text") == 0.0
    assert stage2.objective.single_targets_from_joint == ["audio"]
    tiny2 = load_pretrain_config(REPO / "configs" / "stage2_tiny.toml")
    assert tiny2.model.init_from == "runs/stage1_tiny"
    assert tiny2.freeze.train_only == ["audio", "text"]


def test_a_fit_tokenizer_is_trained_on_the_run_captions_and_kept_by_the_next_stage(
    synth_root: Path, tmp_path: Path
) -> None:
    raw = stage1_config(synth_root, tmp_path / "s1")
    fit = {"tokenizer": {"kind": "fit", "vocab_size": 300}}
    raw["model"]["options"] = {"text": fit}
    raw["schedule"] = {"total_steps": 2}
    trainer = Trainer(validated(raw), progress=False)
    result = trainer.fit()
    text = trainer.objective.model.config.modalities["text"]
    assert text["tokenizer"]["kind"] == "trained"
    assert 260 < text["vocab_size"] <= 300
    # The fitted tokenizer travels with the model: it encodes a caption word in fewer tokens.
    model = from_pretrained(result.model_path)
    assert model.config.modalities["text"] == text
    ids = model.preprocess(text=["a red square"])["text"]["tokens"]
    assert ids.shape[-1] < len("a red square") + 1
    # Fitting again on the same data gives the same tokenizer (a resumed run rebuilds it).
    again = build_model(validated(raw).model, samples=partial(raw_samples, validated(raw).data))
    assert again.config.modalities["text"] == text

    # Stage 2 keeps the checkpoint's tokenizer (its text weights were trained with it); asking
    # to fit another one is refused, not done.
    stage2 = stage2_config(synth_root, tmp_path / "s2", tmp_path / "s1")
    second = Trainer(validated(stage2), progress=False)
    second.setup()
    assert second.objective.model.config.modalities["text"]["tokenizer"] == text["tokenizer"]
    stage2["model"]["options"] = {"text": fit}
    with pytest.raises(ValueError, match=r"model.options.text asks for options fitted"):
        Trainer(validated(stage2), progress=False).setup()


def test_a_fit_tokenizer_needs_captions(synth_root: Path, tmp_path: Path) -> None:
    raw = stage1_config(synth_root, tmp_path / "run")
    raw["model"]["options"] = {"text": {"tokenizer": {"kind": "fit"}}}
    config = validated(raw)
    with pytest.raises(ValueError, match="no captions"):
        build_model(config.model, samples=lambda modality: iter([{"png": b"x"}]))
    # Built without data, the unfitted tokenizer says how to fit it.
    with pytest.raises(ValueError, match=r"has not been trained yet.*fit_text_options"):
        build_model(config.model)


def test_init_from_takes_the_preset_with_its_overrides(tmp_path: Path) -> None:
    from peace_core import create_model, resolve_config, save_pretrained
    from peace_core.pretrain.config import ModelSection

    narrow = {"dim": 32, "ffn_dim": 64, "heads": 2}
    first = create_model(resolve_config("tiny", ["vision", "text"], **narrow))
    path = save_pretrained(first, tmp_path / "stage1.safetensors")
    # The preset as overridden matches the checkpoint: audio is added, vision carried over.
    section = ModelSection(
        preset="tiny", modalities=["vision", "audio", "text"], overrides=narrow, init_from=str(path)
    )
    model = build_model(section)
    assert model.config.encoder.dim == 32 and model.modalities == ("vision", "audio", "text")
    torch.testing.assert_close(
        model.adapters["vision"].cls_token, first.adapters["vision"].cls_token
    )
    # Without the overrides the preset names another encoder: a clear error.
    plain = section.model_copy(update={"overrides": {}})
    with pytest.raises(ValueError, match=r"another encoder.*dim \(128 vs 32\)"):
        build_model(plain)


# ---- freezing (stage 2) --------------------------------------------------------------------


def stage2_config(synth_root: Path, output: Path, init_from: Path) -> dict[str, Any]:
    raw = stage1_config(synth_root, output)
    raw["model"] = {
        "config": copy.deepcopy(MICRO_MODEL),
        "modalities": ["audio", "text"],
        "init_from": str(init_from),
    }
    raw["data"]["datasets"] = [
        {
            "name": "sounds",
            "urls": str(synth_root / "train" / "audio_text-*.tar"),
            "modalities": ["audio", "text"],
        }
    ]
    raw["freeze"] = {"train_only": ["audio"], "reset_logit_scale": True}
    raw["objective"] = {
        "decoder": dict(MICRO_DECODER),
        "single_targets_from_joint": ["audio"],
        "weights": {"anchor": 0.0},
    }
    raw["schedule"] = {"total_steps": 2}
    return raw


def is_trainable_in_stage2(name: str) -> bool:
    audio = (
        name.startswith("model.adapters.audio.")
        or ".ffns.audio." in name
        or name.startswith("model.encoder.final_norms.audio.")
        or name.startswith("model.projections.audio.")
    )
    return audio or name == "model.logit_scale" or name.startswith("decoder.")


def test_stage2_trains_only_the_new_modality_logit_scale_and_decoder(
    synth_root: Path, tmp_path: Path
) -> None:
    stage1 = Trainer(validated(stage1_config(synth_root, tmp_path / "s1")), progress=False).fit()
    stage1_weights = read_checkpoint(stage1.checkpoint)

    trainer = Trainer(
        validated(stage2_config(synth_root, tmp_path / "s2", tmp_path / "s1")), progress=False
    )
    trainer.setup()
    assert trainer.decoder_loaded > 0  # the stage-1 decoder's text and shared tensors
    before = all_tensors(trainer)
    # Stage 1's shared and text weights were loaded; vision was dropped; audio is new.
    for key, value in stage1_weights["state_dict"].items():
        if key == "logit_scale":
            continue
        if ".vision" in key:
            assert f"model.{key}" not in before, key
            continue
        assert torch.equal(before[f"model.{key}"], value), key
    assert before["model.logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    assert stage1_weights["state_dict"]["logit_scale"].item() != pytest.approx(math.log(1 / 0.07))

    result = trainer.fit()
    assert result.step == 2
    after = all_tensors(trainer)
    trainable = {n for n, p in trainer.objective.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if is_trainable_in_stage2(n)}
    for name, value in before.items():
        if is_trainable_in_stage2(name):
            assert not torch.equal(after[name], value), f"{name} did not learn"
        else:
            assert torch.equal(after[name], value), f"{name} changed although frozen"


def test_train_only_rejects_modalities_the_model_lacks(tmp_path: Path) -> None:
    config = validated(stage1_config(tmp_path, tmp_path))
    objective = PretrainObjective(build_model(config.model), config.objective)
    with pytest.raises(ValueError, match=r"train_only names \['audio'\].*built with"):
        apply_freeze(objective, FreezeConfig(train_only=["audio"]))
    report = apply_freeze(objective, FreezeConfig(train_only=["vision"]))
    assert report.frozen_count > 0 and report.trainable_count > 0
    assert "model.adapters.text.token_embed.weight" in report.frozen
    assert "model.adapters.vision.cls_token" in report.trainable


# ---- exact resume --------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_an_uninterrupted_run(synth_root: Path, tmp_path: Path, workers: int) -> None:
    # 4 batches per epoch: the 6 steps cross an epoch; vision crops and masks draw randomness.
    raw = stage1_config(synth_root, tmp_path / "full", grad_accum_steps=1)
    raw["data"]["workers"] = workers
    full = Trainer(validated(raw), progress=False)
    full_result = full.fit()

    raw["output_dir"] = str(tmp_path / "split")
    raw["checkpoint_every"] = 2
    raw["keep_checkpoints"] = 1
    first = Trainer(validated(raw), progress=False, max_steps=3).fit()
    assert first.step == 3
    store = CheckpointStore(tmp_path / "split" / "checkpoints")
    assert [step for step, _ in store.steps()] == [3]  # step 2 was pruned, 3 is the stop point
    assert store.latest() == first.checkpoint

    second_trainer = Trainer(validated(raw), progress=False)
    second = second_trainer.fit()
    assert second.resumed_from == first.checkpoint and second.step == 6
    assert first.losses + second.losses == full_result.losses  # exactly
    full_state, split_state = all_tensors(full), all_tensors(second_trainer)
    assert full_state.keys() == split_state.keys()
    for name, value in full_state.items():
        assert torch.equal(value, split_state[name]), name
    steps = [record["step"] for record in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_accumulation_continues_the_data_stream(
    synth_root: Path, tmp_path: Path
) -> None:
    raw = stage1_config(synth_root, tmp_path / "full", grad_accum_steps=2)
    raw["schedule"] = {"total_steps": 4}
    full = Trainer(validated(raw), progress=False).fit()
    raw["output_dir"] = str(tmp_path / "split")
    Trainer(validated(raw), progress=False, max_steps=2).fit()
    resumed = Trainer(validated(raw), progress=False, resume=tmp_path / "split").fit()
    assert resumed.losses == full.losses[2:]
    assert resumed.data_stats.as_dict() == full.data_stats.as_dict()


def test_resume_follows_a_changed_learning_rate_and_says_so(
    synth_root: Path, tmp_path: Path
) -> None:
    raw = stage1_config(synth_root, tmp_path / "run", schedule={"total_steps": 4})
    Trainer(validated(raw), progress=False, max_steps=1).fit()
    raw["optim"] = {"lr": 1e-3, "weight_decay": 0.1}
    echoed: list[str] = []
    trainer = Trainer(validated(raw), progress=False, max_steps=2, echo=echoed.append)
    result = trainer.fit()
    schedule = ResolvedSchedule(total_steps=4, warmup_steps=0, min_lr=1e-6, kind="cosine")
    assert result.records[0]["step"] == 2
    assert result.records[0]["lr"] == pytest.approx(lr_at(1, 1e-3, schedule))
    decay = [g for g in trainer.optimizer.param_groups if g["group"] == "decay"]
    assert decay[0]["weight_decay"] == 0.1
    assert any("config differs" in line and "optim.lr" in line for line in echoed)


def test_resuming_from_a_model_file_is_refused(synth_root: Path, tmp_path: Path) -> None:
    raw = stage1_config(synth_root, tmp_path / "run", schedule={"total_steps": 1})
    result = Trainer(validated(raw), progress=False).fit()
    with pytest.raises(CheckpointError, match=r"not a pretraining checkpoint.*model.init_from"):
        Trainer(validated(raw), progress=False, resume=result.model_path).setup()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        Trainer(validated(raw), progress=False, resume=tmp_path).setup()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _draw() -> tuple[torch.Tensor, float, float]:
    return torch.rand(3), random.random(), float(np.random.rand())


def test_isolated_rng_leaves_the_outer_streams_alone() -> None:
    _seed_all(1)
    expected = _draw()
    _seed_all(1)
    isolated = IsolatedRng(seed=7)
    with isolated.active():
        inside_first = _draw()
    with isolated.active():
        inside_second = _draw()
    outside = _draw()
    assert torch.equal(outside[0], expected[0]) and outside[1:] == expected[1:]
    assert not torch.equal(inside_first[0], inside_second[0])  # the isolated stream advances
    assert inside_first[1:] != inside_second[1:]
    isolated.reseed(7)
    with isolated.active():
        again = _draw()
    assert torch.equal(again[0], inside_first[0]) and again[1:] == inside_first[1:]


# ---- the whole run: loss falls, bad samples are counted ------------------------------------


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def plant_bad_shard(path: Path, good_shard: Path) -> dict[str, int]:
    """A shard with two good samples (copied) and three bad ones; returns the planted reasons."""
    with tarfile.open(good_shard) as source:
        members = [(m.name, source.extractfile(m).read()) for m in source.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members[:6]:  # the first two samples (jpg, json, txt each)
            _tar_member(tar, name.replace("train_image", "planted_image"), data)
        _tar_member(tar, "corrupt.jpg", b"\xff\xd8 not a jpeg at all")
        _tar_member(tar, "corrupt.txt", b"a caption")
        _tar_member(tar, "nocaption.jpg", members[0][1])
        _tar_member(tar, "nocaption.json", b"{}")
        _tar_member(tar, "lonely.txt", b"text without an image")
    return {"corrupt", "nocaption", "lonely"}


def test_loss_falls_and_bad_samples_are_skipped_and_reported(
    synth_root: Path, tmp_path: Path
) -> None:
    shards = sorted((synth_root / "train").glob("image_text-*.tar"))
    plant_bad_shard(tmp_path / "planted.tar", shards[0])
    raw = stage1_config(synth_root, tmp_path / "run", tensorboard=True, log_every=5)
    raw["data"]["datasets"][0]["urls"] = [str(s) for s in shards] + [str(tmp_path / "planted.tar")]
    raw["data"]["batch_size"] = 6
    raw["data"]["max_bad_fraction"] = 0.5
    raw["optim"] = {"lr": 3e-3}
    raw["schedule"] = {"total_steps": 50, "warmup_steps": 5, "kind": "constant"}
    raw["checkpoint_every"] = 25
    echoed: list[str] = []
    result = Trainer(validated(raw), progress=False, echo=echoed.append).fit()

    assert len(result.losses) == 50 and all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-10:]) / 10 < sum(result.losses[:10]) / 10 - 0.3

    # 18 good samples per pass (batches of 6): 50 steps read the planted shard many times.
    counts = result.data_stats.datasets["images"]
    assert set(counts.bad) == {"undecodable jpg", "missing text", "missing vision"}
    passes = 50 // 3
    assert all(passes <= count <= passes + 1 for count in counts.bad.values()), counts.bad
    assert 18 * passes <= counts.ok <= 18 * (passes + 1) + 6
    summary_text = "\n".join(echoed)
    assert f"data images: {counts.ok} ok, {counts.bad_total} skipped" in summary_text
    for reason in counts.bad:
        assert reason in summary_text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["images"]["bad"] == counts.bad_total
    assert summary["step"] == 50

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(5, 51, 5))
    assert records[-1]["data_bad"] == counts.bad_total
    warmup = ResolvedSchedule(total_steps=50, warmup_steps=5, min_lr=1e-6, kind="constant")
    assert records[0]["lr"] == pytest.approx(sum(lr_at(s, 3e-3, warmup) for s in range(5)) / 5)
    assert records[-1]["lr"] == pytest.approx(3e-3)
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
    assert any((tmp_path / "run" / "tensorboard").iterdir())

    # The final model is a native safetensors file equal to the trained weights.
    reloaded = from_pretrained(result.model_path)
    trained = read_checkpoint(result.checkpoint)["state_dict"]
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[key]), key
    # The resolved config was saved beside it and reads back as the same config.
    assert load_pretrain_config(tmp_path / "run" / "config.yaml") == validated(raw)


# ---- the run state on its own --------------------------------------------------------------


def _write_steps(store: CheckpointStore, *steps: int) -> None:
    for step in steps:
        store.write(step, {"name": "x"}, {"w": torch.full((2,), float(step))}, {"step": step})


def test_the_store_keeps_the_newest_and_moves_its_pointer(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    assert store.steps() == [] and store.latest() is None
    _write_steps(store, 1, 2, 10, 3)  # written out of order: the one just written is kept
    assert [step for step, _ in store.steps()] == [3, 10]
    assert store.latest() == store.path_for(3)  # the pointer, not the highest step
    (store.directory / CheckpointStore.POINTER).unlink()
    assert store.latest() == store.path_for(10)  # no pointer: the newest step file
    (store.directory / CheckpointStore.POINTER).write_text("step_00000099.pt\n")
    assert store.latest() == store.path_for(10)  # a dangling pointer is ignored
    everything = CheckpointStore(tmp_path / "all", keep=0)
    _write_steps(everything, 1, 2, 3)
    assert len(everything.steps()) == 3


def test_find_checkpoint_takes_a_file_a_run_or_its_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    _write_steps(store, 4, 8)
    assert find_checkpoint(store.path_for(4)) == store.path_for(4)
    assert find_checkpoint(tmp_path / "run") == store.path_for(8)
    assert find_checkpoint(store.directory) == store.path_for(8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        find_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "missing.pt")


def test_data_stats_and_config_changes_as_plain_values() -> None:
    stats = DataStats()
    stats.record_ok("images", 5)
    stats.record_bad("images", "missing text", "shard-0/7")
    assert stats_from_plain(stats_to_plain(stats)).as_dict() == stats.as_dict()
    saved = {"optim": {"lr": 1e-3, "betas": [0.9, 0.98]}, "seed": 0}
    current = {"optim": {"lr": 2e-3, "betas": [0.9, 0.98]}, "log_every": 1, "seed": 0}
    assert config_changes(current, saved) == ["log_every", "optim.lr"]
    assert config_changes(saved, saved) == []


class _FakeLoader:
    """What the run state reads and restores of a data loader."""

    def __init__(self) -> None:
        self.position = {"epoch": 0, "batches": 0}
        self.stats = DataStats()
        self.config = type("Config", (), {"resume": "exact"})()
        self.pipeline = type("Pipeline", (), {"resampled": False})()

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = dict(state)


def _parts(config: PretrainConfig, seed: int) -> Any:
    from types import SimpleNamespace

    torch.manual_seed(seed)
    objective = PretrainObjective(build_model(config.model), config.objective)
    optimizer = build_optimizer(objective, config.optim)
    schedule = config.schedule.resolve(None)
    context = RunContext(torch.device("cpu"))
    return SimpleNamespace(
        context=context,
        strategy=TrainingStrategy(context, resolve_precision("fp32", context.device)),
        objective=objective,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config.optim.lr, schedule),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loader=_FakeLoader(),
        generator=torch.Generator().manual_seed(seed),
    )


def test_run_state_saves_and_resumes_without_a_training_loop(tmp_path: Path) -> None:
    raw = stage1_config(Path("."), tmp_path / "run", keep_checkpoints=2)
    config = validated(raw)
    parts = _parts(config, seed=1)
    state = RunState(config, say=pytest.fail)
    at_epoch_start = DataStats()
    at_epoch_start.record_ok("images", 4)
    state.mark_epoch_start(at_epoch_start)
    parts.loader.stats.record_ok("images", 12)
    parts.loader.position = {"epoch": 1, "batches": 3}
    for step in (1, 2, 3):
        state.step = step
        assert state.save(parts) == state.store.path_for(step)
    assert state.saved and state.last_checkpoint == state.store.path_for(3)
    assert [step for step, _ in state.store.steps()] == [2, 3]
    expected = _draw()
    expected_masks = torch.rand(3, generator=parts.generator)

    _seed_all(99)  # a new process: other weights, other RNG states
    raw["optim"] = {"lr": 1e-3}
    said: list[str] = []
    resumed, again = RunState(validated(raw), say=said.append), _parts(validated(raw), seed=2)
    assert resumed.resume(again, None) == state.store.path_for(3)
    assert resumed.step == 3 and resumed.resumed_from == state.store.path_for(3)
    assert resumed.saved
    drawn = _draw()
    assert torch.equal(drawn[0], expected[0]) and drawn[1:] == expected[1:]
    assert torch.equal(torch.rand(3, generator=again.generator), expected_masks)
    assert again.loader.position == {"epoch": 1, "batches": 3}
    # An exact resume replays the epoch, so it counts from the epoch's start again.
    assert again.loader.stats.as_dict() == at_epoch_start.as_dict()
    for name, value in parts.objective.state_dict().items():
        assert torch.equal(value, again.objective.state_dict()[name]), name
    # The new peak learning rate wins (the scheduler has not stepped: step 0's rate).
    first_lr = lr_at(0, 1e-3, config.schedule.resolve(None))
    assert all(g["lr"] == pytest.approx(first_lr) for g in again.optimizer.param_groups)
    assert said == ["note: the config differs from the checkpoint's in: optim.lr"]

    raw["auto_resume"] = False
    assert RunState(validated(raw), say=said.append).resume(again, None) is None


# ---- pieces: precision, logging, CLI -------------------------------------------------------


def test_precision_resolution_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).autocast_dtype is None
    assert resolve_precision("bf16", cpu).autocast_dtype == torch.bfloat16
    assert not resolve_precision("bf16", cpu).scaled
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        resolve_precision("fp16", cpu)


def test_metrics_truncation_and_tensorboard_tags(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    with path.open("a") as handle:
        handle.write('{"step": 4, "lo')  # a torn write
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    truncate_metrics(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert tensorboard_tag("dcl:joint:text") == "dcl/joint:text"
    assert tensorboard_tag("loss") == "loss"


def test_cli_pretrain_runs_and_reports_bad_input(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(stage1_config(synth_root, tmp_path / "cli")))
    code = peace_main(
        ["pretrain", str(config_path), "--set", "schedule={total_steps: 2}", "--no-progress"]
    )
    assert code == 0
    assert read_checkpoint(tmp_path / "cli" / "checkpoints" / "step_00000002.pt")["step"] == 2
    out = capsys.readouterr().out
    assert "pretrain: step 2" in out and "data images:" in out

    code = peace_main(["pretrain", str(config_path), "--set", "optim.lr_max=1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "peace pretrain: error:" in err and "optim.lr_max: unknown field" in err
    assert len(err.strip().splitlines()) == 1

    code = peace_main(["pretrain", str(config_path), "--set", "no-equals-sign"])
    assert code == 1 and "expected KEY=VALUE" in capsys.readouterr().err
    code = peace_main(["pretrain", str(tmp_path / "missing.toml")])
    assert code == 1 and "does not exist" in capsys.readouterr().err


# ---- DDP under torchrun (CPU, gloo) --------------------------------------------------------


@pytest.mark.slow
def test_ddp_on_two_cpu_ranks_trains_and_resumes_exactly(synth_root: Path, tmp_path: Path) -> None:
    import yaml

    raw = stage1_config(synth_root, tmp_path / "full", schedule={"total_steps": 4})
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(raw))
    torchrun(tmp_path / "full.yaml")
    raw["output_dir"] = str(tmp_path / "split")
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(raw))
    torchrun(tmp_path / "split.yaml", "--max-steps", "2")
    torchrun(tmp_path / "split.yaml")

    full = read_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000004.pt")
    split = read_checkpoint(tmp_path / "split" / "checkpoints" / "step_00000004.pt")
    assert full["world_size"] == 2 and len(full["ranks"]) == 2
    # Each rank read its own half of the shards.
    assert full["ranks"][0]["data"] == full["ranks"][1]["data"]
    assert not torch.equal(full["ranks"][0]["masks"], full["ranks"][1]["masks"])
    for key, value in full["state_dict"].items():
        assert torch.equal(value, split["state_dict"][key]), key
    losses = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    resumed = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert len(losses) == 4 and losses == resumed
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["data"]["images"]["ok"] == 2 * 4 * 4  # both ranks' samples are counted


# ---- FSDP under torchrun (CPU, gloo) -------------------------------------------------------


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks_resumes_reshards_and_consolidates(
    synth_root: Path, tmp_path: Path
) -> None:
    import yaml

    def config(name: str, **changes: Any) -> Path:
        raw = stage1_config(
            synth_root,
            tmp_path / name,
            schedule={"total_steps": 4, "warmup_steps": 2},
            distributed={"strategy": "fsdp"},
            checkpoint_every=2,
        )
        raw.update(changes)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    torchrun(config("full"))
    split = config("split")
    torchrun(split, "--max-steps", "2")
    torchrun(split)
    torchrun(config("recompute", grad_checkpointing=True))

    full = tmp_path / "full"
    assert len(losses(full)) == 4 and losses(split.with_suffix("")) == losses(full)
    assert losses(tmp_path / "recompute") == pytest.approx(losses(full), rel=1e-6)

    # Every rank wrote its own shards; the plain part knows both ranks' data positions.
    step4 = full / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in step4.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (full / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    consolidated = read_checkpoint(step4)
    assert consolidated["world_size"] == 2 and consolidated["step"] == 4
    assert "optimizer" not in consolidated and consolidated["decoder"]
    # Consolidated shards == the full weights the run gathered from its live model.
    final = read_checkpoint(full / "model.safetensors")["state_dict"]
    assert consolidated["state_dict"].keys() == final.keys()
    for key, value in final.items():
        assert torch.equal(consolidated["state_dict"][key], value), key
    assert peace_main(["convert", str(step4), str(tmp_path / "one-file.safetensors")]) == 0
    model = from_pretrained(tmp_path / "one-file.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, final[key]), key
    # A next stage starts from the sharded run directory as from any other.
    from peace_core.pretrain.config import ModelSection

    started = build_model(ModelSection(init_from=str(full)))
    for key, value in started.state_dict().items():
        assert torch.equal(value, final[key]), key

    # Resume on one rank: sharded (a group of one) and plain, from the 2-rank checkpoint.
    runs = {}
    for strategy in ("fsdp", "ddp"):
        import shutil

        shutil.copytree(full, tmp_path / f"one-{strategy}")
        path = config(
            f"one-{strategy}",
            schedule={"total_steps": 6, "warmup_steps": 2},
            distributed={"strategy": strategy},
        )
        output = single_process(path)
        assert "written by 2 rank(s), this run has 1" in output
        runs[strategy] = losses(tmp_path / f"one-{strategy}")
        assert len(runs[strategy]) == 6 and runs[strategy][:4] == losses(full)
    assert runs["fsdp"][4:] == pytest.approx(runs["ddp"][4:], rel=1e-6)
    assert (tmp_path / "one-fsdp" / "checkpoints" / "step_00000006").is_dir()
    assert (tmp_path / "one-ddp" / "checkpoints" / "step_00000006.pt").is_file()


def test_a_sharded_run_does_not_resume_from_a_single_file(synth_root: Path, tmp_path: Path) -> None:
    raw = stage1_config(synth_root, tmp_path / "run", schedule={"total_steps": 2})
    trainer = Trainer(validated(raw), progress=False)
    trainer.fit()
    raw["distributed"] = {"strategy": "fsdp"}
    raw["schedule"] = {"total_steps": 3}
    with pytest.raises(CheckpointError, match=r"resume a sharded \(fsdp\) run from the single"):
        Trainer(validated(raw), progress=False).fit()
    assert not torch.distributed.is_initialized()  # the group of one it started is gone
