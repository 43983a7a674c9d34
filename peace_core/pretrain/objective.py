"""The ONE-PEACE pretraining objective: aligning contrast + denoising contrast (spec §3).

Which modalities are contrasted is configuration: by default every modality is aligned with the
*anchor*, text (ONE-PEACE); ``pairs`` lists any other pairs (audio with vision, depth with video).
For a batch holding the two sides A and B of a pair (any plugins'), one step does:

1. unmasked forwards of A and of B, each alone: retrieval embeddings for the aligning contrast,
   and (detached) hidden states that are the targets of the single views;
2. a ``no_grad`` joint forward of ``[A; B]`` (the anchor, or a pair's first modality, leads):
   the targets of the joint views;
3. masks from the model's maskers (single view per modality; joint view with ``joint=True`` and
   the single view's mask), all drawn from the caller's ``torch.Generator``;
4. students: the model encodes only the kept positions (MAE-style), each single view alone and
   the joint view as one fused sequence; the light decoder fills the masked positions;
5. the denoising contrast per view, the aligning contrast of every pair, weighted and summed.

A batch may hold more than two modalities when pairs connect them (text with vision and with
audio): each pair is aligned and the joint view fuses them all. A batch with one modality gets
only that modality's single view. Views are named ``"<modality>"`` and ``"joint:<modality>"``; a
view whose weight is 0 is skipped entirely (no forward runs for it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field, field_validator
from torch import nn

from peace_core.config import ANCHOR_MODALITY, StrictModel
from peace_core.losses import AligningContrast, DenoisingContrast, embedding_spread
from peace_core.model import ModalityOutput, PeaceModel
from peace_core.pretrain.decoder import DecoderConfig, DecoderView, PretrainDecoder
from peace_registry import Masker, check_modality_name
from peace_registry.contract import precompute_views

#: ``"<modality>"`` or ``"joint:<modality>"``.
VIEW_NAME_PATTERN = re.compile(r"^(joint:)?[a-z][a-z0-9_]*$")
JOINT_PREFIX = "joint:"

Batch = Mapping[str, Mapping[str, torch.Tensor]]


class ObjectiveInputError(ValueError):
    """A batch, mask or setting the pretraining objective cannot use."""


class LossWeights(StrictModel):
    """Weights of the loss terms; the defaults are ONE-PEACE's stage 1 (spec §3.5).

    ``anchor``/``other`` weigh the single views of the objective's anchor modality (ONE-PEACE:
    text) and of any other modality; ``joint_anchor``/``joint_other`` the joint views.
    ``dcl_weights`` overrides any view by name (``"audio"``, ``"joint:text"``...). A weight of 0
    skips that term and every forward only it needs.
    """

    align: float = Field(1.0, ge=0.0, description="aligning contrast (each pair)")
    anchor: float = Field(0.5, ge=0.0, description="denoising contrast of the anchor's own view")
    other: float = Field(1.0, ge=0.0, description="denoising contrast of another single view")
    joint_anchor: float = Field(0.5, ge=0.0, description="the anchor's part of the joint view")
    joint_other: float = Field(0.5, ge=0.0, description="another modality's part of the joint view")
    dcl_weights: dict[str, float] = Field(
        default_factory=dict, description="per-view overrides: '<modality>' or 'joint:<modality>'"
    )

    @field_validator("dcl_weights")
    @classmethod
    def _valid_views(cls, weights: dict[str, float]) -> dict[str, float]:
        for view, weight in weights.items():
            if not VIEW_NAME_PATTERN.match(view):
                raise ValueError(
                    f"dcl_weights key {view!r}: expected a view name '<modality>' or "
                    "'joint:<modality>' (modality matching ^[a-z][a-z0-9_]*$)"
                )
            if not weight >= 0.0:
                raise ValueError(f"dcl_weights[{view!r}] must be >= 0, got {weight}")
        return weights

    @classmethod
    def stage2(cls, **overrides: object) -> LossWeights:
        """ONE-PEACE's stage 2 (spec §3.5): no anchor-only view, others 1.0, joint 0.5/0.5."""
        return cls.model_validate({"anchor": 0.0, **overrides})

    def dcl(self, view: str, anchor: str | None) -> float:
        """The weight of denoising view ``view`` when ``anchor`` is the anchor modality."""
        if view in self.dcl_weights:
            return self.dcl_weights[view]
        if view.startswith(JOINT_PREFIX):
            is_anchor = view == JOINT_PREFIX + (anchor or "")
            return self.joint_anchor if is_anchor else self.joint_other
        return self.anchor if view == anchor else self.other


class ObjectiveConfig(StrictModel):
    """Everything :class:`PretrainObjective` needs besides the model."""

    anchor: str | None = Field(
        ANCHOR_MODALITY,
        description=(
            "the modality every other modality is aligned with, which leads joint sequences and "
            "takes the anchor weights (ONE-PEACE: text); None for no anchor (then set pairs)"
        ),
    )
    pairs: list[tuple[str, str]] = Field(
        default_factory=list,
        description=(
            "the aligned modality pairs, e.g. [['vision', 'audio']]; when given they replace the "
            "anchored pairs. A pair's first modality leads its joint sequence"
        ),
    )
    weights: LossWeights = Field(default_factory=LossWeights)
    decoder: DecoderConfig | None = Field(
        None, description="decoder sizes; None sizes it from the model (DecoderConfig.for_encoder)"
    )
    dcl_temperature: float = Field(0.4, gt=0.0, description="denoising contrast τ (official 0.4)")
    dcl_label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    single_targets_from_joint: list[str] = Field(
        default_factory=list,
        description=(
            "modalities whose single view takes its target from the joint pass instead of a pass "
            "of that modality alone. ONE-PEACE's stage 2 does this for audio (['audio']); off by "
            "default. Ignored when the batch has no joint pass (a single-modality batch)"
        ),
    )
    local_loss: bool = Field(True, description="aligning contrast: this rank's rows only")
    gather_with_grad: bool = Field(False, description="aligning contrast: gradients through gather")

    @field_validator("anchor")
    @classmethod
    def _valid_anchor(cls, anchor: str | None) -> str | None:
        return None if anchor is None else check_modality_name(anchor)

    @field_validator("pairs")
    @classmethod
    def _valid_pairs(cls, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for a, b in pairs:
            check_modality_name(a)
            check_modality_name(b)
            if a == b:
                raise ValueError(f"pair ({a!r}, {b!r}) aligns a modality with itself")
        return pairs

    def pairs_for(self, modalities: Sequence[str]) -> list[tuple[str, str]]:
        """The aligned pairs among ``modalities``: the configured pairs whose sides are both
        there, or else each of them with the anchor."""
        present = set(modalities)
        if self.pairs:
            return [(a, b) for a, b in self.pairs if a in present and b in present]
        if self.anchor in present:
            return [(self.anchor, m) for m in modalities if m != self.anchor]
        return []


def kept_positions(masked: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Positions a student encodes: ``[B,K]`` long, sorted per row, ``-1``-padded.

    Kept = neither masked nor padding; ``K`` is the largest kept count of a row. CLS (position 0)
    must be kept in every row.
    """
    if masked.shape != padding_mask.shape or masked.ndim != 2:
        raise ObjectiveInputError(
            f"masked {tuple(masked.shape)} and padding_mask {tuple(padding_mask.shape)} must both "
            "be [B,N]"
        )
    visible = ~(masked | padding_mask)
    if masked.shape[1] == 0 or not bool(visible[:, 0].all()):
        raise ObjectiveInputError(
            "position 0 (CLS) must be kept (neither masked nor padding) in every row"
        )
    length = masked.shape[1]
    positions = torch.arange(length, device=masked.device).expand_as(masked)
    # Hidden positions sort after every visible one; their slots become -1.
    order = torch.where(visible, positions, positions + length).sort(dim=1).values
    width = int(visible.sum(dim=1).max())
    order = order[:, :width]
    return order.masked_fill(order >= length, -1)


@dataclass
class _Plan:
    """Which passes and views one batch needs, given the weights."""

    names: list[str]  # modalities of the batch, in joint order (the leader first)
    pairs: list[tuple[str, str]]  # the aligned pairs (empty when align is off)
    single_views: list[str]
    joint_views: list[str]
    joint_student: bool
    # Single views whose target is read from the joint pass (``single_targets_from_joint``).
    joint_targets: list[str]

    @property
    def align(self) -> bool:
        return bool(self.pairs)

    @property
    def joint_pass(self) -> bool:
        return self.joint_student or bool(self.joint_targets)


def pair_label(pair: tuple[str, str]) -> str:
    """A pair's name in metrics: ``align:text-vision``."""
    return f"{pair[0]}-{pair[1]}"


class PretrainObjective(nn.Module):
    """Model + decoder + maskers + both losses; ``forward(batch, generator) -> (loss, metrics)``.

    ``maskers`` replaces the model's maskers (by modality); by default each modality uses
    ``model.masker(m)`` (its plugin's, or the variant the model config picks).
    Metrics (plain floats), per aligned pair A-B (A the anchor or the pair's first): ``loss``,
    ``align:A-B``, ``align_acc:B->A``, ``align_acc:A->B``, ``logit_scale`` (the scale 1/τ used),
    ``align_chance:A-B`` (the aligning loss of an uninformed model: ln of the candidates per row),
    ``spread:A`` and ``spread:B`` (:func:`~peace_core.losses.embedding_spread`), and per denoising
    view ``dcl:<view>`` and ``dcl_acc:<view>`` (NaN when nothing was masked).
    """

    def __init__(
        self,
        model: PeaceModel,
        config: ObjectiveConfig | None = None,
        *,
        maskers: Mapping[str, Masker] | None = None,
    ) -> None:
        super().__init__()
        self.config = config or ObjectiveConfig()
        self.model = model
        named = set(self.config.single_targets_from_joint) | {
            m for p in self.config.pairs for m in p
        }
        unknown = sorted(named - set(model.modalities))
        if unknown:
            raise ObjectiveInputError(
                f"objective.pairs or single_targets_from_joint name {unknown}, which the model "
                f"does not have; it has {list(model.modalities)}"
            )
        reference = next(model.parameters())
        decoder_config = self.config.decoder or DecoderConfig.for_encoder(model.config.encoder)
        self.decoder = PretrainDecoder(
            decoder_config,
            model.modalities,
            model.config.encoder.dim,
            device=reference.device,
            dtype=reference.dtype,
        )
        self.maskers = _build_maskers(model, maskers)
        self.aligning = AligningContrast(
            local_loss=self.config.local_loss,
            gather_with_grad=self.config.gather_with_grad,
            logit_scale_max=model.config.logit_scale_max,
        )
        self.denoising = DenoisingContrast(
            temperature=self.config.dcl_temperature,
            label_smoothing=self.config.dcl_label_smoothing,
        )

    @property
    def weights(self) -> LossWeights:
        return self.config.weights

    # ---------------------------------------------------------------------------- planning

    def plan(self, batch: Batch) -> _Plan:
        """Check ``batch`` and decide which passes and views it gets (errors say why not)."""
        if not isinstance(batch, Mapping) or not batch:
            raise ObjectiveInputError(
                f"expected a non-empty {{modality: collated batch}} mapping, got {batch!r:.80}"
            )
        unknown = sorted(set(batch) - set(self.model.modalities))
        if unknown:
            raise ObjectiveInputError(
                f"batch holds modalities {unknown} that the model does not have; it has "
                f"{list(self.model.modalities)}"
            )
        config = self.config
        pairs = config.pairs_for(list(batch))
        if len(batch) > 1:
            unpaired = sorted(set(batch) - {m for pair in pairs for m in pair})
            if unpaired:
                described = (
                    f"pairs {[list(p) for p in config.pairs]}"
                    if config.pairs
                    else f"anchor {config.anchor!r}"
                )
                raise ObjectiveInputError(
                    f"a pretraining batch of {sorted(batch)} holds {unpaired}, which no aligned "
                    f"pair connects (objective {described}); set objective.pairs to align them, "
                    "or give each dataset one modality"
                )
        # Joint order: the pairs' leaders (the anchor) first, then the batch's order.
        leaders = [a for a, _ in pairs]
        names = sorted(batch, key=lambda name: leaders.index(name) if name in leaders else 1 << 20)
        weights, anchor = self.weights, config.anchor
        joint_views = [m for m in names if pairs and weights.dcl(JOINT_PREFIX + m, anchor) > 0]
        single_views = [m for m in names if weights.dcl(m, anchor) > 0]
        from_joint = config.single_targets_from_joint
        plan = _Plan(
            names=names,
            pairs=pairs if weights.align > 0 else [],
            single_views=single_views,
            joint_views=joint_views,
            joint_student=bool(joint_views),
            joint_targets=[m for m in single_views if pairs and m in from_joint],
        )
        if not (plan.align or plan.single_views or plan.joint_views):
            raise ObjectiveInputError(
                f"every loss term is weighted 0 for a batch of {names}: nothing to train "
                f"(weights: {weights.model_dump()})"
            )
        return plan

    # ---------------------------------------------------------------------------- pieces

    def make_mask(
        self,
        modality: str,
        batch: Mapping[str, torch.Tensor],
        padding_mask: torch.Tensor,
        generator: torch.Generator,
        *,
        joint: bool = False,
        single_view_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The plugin masker's mask for one view, checked against the contract."""
        masked = self.maskers[modality](
            batch,
            padding_mask,
            generator=generator,
            joint=joint,
            single_view_mask=single_view_mask,
        )
        masked = _checked_mask(modality, masked, padding_mask)
        return masked.to(padding_mask.device)

    def encode_student(
        self,
        batch: Batch,
        masks: Mapping[str, torch.Tensor],
        padding: Mapping[str, torch.Tensor],
        *,
        joint: bool,
    ) -> dict[str, DecoderView]:
        """Encode only the kept positions of ``batch``'s modalities (fused when ``joint``).

        Returns per modality what the decoder reads: hidden ``[B,K,D]``, ``keep`` ``[B,K]`` and
        the full-length padding mask.
        """
        keep = {m: kept_positions(masks[m], padding[m]) for m in batch}
        outputs = self.model(batch, joint=joint, keep=keep)
        return {m: DecoderView(m, outputs[m].hidden, keep[m], padding[m]) for m in batch}

    # ---------------------------------------------------------------------------- forward

    def forward(
        self, batch: Batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted total loss of ``batch`` and its metrics; masks come from ``generator``."""
        if not isinstance(generator, torch.Generator):
            raise ObjectiveInputError(
                f"generator must be a torch.Generator (masks are drawn from it), got "
                f"{type(generator).__name__}"
            )
        plan = self.plan(batch)
        weights = self.weights
        # Adapter work that every view of a batch shares is done once (API 1.4 ``precompute``).
        batch = {m: precompute_views(self.model.adapters[m], batch[m]) for m in batch}

        # 1. Unmasked single passes: embeddings (with gradient, when aligning) and targets.
        single: dict[str, ModalityOutput] = {}
        for m in plan.names:
            needs_target = m in plan.single_views and m not in plan.joint_targets
            if plan.align or needs_target:
                # Only the embeddings are trained here; the hidden states are detached targets.
                with torch.set_grad_enabled(plan.align and torch.is_grad_enabled()):
                    single[m] = self.model({m: batch[m]}, joint=False, hidden_grad=False)[m]

        # 2. The joint pass: targets only, never a gradient.
        joint: dict[str, ModalityOutput] = {}
        if plan.joint_pass:
            with torch.no_grad():
                joint = self.model({m: batch[m] for m in plan.names}, joint=True)
        padding = {
            m: (single[m] if m in single else joint[m]).padding_mask
            for m in plan.names
            if m in single or m in joint
        }

        # 3. Masks, in a fixed order so a generator seed fixes them all.
        single_masks = {
            m: self.make_mask(m, batch[m], padding[m], generator) for m in plan.single_views
        }
        joint_masks = {}
        if plan.joint_student:
            joint_masks = {
                m: self.make_mask(
                    m,
                    batch[m],
                    padding[m],
                    generator,
                    joint=True,
                    single_view_mask=single_masks.get(m),
                )
                for m in plan.names
            }

        total = torch.zeros((), device=next(self.parameters()).device)
        metrics: dict[str, float] = {}

        # 4. Aligning contrast of every pair (ONE-PEACE: each modality with text).
        for leader, other in plan.pairs:
            aligned = self.aligning.forward_with_metrics(
                single[other].embedding, single[leader].embedding, self.model.logit_scale
            )
            total = total + weights.align * aligned.loss
            label = pair_label((leader, other))
            metrics[f"align:{label}"] = float(aligned.loss.detach())
            metrics[f"align_acc:{other}->{leader}"] = float(aligned.accuracy_a2t)
            metrics[f"align_acc:{leader}->{other}"] = float(aligned.accuracy_t2a)
            metrics["logit_scale"] = float(aligned.scale)
            # The collapse guard's inputs: the loss at chance (ln of the candidates each row is
            # contrasted with) and how much each side's embeddings vary across the batch.
            metrics[f"align_chance:{label}"] = math.log(aligned.logits_a2t.shape[1])
            for m in (leader, other):
                metrics[f"spread:{m}"] = float(embedding_spread(single[m].embedding))

        # 5. Denoising views: students encode kept units, the decoder fills the rest.
        for m in plan.single_views:
            target_source = joint[m] if m in plan.joint_targets else single[m]
            view = self.encode_student({m: batch[m]}, single_masks, padding, joint=False)[m]
            # Predictions are read at masked positions only: the decoder computes no others.
            (predicted,) = self.decoder([view], outputs_at=[single_masks[m]])
            total = total + self._denoise(
                m, predicted, target_source.hidden, single_masks[m], padding[m], metrics
            )
        if plan.joint_student:
            pair = {m: batch[m] for m in plan.names}
            views = self.encode_student(pair, joint_masks, padding, joint=True)
            predictions = self.decoder(
                [views[m] for m in plan.names],
                outputs_at=[
                    joint_masks[m] if m in plan.joint_views else torch.zeros_like(joint_masks[m])
                    for m in plan.names
                ],
            )
            for m, predicted in zip(plan.names, predictions):
                if m in plan.joint_views:
                    total = total + self._denoise(
                        JOINT_PREFIX + m,
                        predicted,
                        joint[m].hidden,
                        joint_masks[m],
                        padding[m],
                        metrics,
                    )

        metrics["loss"] = float(total.detach())
        return total, metrics

    def _denoise(
        self,
        view: str,
        predicted: torch.Tensor,
        target: torch.Tensor,
        masked: torch.Tensor,
        padding_mask: torch.Tensor,
        metrics: dict[str, float],
    ) -> torch.Tensor:
        result = self.denoising.forward_with_metrics(
            predicted, target.detach(), masked, padding_mask
        )
        metrics[f"dcl:{view}"] = float(result.loss.detach())
        metrics[f"dcl_acc:{view}"] = float(result.accuracy)
        return self.weights.dcl(view, self.config.anchor) * result.loss


def _build_maskers(model: PeaceModel, given: Mapping[str, Masker] | None) -> dict[str, Masker]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(model.modalities))
    if unknown:
        raise ObjectiveInputError(
            f"maskers given for {unknown}, which the model does not have; it has "
            f"{list(model.modalities)}"
        )
    return {m: given[m] if m in given else model.masker(m) for m in model.modalities}


def _checked_mask(modality: str, masked: object, padding_mask: torch.Tensor) -> torch.Tensor:
    """The masker's output if it keeps the contract, else an error naming the masker."""
    where = f"the {modality!r} masker"
    if not isinstance(masked, torch.Tensor) or masked.dtype != torch.bool:
        kind = masked.dtype if isinstance(masked, torch.Tensor) else type(masked).__name__
        raise ObjectiveInputError(f"{where} returned {kind}; expected a bool [B,N] tensor")
    if masked.shape != padding_mask.shape:
        raise ObjectiveInputError(
            f"{where} returned shape {tuple(masked.shape)}; expected the padding mask's "
            f"{tuple(padding_mask.shape)}"
        )
    masked = masked.to(padding_mask.device)
    if bool(masked[:, 0].any()):
        raise ObjectiveInputError(f"{where} hid position 0 (CLS), which must stay visible")
    if bool((masked & padding_mask).any()):
        raise ObjectiveInputError(f"{where} hid padding positions; it must hide real units only")
    return masked
