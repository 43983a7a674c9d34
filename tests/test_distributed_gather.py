"""Rank/world helpers, the gradient-keeping all-gather, and AligningContrast across 2 gloo ranks.

The 2-process test spawns CPU workers (gloo, file rendezvous, hard timeout). Each worker saves
what it saw; the parent compares it with the single-process loss over the concatenated batch.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_workers import run_workers

from peace_core import distributed
from peace_core.losses import AligningContrast

WORLD = 2
LOCAL_BATCH = 3
IN_DIM = 4
EMB_DIM = 5
CONFIGS = [(local, with_grad) for local in (True, False) for with_grad in (True, False)]
SPAWN_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------
# Single process


def test_helpers_outside_a_distributed_run() -> None:
    assert not distributed.is_distributed()
    assert distributed.rank() == 0
    assert distributed.world_size() == 1


@pytest.mark.parametrize("with_grad", [True, False])
def test_all_gather_is_identity_in_a_single_process(with_grad: bool) -> None:
    x = torch.randn(3, 2, requires_grad=True)
    gathered = distributed.all_gather(x, with_grad=with_grad)
    assert gathered is x


def test_all_gather_rejects_a_scalar() -> None:
    with pytest.raises(ValueError, match="batch dimension"):
        distributed.all_gather(torch.tensor(1.0), with_grad=False)


# --------------------------------------------------------------------------------------------
# Two gloo ranks


def _make_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    total = WORLD * LOCAL_BATCH
    kw: dict[str, Any] = {"generator": gen, "dtype": torch.float64}
    return {
        "x": torch.randn(total, IN_DIM, **kw),
        "gather_weights": torch.randn(WORLD, total, IN_DIM, **kw),
        "a_in": torch.randn(total, IN_DIM, **kw),
        "t_in": torch.randn(total, IN_DIM, **kw),
        "w_a": torch.randn(IN_DIM, EMB_DIM, **kw),
        "w_t": torch.randn(IN_DIM, EMB_DIM, **kw),
        "logit_scale": torch.tensor(1.7, dtype=torch.float64),
    }


def _run_pair(
    inputs: dict[str, torch.Tensor], rows: slice, loss_fn: AligningContrast
) -> dict[str, torch.Tensor]:
    """The tiny 'model' (two linear towers + L2) and one loss/backward on ``rows`` of the batch."""
    w_a = inputs["w_a"].clone().requires_grad_()
    w_t = inputs["w_t"].clone().requires_grad_()
    logit_scale = inputs["logit_scale"].clone().requires_grad_()
    a = F.normalize(inputs["a_in"][rows] @ w_a, dim=-1)
    t = F.normalize(inputs["t_in"][rows] @ w_t, dim=-1)
    a.retain_grad()
    t.retain_grad()
    out = loss_fn.forward_with_metrics(a, t, logit_scale)
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "logits_shape": torch.tensor(out.logits_a2t.shape),
        "a_grad": a.grad,
        "t_grad": t.grad,
        "w_a_grad": w_a.grad,
        "w_t_grad": w_t.grad,
        "logit_scale_grad": logit_scale.grad,
    }


def _worker(rank: int, init_file: str, out_dir: str, inputs: dict[str, torch.Tensor]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        result: dict[str, Any] = {
            "helpers": (distributed.is_distributed(), distributed.rank(), distributed.world_size())
        }
        # all_gather: a rank-specific linear function of the gathered tensor.
        for with_grad in (True, False):
            x = inputs["x"][mine].clone().requires_grad_()
            gathered = distributed.all_gather(x, with_grad=with_grad)
            (gathered * inputs["gather_weights"][rank]).sum().backward()
            result[f"gather_value_{with_grad}"] = gathered.detach()
            result[f"gather_grad_{with_grad}"] = x.grad
        # AligningContrast in every configuration; parameter grads averaged as DDP would.
        for local_loss, with_grad in CONFIGS:
            loss_fn = AligningContrast(local_loss=local_loss, gather_with_grad=with_grad)
            run = _run_pair(inputs, mine, loss_fn)
            for key in ("w_a_grad", "w_t_grad", "logit_scale_grad"):
                averaged = run[key].clone()
                dist.all_reduce(averaged)
                run[f"ddp_{key}"] = averaged / WORLD
            result[f"contrast_{local_loss}_{with_grad}"] = run
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # Both ranks finish before either tears gloo down: a rank destroying its group while
        # the other still talks to it aborts ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gloo")
    inputs = _make_inputs()
    args = (str(out / "rendezvous"), str(out), inputs)
    run_workers(_worker, args, nprocs=WORLD, timeout_s=SPAWN_TIMEOUT_S)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return {"inputs": inputs, "ranks": ranks}


def _plain_local_clip(
    a: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, rows: slice
) -> torch.Tensor:
    """CLIP loss of ``rows`` against every column, written directly (no module, no gather)."""
    targets = torch.arange(a.shape[0])[rows]
    return 0.5 * (
        F.cross_entropy(scale * a[rows] @ t.T, targets)
        + F.cross_entropy(scale * t[rows] @ a.T, targets)
    )


def test_helpers_inside_a_distributed_run(two_rank_results: dict[str, Any]) -> None:
    for r, result in enumerate(two_rank_results["ranks"]):
        assert result["helpers"] == (True, r, WORLD)


def test_all_gather_with_and_without_grad(two_rank_results: dict[str, Any]) -> None:
    inputs, ranks = two_rank_results["inputs"], two_rank_results["ranks"]
    weights = inputs["gather_weights"]
    for r, result in enumerate(ranks):
        mine = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        for with_grad in (True, False):
            torch.testing.assert_close(result[f"gather_value_{with_grad}"], inputs["x"])
        # With grad: every rank's graph sends its gradient to this slice and they are summed.
        torch.testing.assert_close(result["gather_grad_True"], weights[:, mine].sum(0))
        # Without: only this rank's own use of its local slice.
        torch.testing.assert_close(result["gather_grad_False"], weights[r, mine])


@pytest.mark.parametrize(("local_loss", "with_grad"), CONFIGS)
def test_contrast_loss_over_ranks_equals_single_process(
    two_rank_results: dict[str, Any], local_loss: bool, with_grad: bool
) -> None:
    inputs, ranks = two_rank_results["inputs"], two_rank_results["ranks"]
    reference = _run_pair(inputs, slice(None), AligningContrast())
    runs = [result[f"contrast_{local_loss}_{with_grad}"] for result in ranks]
    mean_loss = torch.stack([run["loss"] for run in runs]).mean()
    torch.testing.assert_close(mean_loss, reference["loss"])
    expected_cols = WORLD * LOCAL_BATCH
    expected_rows = LOCAL_BATCH if local_loss else expected_cols
    for run in runs:
        assert run["logits_shape"].tolist() == [expected_rows, expected_cols]
        if not local_loss:  # every rank holds the whole global matrix
            torch.testing.assert_close(run["loss"], reference["loss"])
        # logit_scale is never gathered, so its averaged gradient is exact in every mode.
        torch.testing.assert_close(run["ddp_logit_scale_grad"], reference["logit_scale_grad"])


@pytest.mark.parametrize("local_loss", [True, False])
def test_gather_with_grad_reproduces_single_process_gradients(
    two_rank_results: dict[str, Any], local_loss: bool
) -> None:
    inputs, ranks = two_rank_results["inputs"], two_rank_results["ranks"]
    reference = _run_pair(inputs, slice(None), AligningContrast())
    for r, result in enumerate(ranks):
        run = result[f"contrast_{local_loss}_True"]
        mine = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        # Each rank's feature gradient is world × the global one; DDP's averaging undoes that.
        torch.testing.assert_close(run["a_grad"], WORLD * reference["a_grad"][mine])
        torch.testing.assert_close(run["t_grad"], WORLD * reference["t_grad"][mine])
        torch.testing.assert_close(run["ddp_w_a_grad"], reference["w_a_grad"])
        torch.testing.assert_close(run["ddp_w_t_grad"], reference["w_t_grad"])


@pytest.mark.parametrize("local_loss", [True, False])
def test_gather_without_grad_keeps_only_the_local_gradient(
    two_rank_results: dict[str, Any], local_loss: bool
) -> None:
    inputs, ranks = two_rank_results["inputs"], two_rank_results["ranks"]
    reference = _run_pair(inputs, slice(None), AligningContrast())
    scale = inputs["logit_scale"].exp()
    for r, result in enumerate(ranks):
        run = result[f"contrast_{local_loss}_False"]
        mine = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        a_full = F.normalize(inputs["a_in"] @ inputs["w_a"], dim=-1)
        t_full = F.normalize(inputs["t_in"] @ inputs["w_t"], dim=-1)
        a_mine = a_full[mine].clone().requires_grad_()
        t_mine = t_full[mine].clone().requires_grad_()
        # Other ranks' features are constants; only this rank's slice is live.
        a_all = torch.cat([a_full[: mine.start], a_mine, a_full[mine.stop :]])
        t_all = torch.cat([t_full[: mine.start], t_mine, t_full[mine.stop :]])
        rows = mine if local_loss else slice(None)
        _plain_local_clip(a_all, t_all, scale, rows).backward()
        torch.testing.assert_close(run["a_grad"], a_mine.grad)
        torch.testing.assert_close(run["t_grad"], t_mine.grad)
        # ... which is not the single-process gradient: cross-rank terms are missing.
        assert not torch.allclose(run["ddp_w_a_grad"], reference["w_a_grad"])
