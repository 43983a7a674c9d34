"""Training steps spread over 2 gloo ranks (DDP and FSDP) against one process, and sharded
checkpoints: safe reading, resharding, consolidation.

The step tests spawn CPU workers (file rendezvous, hard timeout) that run the library's own
strategy objects on fixed batches; the parent compares with the same steps in one process.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo_workers import run_workers
from training_helpers import MICRO_DECODER, MICRO_MODEL

from peace_core import create_model
from peace_core.checkpoint import UnsafeCheckpointError, read_checkpoint
from peace_core.config import ModelConfig
from peace_core.pretrain.objective import ObjectiveConfig, PretrainObjective
from peace_core.pretrain.optim import OptimConfig, build_optimizer
from peace_core.pretrain.runtime import Precision, RunContext
from peace_core.pretrain.strategy import DistributedConfig, build_strategy
from peace_core.sharded_checkpoint import (
    INDEX_FILE,
    TRAINER_FILE,
    is_sharded_checkpoint,
    load_sharded,
    read_sharded_tensors,
    save_sharded,
    tensor_index,
    verify_sharded,
)

WORLD = 2
LOCAL_BATCH = 3
STEPS = 2
SPAWN_TIMEOUT_S = 240.0
# The shared micro model with vision and text and two blocks (two FSDP block units).
MODEL = {
    **MICRO_MODEL,
    "encoder": {**MICRO_MODEL["encoder"], "depth": 2},
    "modalities": {m: MICRO_MODEL["modalities"][m] for m in ("vision", "text")},
}
DECODER = MICRO_DECODER
#: Only the aligning contrast: its result does not depend on how masks are drawn per rank, so a
#: world of 2 with batch b must equal one process with batch 2b (with the gradient-keeping gather).
ALIGN_ONLY = {
    "decoder": DECODER,
    "gather_with_grad": True,
    "weights": {"anchor": 0.0, "other": 0.0, "joint_anchor": 0.0, "joint_other": 0.0},
}
#: Every term: the same per-rank masks under DDP and FSDP, so the two must agree.
FULL = {"decoder": DECODER}


def _global_batch() -> dict[str, dict[str, torch.Tensor]]:
    from PIL import Image

    model = create_model(ModelConfig.model_validate(MODEL))
    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        for _ in range(WORLD * LOCAL_BATCH)
    ]
    texts = ["a red cat", "dog", "two birds on a wire", "sea", "an old tree", "grass and sky"]
    return model.preprocess(vision=images, text=texts)


def _train(
    objective_config: dict[str, Any],
    strategy_name: str,
    batch: dict[str, dict[str, torch.Tensor]],
    rank: int,
    world: int,
    shards: Path | None = None,
) -> dict[str, Any]:
    """``STEPS`` optimizer steps of this rank's rows through the library's strategy objects."""
    torch.manual_seed(0)
    model = create_model(ModelConfig.model_validate(MODEL))
    objective = PretrainObjective(model, ObjectiveConfig.model_validate(objective_config))
    context = RunContext(torch.device("cpu"), rank, world)
    strategy = build_strategy(
        DistributedConfig(strategy=strategy_name), context, Precision("fp32", None)
    )
    strategy.prepare(objective)
    optimizer = build_optimizer(objective, OptimConfig(lr=1e-3))
    wrapped = strategy.wrap(objective, find_unused_parameters=True)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH) if world > 1 else slice(None)
    mine = {m: {k: v[rows] for k, v in tensors.items()} for m, tensors in batch.items()}
    generator = torch.Generator().manual_seed(100 + rank)
    losses, norms = [], []
    for _ in range(STEPS):
        with strategy.micro_batch(wrapped, sync=True):
            loss, _ = wrapped(mine, generator)
            loss.backward()
        strategy.finish_gradients(objective)
        params = [p for p in objective.parameters() if p.requires_grad]
        norms.append(strategy.clip_grad_norm(params, 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
        losses.append(float(mean_loss) / world)
    objective.eval()
    with torch.no_grad():  # the live (sharded) model embeds the whole batch
        embeddings = {m: out.embedding for m, out in objective.model(batch, joint=False).items()}
    if shards is not None:  # each rank writes its own shards of the trained weights
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        save_sharded(
            shards,
            {"objective": get_model_state_dict(objective)},
            {"step": STEPS} if rank == 0 else None,
        )
    return {
        "embeddings": embeddings,
        "losses": losses,
        "norms": norms,
        "weights": strategy.full_model_state(objective),
        "logit_scale": float(objective.model.logit_scale.detach()),
    }


RUNS = [("align", "ddp"), ("align", "fsdp"), ("full", "ddp"), ("full", "fsdp")]
OBJECTIVES = {"align": ALIGN_ONLY, "full": FULL}


def _worker(rank: int, init_file: str, out_dir: str, batch: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )
    try:
        results = {
            f"{objective}-{strategy}": _train(
                OBJECTIVES[objective],
                strategy,
                batch,
                rank,
                WORLD,
                Path(out_dir) / "shards" if (objective, strategy) == ("full", "fsdp") else None,
            )
            for objective, strategy in RUNS
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp")
    batch = _global_batch()
    args = (str(out / "rendezvous"), str(out), batch)
    run_workers(_worker, args, nprocs=WORLD, timeout_s=SPAWN_TIMEOUT_S)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = _train(ALIGN_ONLY, "ddp", batch, 0, 1)
    return {"ranks": ranks, "single": single, "shards": out / "shards"}


def _assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=tol, rtol=tol, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(
    two_rank_runs: dict[str, Any], strategy: str
) -> None:
    single = two_rank_runs["single"]
    for rank in two_rank_runs["ranks"]:
        run = rank[f"align-{strategy}"]
        assert run["losses"] == pytest.approx(single["losses"], rel=1e-5)
        assert run["norms"] == pytest.approx(single["norms"], rel=1e-4)
        assert run["logit_scale"] == pytest.approx(single["logit_scale"], rel=1e-6)
    # Full weights are gathered onto rank 0 (what it writes). AdamW divides each update by the
    # root of its squared gradients, so where a gradient is nearly zero the rounding of a batch
    # split over ranks moves the update by up to lr (1e-3): 1e-4 still fails a wrong gradient.
    _assert_weights_close(
        two_rank_runs["ranks"][0][f"align-{strategy}"]["weights"], single["weights"], 1e-4
    )
    # The steps changed the weights: the comparison is not between two untouched models.
    assert single["losses"][1] != single["losses"][0]


@pytest.mark.slow
def test_fsdp_equals_ddp_on_the_full_objective(two_rank_runs: dict[str, Any]) -> None:
    for rank in two_rank_runs["ranks"]:
        ddp, fsdp = rank["full-ddp"], rank["full-fsdp"]
        assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
        assert fsdp["norms"] == pytest.approx(ddp["norms"], rel=1e-4)
    rank0 = two_rank_runs["ranks"][0]
    _assert_weights_close(rank0["full-fsdp"]["weights"], rank0["full-ddp"]["weights"], 1e-5)
    assert two_rank_runs["ranks"][1]["full-fsdp"]["weights"] == {}  # only rank 0 gathers


@pytest.mark.slow
@pytest.mark.parametrize("source", ["gathered", "consolidated"])
def test_full_weights_embed_like_the_live_sharded_model(
    two_rank_runs: dict[str, Any], source: str
) -> None:
    """Weights gathered onto rank 0, or read back from the shards both ranks wrote, give the
    embeddings the live sharded model computed."""
    if source == "gathered":
        weights = two_rank_runs["ranks"][0]["full-fsdp"]["weights"]
    else:
        shards = two_rank_runs["shards"]
        assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        weights = read_sharded_tensors(shards, "objective.model.")
    model = create_model(ModelConfig.model_validate(MODEL))
    model.load_state_dict(weights)
    with torch.no_grad():
        full = {m: out.embedding for m, out in model.eval()(_global_batch(), joint=False).items()}
    for rank in two_rank_runs["ranks"]:
        live = rank["full-fsdp"]["embeddings"]
        for modality in ("vision", "text"):
            torch.testing.assert_close(live[modality], full[modality], atol=1e-6, rtol=1e-5)


# ---- sharded checkpoint files (one process) --------------------------------------------------


def _write(path: Path, tensors: dict[str, Any], trainer: dict[str, Any]) -> Path:
    return save_sharded(path, tensors, trainer)


def test_sharded_checkpoint_round_trip_and_consolidation(tmp_path: Path) -> None:
    tensors = {
        "objective": {"model.a": torch.arange(6.0).reshape(2, 3), "decoder.b": torch.ones(4)},
        "optimizer": {"model.a": {"exp_avg": torch.full((2, 3), 0.5)}},
    }
    path = _write(tmp_path / "step_00000001", tensors, {"format": "x", "step": 1})
    assert is_sharded_checkpoint(path) and not (tmp_path / "step_00000001.partial").exists()
    assert tensor_index(path)["objective.model.a"] == (torch.Size([2, 3]), torch.float32)
    assert torch.equal(
        read_sharded_tensors(path, "objective.model.")["a"], tensors["objective"]["model.a"]
    )

    target = {
        "objective": {"model.a": torch.zeros(2, 3)},
        "optimizer": {"model.a": {"exp_avg": torch.zeros(2, 3)}},
    }
    load_sharded(path, target)
    assert torch.equal(target["optimizer"]["model.a"]["exp_avg"], torch.full((2, 3), 0.5))


def test_a_sharded_checkpoint_reads_as_a_native_one(tmp_path: Path) -> None:
    model = create_model(ModelConfig.model_validate(MODEL))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = _write(
        tmp_path / "step_00000003",
        {"objective": state},
        {
            "format": "peace-pretrain-sharded/1",
            "peace_format": 1,
            "config": model.config.model_dump(mode="json"),
            "step": 3,
        },
    )
    loaded = read_checkpoint(path)
    assert loaded["step"] == 3 and loaded["decoder"] == {}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["state_dict"][key], value), key
    from peace_core import from_pretrained

    again = from_pretrained(path)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this ran",))


def test_an_index_that_asks_for_code_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "step_00000001", {"objective": {"w": torch.ones(2)}}, {"step": 1})
    (path / INDEX_FILE).write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.print"):
        read_checkpoint(path)
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_pickled_object_among_the_shards_is_refused(tmp_path: Path) -> None:
    # DCP stores non-tensor values as pickles; a sharded checkpoint must hold none.
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "step_00000001"
    dcp.save({"objective": {"w": torch.ones(2)}, "note": {"x": [1, 2]}}, checkpoint_id=str(path))
    torch.save({"step": 1}, path / TRAINER_FILE)
    with pytest.raises(UnsafeCheckpointError, match="pickled object"):
        load_sharded(path, {"objective": {"w": torch.zeros(2)}, "note": {"x": [0, 0]}})


def test_a_missing_or_incomplete_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "step_00000001").mkdir()
    assert not is_sharded_checkpoint(tmp_path / "step_00000001")
    assert not is_sharded_checkpoint(tmp_path / "nothing")


# ---- configuration -----------------------------------------------------------------------------


def test_strategy_settings_are_checked() -> None:
    from pydantic import ValidationError

    from peace_core.pretrain.config import PretrainConfig

    base = {
        "model": {"preset": "tiny"},
        "data": {"datasets": [{"name": "d", "urls": "x.tar", "modalities": ["text"]}]},
        "schedule": {"total_steps": 1},
    }
    assert PretrainConfig.model_validate(base).distributed.strategy == "ddp"
    with pytest.raises(ValidationError, match="does not support precision 'fp16'"):
        PretrainConfig.model_validate(
            {**base, "precision": "fp16", "distributed": {"strategy": "fsdp"}}
        )
    with pytest.raises(ValidationError, match=r"cpu_offload needs distributed\.strategy 'fsdp'"):
        PretrainConfig.model_validate({**base, "distributed": {"cpu_offload": True}})
    with pytest.raises(ValidationError, match="strategy"):
        PretrainConfig.model_validate({**base, "distributed": {"strategy": "zero3"}})
    context = RunContext(torch.device("cpu"))
    with pytest.raises(ValueError, match="on the CPU already"):
        build_strategy(
            DistributedConfig(strategy="fsdp", cpu_offload=True), context, Precision("fp32", None)
        )


def test_a_damaged_shard_fails_its_checksum(tmp_path: Path) -> None:
    path = _write(tmp_path / "step_00000001", {"objective": {"w": torch.ones(64)}}, {"step": 1})
    assert verify_sharded(path) is None
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "__0_0.distcp' is corrupt" in (verify_sharded(path) or "")
    shard.unlink()
    assert "is not a complete" not in (verify_sharded(path) or "")
    assert "__0_0.distcp' is missing" in (verify_sharded(path) or "")
