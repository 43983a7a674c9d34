"""The two ONE-PEACE pretraining losses as modules (spec §3.2, §3.3; DESIGN §5).

* :class:`AligningContrast` — cross-modal aligning contrast between a modality's retrieval
  embeddings and the paired text's (CLIP-style, learnable temperature, gathered across ranks).
* :class:`DenoisingContrast` — intra-modal denoising contrast between the decoder's predictions
  at masked positions and the detached full-input outputs of the same model.

Both compute in at least fp32 (half inputs are upcast, autocast is switched off inside) and
return a plain scalar from ``forward``; ``forward_with_metrics`` returns the same loss plus cheap
training metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from peace_core.distributed import all_gather, rank, world_size

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

LOGIT_SCALE_MAX = math.log(100.0)
"""Official upper clamp of ``logit_scale`` (log of the largest 1/τ)."""


# --------------------------------------------------------------------------------------------
# Shared helpers


def clamp_logit_scale_(
    logit_scale: torch.Tensor, max_value: float = LOGIT_SCALE_MAX
) -> torch.Tensor:
    """Clamp a ``logit_scale`` parameter in place to ``[0, max_value]`` and return it.

    For the trainer to call after each optimizer step, as the official code does, so the stored
    parameter never drifts outside the range the loss uses.
    """
    _check_max(max_value)
    with torch.no_grad():
        logit_scale.clamp_(0.0, max_value)
    return logit_scale


def label_smoothed_nll(
    log_probs: torch.Tensor, targets: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Per-row label-smoothed cross-entropy in fairseq's form (spec §3.3 step 5).

    ``(1 − ε − ε/(N−1))·NLL + (ε/(N−1))·Σ_j(−log p_j)`` for ``log_probs`` ``[K, N]`` and
    ``targets`` ``[K]``. This spreads ε over the N−1 *wrong* classes, unlike
    ``torch.nn.functional.cross_entropy(label_smoothing=ε)``, which spreads it over all N.
    With a single class there is nothing to smooth towards, so ε is ignored.
    """
    if log_probs.dim() != 2:
        raise ValueError(
            f"label_smoothed_nll: log_probs must be [K, N], got shape {tuple(log_probs.shape)}"
        )
    if targets.shape != log_probs.shape[:1]:
        raise ValueError(
            f"label_smoothed_nll: targets must be [{log_probs.shape[0]}], "
            f"got shape {tuple(targets.shape)}"
        )
    _check_smoothing(epsilon)
    num_classes = log_probs.shape[1]
    nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    if num_classes < 2:
        return nll
    eps_per_wrong_class = epsilon / (num_classes - 1)
    sum_neg_log_probs = -log_probs.sum(dim=1)
    return (1.0 - epsilon - eps_per_wrong_class) * nll + eps_per_wrong_class * sum_neg_log_probs


def _check_max(max_value: float) -> None:
    if not (math.isfinite(max_value) and max_value >= 0.0):
        raise ValueError(f"logit_scale_max must be a finite number >= 0, got {max_value}")


def _check_smoothing(epsilon: float) -> None:
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {epsilon}")


def _require_float(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _require_bool_mask(name: str, x: object, shape: torch.Size) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor [B, N], got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Half-precision inputs are upcast; fp32/fp64 are kept as given.
    return x.float() if torch.finfo(x.dtype).bits < 32 else x


def _common_compute_dtype(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Both operands of a similarity matmul in one dtype, at least fp32.
    dtype = torch.promote_types(_at_least_fp32(x).dtype, _at_least_fp32(y).dtype)
    return x.to(dtype), y.to(dtype)


def _no_autocast(device: torch.device) -> torch.autocast:
    # The losses are computed in fp32 even inside a bf16/fp16 autocast region.
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------------------------
# Cross-modal aligning contrast


@dataclass(frozen=True)
class AligningContrastOutput:
    """Loss plus metrics of one :class:`AligningContrast` call.

    ``logits_*`` are this rank's rows against every column it contrasts with
    (``[B_local, world·B_local]`` with ``local_loss``, else ``[world·B, world·B]``);
    accuracies and ``scale`` are detached 0-d tensors.
    """

    loss: torch.Tensor
    logits_a2t: torch.Tensor
    logits_t2a: torch.Tensor
    accuracy_a2t: torch.Tensor
    accuracy_t2a: torch.Tensor
    scale: torch.Tensor


class AligningContrast(nn.Module):
    """Cross-modal aligning contrast: ½(CE(a→t) + CE(t→a)), no label smoothing (spec §3.2).

    ``forward(a_emb [B,E], text_emb [B,E], logit_scale)``: the embeddings are expected to be
    L2-normalised already (as the retrieval head returns them); row i of each is a pair.
    ``logit_scale`` holds log(1/τ); the scale used is ``exp(clamp(logit_scale, 0, max))`` —
    the gradient passes where the clamp is inactive.

    In a distributed run (``torch.distributed`` initialised, world > 1) features are gathered
    from every rank (each rank must pass the same B):

    * ``gather_with_grad=False`` (official default): the other ranks' features are constants,
      this rank's own slice keeps its gradient. ``True``: gradients flow through every rank's
      features (``torch.distributed.nn.functional.all_gather``).
    * ``local_loss=True`` (official default): logits only for this rank's rows against all
      gathered columns, targets offset by ``rank·B``. ``False``: the full global matrix on
      every rank.

    Every combination gives, averaged over ranks, the single-process loss on the concatenated
    batch. With ``gather_with_grad=True`` the gradients, once DDP averages them, equal the
    single-process gradients too.
    """

    def __init__(
        self,
        *,
        local_loss: bool = True,
        gather_with_grad: bool = False,
        logit_scale_max: float = LOGIT_SCALE_MAX,
        group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        _check_max(logit_scale_max)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.logit_scale_max = float(logit_scale_max)
        self.group = group

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
            f"logit_scale_max={self.logit_scale_max:.4f}"
        )

    def scale(self, logit_scale: torch.Tensor) -> torch.Tensor:
        """``exp(clamp(logit_scale, 0, max))`` as a 0-d tensor, at least fp32 (differentiable)."""
        logit_scale = _require_float("logit_scale", logit_scale)
        if logit_scale.numel() != 1:
            raise ValueError(
                f"logit_scale must hold one value (log 1/τ), got shape {tuple(logit_scale.shape)}"
            )
        flat = _at_least_fp32(logit_scale).reshape(())
        return flat.clamp(0.0, self.logit_scale_max).exp()

    def forward(
        self, a_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        return self.forward_with_metrics(a_emb, text_emb, logit_scale).loss

    def forward_with_metrics(
        self, a_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
    ) -> AligningContrastOutput:
        self._check_embeddings(a_emb, text_emb)
        with _no_autocast(a_emb.device):
            scale = self.scale(logit_scale)
            a_local, t_local = _common_compute_dtype(a_emb, text_emb)
            a_all, t_all, row_offset = self._gather(a_local, t_local)
            if self.local_loss:
                logits_a2t = scale * a_local @ t_all.T
                logits_t2a = scale * t_local @ a_all.T
            else:
                logits_a2t = scale * a_all @ t_all.T
                logits_t2a = logits_a2t.T
                row_offset = 0
            rows = logits_a2t.shape[0]
            targets = torch.arange(rows, device=logits_a2t.device) + row_offset
            loss = 0.5 * (
                F.cross_entropy(logits_a2t, targets) + F.cross_entropy(logits_t2a, targets)
            )
        with torch.no_grad():
            accuracy_a2t = (logits_a2t.argmax(dim=1) == targets).float().mean()
            accuracy_t2a = (logits_t2a.argmax(dim=1) == targets).float().mean()
        return AligningContrastOutput(
            loss=loss,
            logits_a2t=logits_a2t,
            logits_t2a=logits_t2a,
            accuracy_a2t=accuracy_a2t,
            accuracy_t2a=accuracy_t2a,
            scale=scale.detach(),
        )

    def _gather(
        self, a_local: torch.Tensor, t_local: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Features from every rank (or the local ones alone) and this rank's row offset."""
        if world_size(self.group) == 1:
            return a_local, t_local, 0
        a_all = all_gather(a_local, with_grad=self.gather_with_grad, group=self.group)
        t_all = all_gather(t_local, with_grad=self.gather_with_grad, group=self.group)
        return a_all, t_all, rank(self.group) * a_local.shape[0]

    @staticmethod
    def _check_embeddings(a_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
        _require_float("a_emb", a_emb)
        _require_float("text_emb", text_emb)
        if a_emb.dim() != 2 or text_emb.dim() != 2:
            raise ValueError(
                "AligningContrast: a_emb and text_emb must be [B, E], got shapes "
                f"{tuple(a_emb.shape)} and {tuple(text_emb.shape)}"
            )
        if a_emb.shape != text_emb.shape:
            raise ValueError(
                "AligningContrast: a_emb and text_emb must have the same shape (row i is a "
                f"pair), got {tuple(a_emb.shape)} and {tuple(text_emb.shape)}"
            )
        if a_emb.shape[0] == 0:
            raise ValueError("AligningContrast: the batch is empty (B = 0)")


# --------------------------------------------------------------------------------------------
# Intra-modal denoising contrast


@dataclass(frozen=True)
class DenoisingContrastOutput:
    """Loss plus metrics of one :class:`DenoisingContrast` call.

    ``accuracy`` (detached 0-d) is the fraction of masked tokens whose own teacher row is the
    most similar candidate; NaN when nothing was masked.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    num_masked: int
    num_candidates: int


class DenoisingContrast(nn.Module):
    """Intra-modal denoising contrast (spec §3.3 step 5).

    ``forward(student [B,N,D], teacher [B,N,D], masked [B,N] bool, padding_mask [B,N] bool)``:
    ``student`` is the decoder output over the full-length sequence, ``teacher`` the model's
    output on the unmasked input (detached here, so no gradient ever reaches it), ``masked``
    the positions the student predicts, ``padding_mask`` True at padding (None: no padding).

    Position 0 (CLS) and padded positions are dropped everywhere (also from ``masked``). Each
    masked student row, L2-normalised in fp32, is scored against the normalised teacher rows at
    every remaining position of every sample in the local batch (no cross-rank gather), with
    logits ``cos / temperature``; the positive is the same (sample, position). The loss is
    :func:`label_smoothed_nll` averaged over the masked tokens.

    Nothing masked gives an exact zero that is still connected to ``student`` in the autograd
    graph (with zero gradient), so DDP sees every parameter upstream as used.
    """

    def __init__(self, *, temperature: float = 0.4, label_smoothing: float = 0.1) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0.0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        _check_smoothing(label_smoothing)
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, label_smoothing={self.label_smoothing}"

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        masked: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_with_metrics(student, teacher, masked, padding_mask).loss

    def forward_with_metrics(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        masked: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> DenoisingContrastOutput:
        self._check_inputs(student, teacher, masked, padding_mask)
        masked = masked.to(student.device)
        if padding_mask is not None:
            padding_mask = padding_mask.to(student.device)
        candidate_positions = ~padding_mask if padding_mask is not None else torch.ones_like(masked)
        candidate_positions[:, 0] = False  # CLS is never a target
        student_positions = masked & candidate_positions
        num_masked = int(student_positions.sum())
        if num_masked == 0:
            # An empty slice sums to an exact 0.0 (never NaN) that stays in student's graph.
            zero = _at_least_fp32(student[..., :0].sum())
            return DenoisingContrastOutput(
                loss=zero,
                accuracy=torch.full((), math.nan, device=student.device),
                num_masked=0,
                num_candidates=int(candidate_positions.sum()),
            )

        # Index of each student's own teacher row among the flattened candidates.
        flat_candidates = candidate_positions.flatten()
        candidate_index = torch.cumsum(flat_candidates.long(), dim=0) - 1
        targets = candidate_index[student_positions.flatten()]

        with _no_autocast(student.device):
            queries, keys = _common_compute_dtype(
                student[student_positions], teacher.detach()[candidate_positions]
            )
            queries = F.normalize(queries, dim=-1)
            keys = F.normalize(keys, dim=-1)
            logits = queries @ keys.T / self.temperature
            log_probs = F.log_softmax(logits, dim=-1)
            loss = label_smoothed_nll(log_probs, targets, self.label_smoothing).mean()
        with torch.no_grad():
            accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return DenoisingContrastOutput(
            loss=loss,
            accuracy=accuracy,
            num_masked=num_masked,
            num_candidates=keys.shape[0],
        )

    @staticmethod
    def _check_inputs(
        student: torch.Tensor,
        teacher: torch.Tensor,
        masked: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> None:
        _require_float("student", student)
        _require_float("teacher", teacher)
        if student.dim() != 3:
            raise ValueError(
                f"DenoisingContrast: student must be [B, N, D], got shape {tuple(student.shape)}"
            )
        if teacher.shape != student.shape:
            raise ValueError(
                "DenoisingContrast: teacher must have the student's shape "
                f"{tuple(student.shape)}, got {tuple(teacher.shape)}"
            )
        if student.shape[1] == 0:
            raise ValueError("DenoisingContrast: sequences are empty (N = 0)")
        _require_bool_mask("masked", masked, student.shape[:2])
        if padding_mask is not None:
            _require_bool_mask("padding_mask", padding_mask, student.shape[:2])


def embedding_spread(embeddings: torch.Tensor) -> torch.Tensor:
    """How much a batch of L2-normalised embeddings ``[B,D]`` varies, on a 0–1 scale.

    The across-batch std of each coordinate, averaged over coordinates and multiplied by
    ``sqrt(D)``: about 1 for independent random unit vectors, 0 when every embedding is the
    same (a collapsed contrast). A single row gives 0.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embedding_spread: expected [B,D], got {tuple(embeddings.shape)}")
    if embeddings.shape[0] < 2:
        return embeddings.new_zeros(())
    spread = embeddings.detach().float().std(dim=0, unbiased=False).mean()
    return spread * embeddings.shape[1] ** 0.5
