"""The two pretraining losses against values worked out independently with python/numpy maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peace_core.losses import (
    LOGIT_SCALE_MAX,
    AligningContrast,
    DenoisingContrast,
    clamp_logit_scale_,
    label_smoothed_nll,
)

# --------------------------------------------------------------------------------------------
# Independent references (plain python / numpy, no torch)


def _log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _clip_loss_reference(a: list[list[float]], t: list[list[float]], scale: float) -> float:
    """½(CE(a→t) + CE(t→a)) with loops over python floats."""
    n = len(a)
    sim = [[scale * sum(x * y for x, y in zip(a[i], t[j])) for j in range(n)] for i in range(n)]
    a2t = sum(math.log(sum(math.exp(v) for v in sim[i])) - sim[i][i] for i in range(n)) / n
    t2a = (
        sum(math.log(sum(math.exp(sim[j][i]) for j in range(n))) - sim[i][i] for i in range(n)) / n
    )
    return 0.5 * (a2t + t2a)


def _denoising_reference(
    student: np.ndarray,
    teacher: np.ndarray,
    masked: np.ndarray,
    padding: np.ndarray,
    temperature: float,
    epsilon: float,
) -> float:
    """Spec §3.3 step 5 written out with numpy, one masked token at a time."""
    batch, length, _ = student.shape
    candidates = [(b, n) for b in range(batch) for n in range(1, length) if not padding[b, n]]
    keys = np.stack([teacher[b, n] / np.linalg.norm(teacher[b, n]) for b, n in candidates])
    count = len(candidates)
    losses = []
    for b, n in candidates:
        if not masked[b, n]:
            continue
        query = student[b, n] / np.linalg.norm(student[b, n])
        log_p = _log_softmax_rows((keys @ query / temperature)[None])[0]
        nll = -log_p[candidates.index((b, n))]
        eps_i = epsilon / (count - 1)
        losses.append((1 - epsilon - eps_i) * nll + eps_i * (-log_p.sum()))
    return float(np.mean(losses))


def _unit_rows(rows: list[list[float]]) -> list[list[float]]:
    return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]


A_ROWS = _unit_rows([[1.0, 0.0, 0.5], [0.6, 0.8, 0.0], [0.0, 1.0, -1.0]])
T_ROWS = _unit_rows([[0.8, 0.6, 0.2], [0.1, 1.0, 0.0], [1.0, 0.0, -0.7]])


# --------------------------------------------------------------------------------------------
# AligningContrast


def test_aligning_contrast_matches_hand_computed_value() -> None:
    loss_fn = AligningContrast()
    out = loss_fn.forward_with_metrics(
        torch.tensor(A_ROWS), torch.tensor(T_ROWS), torch.tensor(math.log(10.0))
    )
    expected = _clip_loss_reference(A_ROWS, T_ROWS, 10.0)
    assert out.loss.shape == ()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn(
        torch.tensor(A_ROWS), torch.tensor(T_ROWS), torch.tensor(math.log(10.0))
    ).item() == (pytest.approx(expected, rel=1e-5))
    assert out.scale.item() == pytest.approx(10.0, rel=1e-6)
    sims = np.array(A_ROWS) @ np.array(T_ROWS).T
    assert out.logits_a2t.shape == (3, 3)
    np.testing.assert_allclose(out.logits_a2t.numpy(), 10 * sims, rtol=1e-5)
    np.testing.assert_allclose(out.logits_t2a.numpy(), 10 * sims.T, rtol=1e-5)
    assert out.accuracy_a2t.item() == pytest.approx(np.mean(sims.argmax(1) == np.arange(3)))
    assert out.accuracy_t2a.item() == pytest.approx(np.mean(sims.argmax(0) == np.arange(3)))


def test_aligning_contrast_has_no_label_smoothing() -> None:
    # Orthonormal pairs at scale 100: each row's CE is log(1 + 3·e^-100) without smoothing,
    # while ε = 0.1 of smoothing would add roughly 0.1·100·3/4.
    eye = torch.eye(4, dtype=torch.float64)
    loss = AligningContrast()(eye, eye, torch.tensor(LOGIT_SCALE_MAX, dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log1p(3 * math.exp(-100.0)), rel=1e-6)


@pytest.mark.parametrize(
    ("logit_scale", "used_scale", "clamped"),
    [
        (math.log(1000.0), 100.0, True),  # above ln 100: clamped to 100
        (-0.5, 1.0, True),  # below 0: clamped to scale 1
        (math.log(10.0), 10.0, False),
    ],
)
def test_logit_scale_is_clamped_in_forward(
    logit_scale: float, used_scale: float, clamped: bool
) -> None:
    param = torch.tensor(logit_scale, dtype=torch.float64, requires_grad=True)
    a, t = torch.tensor(A_ROWS, dtype=torch.float64), torch.tensor(T_ROWS, dtype=torch.float64)
    out = AligningContrast().forward_with_metrics(a, t, param)
    assert out.scale.item() == pytest.approx(used_scale, rel=1e-9)
    assert out.loss.item() == pytest.approx(_clip_loss_reference(A_ROWS, T_ROWS, used_scale))
    out.loss.backward()
    if clamped:
        assert param.grad.item() == 0.0
    else:
        # Central finite difference of the hand reference with respect to log(scale).
        h = 1e-5
        numeric = (
            _clip_loss_reference(A_ROWS, T_ROWS, math.exp(logit_scale + h))
            - _clip_loss_reference(A_ROWS, T_ROWS, math.exp(logit_scale - h))
        ) / (2 * h)
        assert param.grad.item() == pytest.approx(numeric, rel=1e-6)
        assert param.grad.item() != 0.0


def test_logit_scale_max_is_configurable() -> None:
    out = AligningContrast(logit_scale_max=math.log(20.0)).forward_with_metrics(
        torch.tensor(A_ROWS), torch.tensor(T_ROWS), torch.tensor(math.log(50.0))
    )
    assert out.scale.item() == pytest.approx(20.0, rel=1e-6)


def test_clamp_logit_scale_in_place() -> None:
    param = torch.nn.Parameter(torch.tensor(7.0))
    same = clamp_logit_scale_(param)
    assert same is param
    assert param.item() == pytest.approx(math.log(100.0))
    assert param.is_leaf and param.grad is None
    param.data.fill_(-2.0)
    clamp_logit_scale_(param)
    assert param.item() == 0.0
    param.data.fill_(2.0)
    clamp_logit_scale_(param)
    assert param.item() == 2.0
    clamp_logit_scale_(param, max_value=1.5)
    assert param.item() == 1.5
    with pytest.raises(ValueError, match="logit_scale_max"):
        clamp_logit_scale_(param, max_value=-1.0)


def test_aligning_contrast_gradients_match_finite_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(4, 5, generator=gen, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(4, 5, generator=gen, dtype=torch.float64), dim=-1)
    scale = torch.tensor(1.3, dtype=torch.float64)
    loss_fn = AligningContrast()
    assert torch.autograd.gradcheck(
        loss_fn, (a.requires_grad_(), t.requires_grad_(), scale.requires_grad_())
    )


def test_aligning_contrast_upcasts_half_precision_and_ignores_autocast() -> None:
    a, t = torch.tensor(A_ROWS), torch.tensor(T_ROWS)
    reference = AligningContrast()(a, t, torch.tensor(2.0))
    half = AligningContrast()(a.bfloat16(), t.float(), torch.tensor(2.0).bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(reference.item(), rel=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = AligningContrast()(a, t, torch.tensor(2.0))
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(reference.item(), rel=1e-6)


def test_aligning_contrast_rejects_bad_input() -> None:
    loss_fn = AligningContrast()
    good = torch.tensor(A_ROWS)
    scale = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"same shape"):
        loss_fn(good, good[:2], scale)
    with pytest.raises(ValueError, match=r"\[B, E\]"):
        loss_fn(good[0], good[0], scale)
    with pytest.raises(TypeError, match="a_emb must be a floating-point"):
        loss_fn(good.long(), good, scale)
    with pytest.raises(TypeError, match=r"text_emb must be a torch\.Tensor"):
        loss_fn(good, A_ROWS, scale)
    with pytest.raises(ValueError, match="logit_scale must hold one value"):
        loss_fn(good, good, torch.ones(2))
    with pytest.raises(ValueError, match="B = 0"):
        loss_fn(good[:0], good[:0], scale)
    with pytest.raises(ValueError, match="logit_scale_max"):
        AligningContrast(logit_scale_max=float("inf"))


# --------------------------------------------------------------------------------------------
# DenoisingContrast


def _denoising_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two samples of length 4; sample 1 has one padded position (3)."""
    rng = np.random.default_rng(7)
    student = rng.normal(size=(2, 4, 3))
    teacher = rng.normal(size=(2, 4, 3))
    masked = np.array([[False, True, True, False], [False, False, True, False]])
    padding = np.array([[False, False, False, False], [False, False, False, True]])
    return student, teacher, masked, padding


def test_denoising_contrast_matches_hand_computed_value() -> None:
    student, teacher, masked, padding = _denoising_case()
    out = DenoisingContrast().forward_with_metrics(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(masked), torch.tensor(padding)
    )
    expected = _denoising_reference(student, teacher, masked, padding, 0.4, 0.1)
    assert out.loss.shape == ()
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    # Candidates: sample 0 positions 1..3, sample 1 positions 1..2 (CLS and padding dropped).
    assert out.num_candidates == 5
    assert out.num_masked == 3


def test_denoising_contrast_drops_cls_and_padding_from_masked() -> None:
    student, teacher, masked, padding = _denoising_case()
    noisy_mask = masked.copy()
    noisy_mask[1, 0] = True  # CLS
    noisy_mask[1, 3] = True  # padding
    loss_fn = DenoisingContrast()
    clean = loss_fn(*(torch.tensor(x) for x in (student, teacher, masked, padding)))
    noisy = loss_fn(*(torch.tensor(x) for x in (student, teacher, noisy_mask, padding)))
    assert noisy.item() == pytest.approx(clean.item(), rel=1e-12)


def test_denoising_contrast_temperature_is_configurable() -> None:
    student, teacher, masked, padding = _denoising_case()
    args = [torch.tensor(x) for x in (student, teacher, masked, padding)]
    expected = _denoising_reference(student, teacher, masked, padding, 1.0, 0.0)
    got = DenoisingContrast(temperature=1.0, label_smoothing=0.0)(*args)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    assert DenoisingContrast().temperature == 0.4


def test_fairseq_label_smoothing_differs_from_torch_convention() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    eps, classes = 0.1, 5
    log_p = F.log_softmax(logits, dim=-1).numpy()
    nll = -log_p[np.arange(6), targets.numpy()]
    total = -log_p.sum(axis=1)
    fairseq = (1 - eps - eps / (classes - 1)) * nll + eps / (classes - 1) * total
    torch_form = (1 - eps) * nll + eps / classes * total

    ours = label_smoothed_nll(F.log_softmax(logits, dim=-1), targets, eps)
    np.testing.assert_allclose(ours.numpy(), fairseq, rtol=1e-12)
    torch_smoothed = F.cross_entropy(logits, targets, label_smoothing=eps)
    assert torch_smoothed.item() == pytest.approx(torch_form.mean(), rel=1e-12)
    # The two conventions are genuinely different numbers.
    assert abs(ours.mean().item() - torch_smoothed.item()) > 1e-3


def test_denoising_contrast_uses_fairseq_smoothing_not_torch() -> None:
    student, teacher, masked, padding = _denoising_case()
    loss = DenoisingContrast()(*(torch.tensor(x) for x in (student, teacher, masked, padding)))
    # Rebuild the logits in torch and score them with torch's own smoothing for contrast.
    valid = ~padding
    valid[:, 0] = False
    queries = F.normalize(torch.tensor(student[masked & valid]), dim=-1)
    keys = F.normalize(torch.tensor(teacher[valid]), dim=-1)
    targets = torch.tensor([0, 1, 4])  # (0,1), (0,2), (1,2) among the 5 candidates
    torch_loss = F.cross_entropy(queries @ keys.T / 0.4, targets, label_smoothing=0.1)
    assert abs(loss.item() - torch_loss.item()) > 1e-4


def test_denoising_gradient_reaches_only_masked_students() -> None:
    student, teacher, masked, padding = _denoising_case()
    noisy_mask = masked.copy()
    noisy_mask[1, 0] = True
    noisy_mask[1, 3] = True
    s = torch.tensor(student, requires_grad=True)
    t = torch.tensor(teacher, requires_grad=True)
    DenoisingContrast()(s, t, torch.tensor(noisy_mask), torch.tensor(padding)).backward()
    row_has_grad = s.grad.abs().sum(-1) > 0
    assert torch.equal(row_has_grad, torch.tensor(masked))
    assert t.grad is None  # the teacher is a detached target


def test_denoising_nothing_masked_is_a_connected_zero() -> None:
    student, teacher, _, padding = _denoising_case()
    only_cls_and_pad = np.zeros_like(padding)
    only_cls_and_pad[:, 0] = True
    only_cls_and_pad[1, 3] = True
    s = torch.tensor(student, requires_grad=True)
    out = DenoisingContrast().forward_with_metrics(
        s, torch.tensor(teacher), torch.tensor(only_cls_and_pad), torch.tensor(padding)
    )
    assert out.loss.item() == 0.0
    assert out.loss.grad_fn is not None
    assert out.num_masked == 0 and math.isnan(out.accuracy.item())
    out.loss.backward()
    assert s.grad is not None and torch.count_nonzero(s.grad) == 0
    # Stays an exact zero even if the student holds non-finite values.
    bad = torch.full((1, 3, 2), float("inf"), requires_grad=True)
    zero = DenoisingContrast()(bad, bad.detach(), torch.zeros(1, 3, dtype=torch.bool))
    assert zero.item() == 0.0


def test_denoising_single_candidate_gives_zero_loss() -> None:
    student = torch.randn(1, 2, 4)
    masked = torch.tensor([[False, True]])
    loss = DenoisingContrast()(student, torch.randn(1, 2, 4), masked)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_denoising_padding_mask_none_means_no_padding() -> None:
    student, teacher, masked, _ = _denoising_case()
    s, t, m = torch.tensor(student), torch.tensor(teacher), torch.tensor(masked)
    assert DenoisingContrast()(s, t, m).item() == pytest.approx(
        DenoisingContrast()(s, t, m, torch.zeros_like(m)).item(), rel=1e-12
    )


def test_denoising_candidates_come_from_every_sample() -> None:
    # Sample 1's teacher rows are exact copies of the masked student rows of sample 0: they
    # are hard negatives only if candidates are pooled over the batch.
    student, teacher, masked, padding = _denoising_case()
    pooled = teacher.copy()
    pooled[1, 1] = student[0, 1]
    args = [torch.tensor(x) for x in (student, teacher, masked, padding)]
    args_pooled = [torch.tensor(x) for x in (student, pooled, masked, padding)]
    out = DenoisingContrast().forward_with_metrics(*args_pooled)
    assert out.loss.item() > DenoisingContrast()(*args).item()
    assert out.loss.item() == pytest.approx(
        _denoising_reference(student, pooled, masked, padding, 0.4, 0.1), rel=1e-10
    )


def test_denoising_gradients_match_finite_differences() -> None:
    student, teacher, masked, padding = _denoising_case()
    loss_fn = DenoisingContrast()

    def of_student(s: torch.Tensor) -> torch.Tensor:
        return loss_fn(s, torch.tensor(teacher), torch.tensor(masked), torch.tensor(padding))

    assert torch.autograd.gradcheck(of_student, (torch.tensor(student, requires_grad=True),))


def test_denoising_computes_in_fp32_for_half_inputs() -> None:
    student, teacher, masked, padding = _denoising_case()
    reference = DenoisingContrast()(*(torch.tensor(x) for x in (student, teacher, masked, padding)))
    half = DenoisingContrast()(
        torch.tensor(student).bfloat16(),
        torch.tensor(teacher).half(),
        torch.tensor(masked),
        torch.tensor(padding),
    )
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(reference.item(), rel=2e-2)


def test_denoising_contrast_rejects_bad_input() -> None:
    loss_fn = DenoisingContrast()
    s = torch.randn(2, 4, 3)
    m = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"student must be \[B, N, D\]"):
        loss_fn(s[0], s[0], m)
    with pytest.raises(ValueError, match="teacher must have the student's shape"):
        loss_fn(s, s[:, :3], m)
    with pytest.raises(TypeError, match="masked must be a bool tensor"):
        loss_fn(s, s, m.long())
    with pytest.raises(ValueError, match=r"masked must have shape \(2, 4\)"):
        loss_fn(s, s, m[:, :3])
    with pytest.raises(ValueError, match=r"padding_mask must have shape"):
        loss_fn(s, s, m, m[:1])
    with pytest.raises(TypeError, match="teacher must be a floating-point"):
        loss_fn(s, s.long(), m)
    with pytest.raises(ValueError, match="temperature"):
        DenoisingContrast(temperature=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DenoisingContrast(label_smoothing=1.0)
