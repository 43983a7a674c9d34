"""The collapse guard and the embedding spread it reads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peace_core.losses import embedding_spread
from peace_core.pretrain.collapse import CollapseGuard, patience_for

CHANCE = math.log(32)


def _record(loss: float, spread: float = 0.01) -> dict[str, float]:
    return {
        "align:text-vision": loss,
        "align_chance:text-vision": CHANCE,
        "spread:vision": spread,
        "spread:text": spread,
        "loss": 18.0,
    }


def test_spread_is_about_one_for_random_directions_and_zero_when_collapsed() -> None:
    torch.manual_seed(0)
    random = F.normalize(torch.randn(512, 64), dim=-1)
    assert embedding_spread(random).item() == pytest.approx(1.0, abs=0.05)
    same = F.normalize(torch.randn(1, 64), dim=-1).expand(32, -1)
    assert embedding_spread(same).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_spread(random[:1]).item() == 0.0
    with pytest.raises(ValueError, match=r"expected \[B,D\]"):
        embedding_spread(torch.randn(4))


def test_guard_warns_once_when_the_loss_stays_at_chance_after_warmup() -> None:
    guard = CollapseGuard(warmup_steps=30, patience_steps=30)
    stuck = _record(CHANCE * 1.004)
    # During warm-up nothing is said, however stuck; then the patience counts from step 40.
    for step in (10, 20, 30, 40, 50, 60):
        assert guard.check(step, stuck) == [], step
    (warning,) = guard.check(70, stuck)  # 30 steps at chance past warm-up
    assert "collapse warning at step 70" in warning and "the last 30" in warning
    assert "text-vision" in warning and f"{CHANCE:.4f}" in warning
    assert "vision 0.010" in warning and "optim.lr" in warning
    assert guard.check(80, stuck) == []  # said once per pair


def test_guard_is_quiet_when_the_loss_leaves_chance() -> None:
    guard = CollapseGuard(warmup_steps=0, patience_steps=20)
    assert guard.check(10, _record(CHANCE)) == []
    assert guard.check(20, _record(0.95 * CHANCE)) == []  # progress restarts the count
    assert guard.check(30, _record(CHANCE)) == []
    assert guard.check(40, _record(CHANCE)) == []
    assert guard.check(50, _record(0.5 * CHANCE)) == []
    assert guard.check(60, _record(CHANCE)) == []


def test_a_plateau_with_spread_out_embeddings_gets_three_times_the_patience() -> None:
    guard = CollapseGuard(warmup_steps=0, patience_steps=20)
    plateau = _record(CHANCE, spread=0.25)  # a run from scratch before the contrast takes hold
    for step in range(10, 70, 10):
        assert guard.check(step, plateau) == [], step
    (warning,) = guard.check(70, plateau)
    assert "the last 60" in warning
    # Records without an aligning loss (e.g. a denoising-only batch) are ignored.
    assert guard.check(50, {"loss": 3.0, "dcl:vision": 2.0}) == []


@pytest.mark.parametrize(
    ("total", "log_every", "expected"), [(300, 10, 100), (5000, 10, 500), (300, 50, 150)]
)
def test_patience_is_a_share_of_the_run(total: int, log_every: int, expected: int) -> None:
    assert patience_for(total, log_every) == expected
