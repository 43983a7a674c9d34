"""The collapse guard: says so when the aligning contrast is stuck at chance.

A collapsed contrast makes every embedding of a modality (nearly) the same; each row's
candidates then look alike, and the aligning loss sits at ln(candidates), its value for a model
that knows nothing. The denoising losses may still fall, so the total loss hides it. The guard
reads the logged metrics (``align:<X>``, ``align_chance:<X>``, ``spread:<X>``) and, once warm-up
is over, warns when a pair's aligning loss has stayed within ``tolerance`` of chance for
``patience`` logged records in a row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

ALIGN_PREFIX = "align:"


@dataclass
class CollapseGuard:
    """Feed it every logged record (:meth:`check`); it returns a warning once per pair."""

    warmup_steps: int
    tolerance: float = 0.01
    patience: int = 3
    _stuck: dict[str, int] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    def check(self, step: int, record: Mapping[str, float]) -> list[str]:
        """Warnings for the pairs that this record shows stuck (each pair warned once)."""
        warnings = []
        for key, loss in record.items():
            if not key.startswith(ALIGN_PREFIX):
                continue
            modality = key[len(ALIGN_PREFIX) :]
            chance = record.get(f"align_chance:{modality}")
            if chance is None or chance <= 0:
                continue
            at_chance = abs(loss - chance) <= self.tolerance * chance
            after_warmup = step > self.warmup_steps
            self._stuck[modality] = self._stuck.get(modality, 0) + 1 if at_chance else 0
            if (
                after_warmup
                and self._stuck[modality] >= self.patience
                and modality not in self._warned
            ):
                self._warned.add(modality)
                warnings.append(self._message(step, modality, loss, chance, record))
        return warnings

    @staticmethod
    def _message(
        step: int, modality: str, loss: float, chance: float, record: Mapping[str, float]
    ) -> str:
        spreads = ", ".join(
            f"{name[len('spread:') :]} {value:.3f}"
            for name, value in sorted(record.items())
            if name.startswith("spread:")
        )
        return (
            f"collapse warning at step {step}: the aligning loss {modality}-text is {loss:.4f}, "
            f"within 1 % of its chance value ln(candidates) = {chance:.4f}, and has been for "
            f"several logged steps after warm-up. The model cannot tell the pairs of a batch "
            f"apart; its embeddings barely vary across a batch (spread, 1 = random, 0 = all "
            f"the same: {spreads or 'not logged'}). Try: a lower optim.lr (e.g. 3e-4 or 1e-4), "
            "a longer warm-up (schedule.warmup_steps), model.overrides.init = 'scratch' if the "
            "model uses the official init, smaller denoising weights (objective.weights) so "
            "the contrast is not drowned, or a larger batch. See README, 'When the contrast "
            "collapses'."
        )
