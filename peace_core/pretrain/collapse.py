"""The collapse guard: says so when the aligning contrast is stuck at chance.

A collapsed contrast makes every embedding of a modality (nearly) the same; each row's
candidates then look alike, and the aligning loss sits at ln(candidates), its value for a model
that knows nothing. The denoising losses may still fall, so the total loss hides it. The guard
reads the logged metrics (``align:A-B``, ``align_chance:A-B``, ``spread:A``) and warns when a
pair's aligning loss has stayed within ``tolerance`` of chance in every logged record after
warm-up for ``patience_steps`` steps with the embeddings collapsed (a spread below
``collapsed_spread``), or for three times as long whatever the spread. A plateau at chance is
normal at the start of a run from scratch (the tiny recipe sits there for 100-200 steps, its
embeddings still spread out at 0.2-0.3), so neither test is a few records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

ALIGN_PREFIX = "align:"


@dataclass
class CollapseGuard:
    """Feed it every logged record (:meth:`check`); it returns a warning once per pair."""

    warmup_steps: int
    patience_steps: int = 100
    tolerance: float = 0.01
    collapsed_spread: float = 0.05
    _stuck_since: dict[str, int] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    def check(self, step: int, record: Mapping[str, float]) -> list[str]:
        """Warnings for the pairs that this record shows stuck (each pair warned once)."""
        warnings = []
        for key, loss in record.items():
            if not key.startswith(ALIGN_PREFIX):
                continue
            pair = key[len(ALIGN_PREFIX) :]
            chance = record.get(f"align_chance:{pair}")
            if chance is None or chance <= 0:
                continue
            at_chance = abs(loss - chance) <= self.tolerance * chance
            if not at_chance or step <= self.warmup_steps:
                self._stuck_since.pop(pair, None)
                continue
            since = self._stuck_since.setdefault(pair, step)
            # Modality names never hold "-", so the pair label splits into its two sides.
            spreads = [record.get(f"spread:{name}") for name in pair.split("-")]
            collapsed = any(s is not None and s < self.collapsed_spread for s in spreads)
            patience = self.patience_steps * (1 if collapsed else 3)
            if step - since >= patience and pair not in self._warned:
                self._warned.add(pair)
                warnings.append(self._message(step, since, pair, loss, chance, record))
        return warnings

    def _message(
        self,
        step: int,
        since: int,
        pair: str,
        loss: float,
        chance: float,
        record: Mapping[str, float],
    ) -> str:
        spreads = ", ".join(
            f"{name[len('spread:') :]} {value:.3f}"
            for name, value in sorted(record.items())
            if name.startswith("spread:")
        )
        return (
            f"collapse warning at step {step}: the aligning loss {pair} is {loss:.4f}, "
            f"within {100 * self.tolerance:g} % of its chance value ln(candidates) = "
            f"{chance:.4f}, and has been for every logged step of the last {step - since} "
            "after warm-up. The model cannot tell the pairs of a batch apart; its embeddings "
            "barely vary across a batch (spread, 1 = random, 0 = all the same: "
            f"{spreads or 'not logged'}). Try: a lower optim.lr (e.g. 3e-4 or 1e-4), a longer "
            "warm-up (schedule.warmup_steps), model.overrides.init = 'scratch' if the model "
            "uses the official init, smaller denoising weights (objective.weights) so the "
            "contrast is not drowned, or a larger batch. See README, 'When the contrast "
            "collapses'."
        )


def patience_for(total_steps: int, log_every: int) -> int:
    """Steps at chance after warm-up before the guard warns: a tenth of the run, at least 100
    steps and three logged records."""
    return max(100, 3 * log_every, total_steps // 10)
