"""The pretraining objective: masked students, the light decoder, both losses (spec §3)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError

from peace_core import create_model, gemm
from peace_core.config import EncoderConfig
from peace_core.losses import DenoisingContrast
from peace_core.presets import get_preset
from peace_core.pretrain import (
    DecoderConfig,
    DecoderView,
    LossWeights,
    ObjectiveConfig,
    ObjectiveInputError,
    PretrainDecoder,
    PretrainObjective,
    kept_positions,
)

PATCH = 16
IMAGE = 64  # a 4x4 patch grid
SMALL_AUDIO = {
    "max_duration": 1.0,
    "feature_layers": [(32, 10, 5), (32, 3, 2), (32, 3, 2), (32, 3, 2), (32, 3, 2), (32, 2, 2)],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: one thread is several times faster than contended intra-op parallelism.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(*modalities: str, seed: int = 0):
    config = get_preset("tiny")
    options = {
        "text": {"tokenizer": {"kind": "bytes"}, "vocab_size": 260},
        "vision": {"image_size": IMAGE},
        "audio": SMALL_AUDIO,
    }
    config["modalities"] = {name: options[name] for name in modalities}
    torch.manual_seed(seed)
    return create_model(config)


def text_batch(size: int = 4, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Byte-token ids with EOS (2) and padding (1); words of 1-3 pieces."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 260, (size, length), generator=gen)
    word_start = torch.rand(size, length, generator=gen) < 0.5
    word_start[:, 0] = True
    for row in range(size):
        used = length - row  # row r has r padding tokens
        tokens[row, used - 1] = 2
        tokens[row, used:] = 1
        word_start[row, used - 1 :] = False
    return {"tokens": tokens, "word_start": word_start}


def vision_batch(size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"pixels": torch.randn(size, 3, IMAGE, IMAGE, generator=gen)}


def audio_batch(size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([16000, 12000, 9000][:size])
    return {"waveform": torch.randn(size, 16000, generator=gen), "lengths": lengths}


@pytest.fixture(scope="module")
def objective():
    return PretrainObjective(tiny_model("text", "vision"))


@pytest.fixture(scope="module")
def pair():
    return {"text": text_batch(), "vision": vision_batch()}


def padding_of(objective, modality, batch):
    return objective.model({modality: batch})[modality].padding_mask


# -------------------------------------------------------------------------------- kept positions


def test_kept_positions_are_sorted_and_padded():
    masked = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    padding = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    keep = kept_positions(masked, padding)
    assert keep.tolist() == [[0, 2, 4], [0, 1, -1]]
    with pytest.raises(ObjectiveInputError, match="CLS"):
        kept_positions(torch.tensor([[1, 0]], dtype=torch.bool), torch.zeros(1, 2, dtype=bool))
    with pytest.raises(ObjectiveInputError, match=r"\[B,N\]"):
        kept_positions(masked, padding[:, :3])


# -------------------------------------------------------------------------------- no leakage


def _other_id(token: torch.Tensor) -> int:
    return 5 if int(token) == 4 else 4


def _masked_text_position(mask):
    rows, cols = mask.nonzero(as_tuple=True)
    assert rows.numel(), "the masker hid nothing; pick another seed"
    return int(rows[0]), int(cols[0])


def test_text_student_never_sees_masked_units(objective):
    batch = text_batch()
    padding = padding_of(objective, "text", batch)
    gen = torch.Generator().manual_seed(3)
    mask = objective.make_mask("text", batch, padding, gen)
    masks, pads = {"text": mask}, {"text": padding}
    with torch.no_grad():
        base = objective.encode_student({"text": batch}, masks, pads, joint=False)["text"]
        row, _ = _masked_text_position(mask)
        hidden_changed = copy.deepcopy(batch)
        for masked_row, pos in mask.nonzero().tolist():
            token = batch["tokens"][masked_row, pos - 1]
            hidden_changed["tokens"][masked_row, pos - 1] = _other_id(token)
        same = objective.encode_student({"text": hidden_changed}, masks, pads, joint=False)["text"]
        kept = next(p for p in base.keep[row].tolist() if p > 0 and not mask[row, p])
        visible_changed = copy.deepcopy(batch)
        visible_changed["tokens"][row, kept - 1] = _other_id(batch["tokens"][row, kept - 1])
        other = objective.encode_student({"text": visible_changed}, masks, pads, joint=False)
    assert torch.equal(same.keep, base.keep)
    torch.testing.assert_close(same.hidden, base.hidden, atol=1e-6, rtol=0)
    assert not torch.allclose(other["text"].hidden[row], base.hidden[row], atol=1e-4)


def _set_patch(pixels, row, position, value):
    patch = position - 1  # position 0 is CLS; patches are row-major
    grid = IMAGE // PATCH
    top, left = (patch // grid) * PATCH, (patch % grid) * PATCH
    pixels[row, :, top : top + PATCH, left : left + PATCH] = value


def test_vision_student_never_sees_masked_patches(objective):
    batch = vision_batch()
    padding = padding_of(objective, "vision", batch)
    mask = objective.make_mask("vision", batch, padding, torch.Generator().manual_seed(1))
    assert mask.sum(dim=1).tolist() == [12] * 4  # 75 % of 16 patches
    masks, pads = {"vision": mask}, {"vision": padding}
    hidden_changed = {"pixels": batch["pixels"].clone()}
    visible_changed = {"pixels": batch["pixels"].clone()}
    for row in range(4):
        for position in mask[row].nonzero().flatten().tolist():
            _set_patch(hidden_changed["pixels"], row, position, 5.0)
    kept = next(p for p in range(1, 17) if not mask[0, p])
    _set_patch(visible_changed["pixels"], 0, kept, 5.0)
    with torch.no_grad():
        base = objective.encode_student({"vision": batch}, masks, pads, joint=False)["vision"]
        same = objective.encode_student({"vision": hidden_changed}, masks, pads, joint=False)
        other = objective.encode_student({"vision": visible_changed}, masks, pads, joint=False)
    torch.testing.assert_close(same["vision"].hidden, base.hidden, atol=1e-6, rtol=0)
    assert not torch.allclose(other["vision"].hidden[0], base.hidden[0], atol=1e-4)
    torch.testing.assert_close(other["vision"].hidden[1:], base.hidden[1:], atol=1e-6, rtol=0)


def test_joint_student_never_sees_masked_units_of_either_modality(objective, pair):
    pads = {m: padding_of(objective, m, pair[m]) for m in pair}
    gen = torch.Generator().manual_seed(5)
    single = {m: objective.make_mask(m, pair[m], pads[m], gen) for m in ("text", "vision")}
    masks = {
        m: objective.make_mask(m, pair[m], pads[m], gen, joint=True, single_view_mask=single[m])
        for m in ("text", "vision")
    }
    # The joint vision view keeps only patches the image-only view hid (disjoint visible sets).
    assert not bool((~masks["vision"] & ~single["vision"])[:, 1:].any())
    changed = copy.deepcopy(pair)
    for row, pos in masks["text"].nonzero().tolist():
        changed["text"]["tokens"][row, pos - 1] = 7
    for row, pos in masks["vision"].nonzero().tolist():
        _set_patch(changed["vision"]["pixels"], row, pos, -3.0)
    with torch.no_grad():
        base = objective.encode_student(pair, masks, pads, joint=True)
        same = objective.encode_student(changed, masks, pads, joint=True)
    for m in pair:
        torch.testing.assert_close(same[m].hidden, base[m].hidden, atol=1e-6, rtol=0)


def test_student_equals_full_forward_where_it_should(pair):
    model = tiny_model("text", "vision")
    objective = PretrainObjective(model)
    for modality, batch in pair.items():
        pads = {modality: padding_of(objective, modality, batch)}
        nothing = {modality: torch.zeros_like(pads[modality])}
        with torch.no_grad():
            full = model({modality: batch})[modality].hidden
            student = objective.encode_student({modality: batch}, nothing, pads, joint=False)
        # Nothing masked: the student IS the full forward (relative positions included).
        torch.testing.assert_close(student[modality].hidden, full, atol=1e-5, rtol=1e-5)

    # With attention that cannot mix tokens (zero out-projections), every kept unit's output
    # must equal the full forward's at its ORIGINAL position (absolute positions gathered right).
    for block in model.encoder.blocks:
        torch.nn.init.zeros_(block.attn.out_proj.weight)
    gen = torch.Generator().manual_seed(2)
    for modality, batch in pair.items():
        pads = {modality: padding_of(objective, modality, batch)}
        masks = {modality: objective.make_mask(modality, batch, pads[modality], gen)}
        with torch.no_grad():
            full = model({modality: batch})[modality].hidden
            view = objective.encode_student({modality: batch}, masks, pads, joint=False)[modality]
        rows, slots = (view.keep >= 0).nonzero(as_tuple=True)
        expected = full[rows, view.keep[rows, slots]]
        torch.testing.assert_close(view.hidden[rows, slots], expected, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------- decoder


def _decoder(**overrides):
    config = DecoderConfig(dim=32, heads=4, ffn_dim=64, max_positions=20, **overrides)
    torch.manual_seed(0)
    return PretrainDecoder(config, ["text", "vision"], encoder_dim=16)


def test_decoder_fills_mask_tokens_at_original_positions():
    decoder = _decoder()
    keep = torch.tensor([[0, 2, 5], [0, 3, -1]])
    hidden = torch.randn(2, 3, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 6] = True
    view = DecoderView("text", hidden, keep, padding)
    filled = decoder.fill(view)
    positions = decoder.positions["text"].weight[:7]
    mask_token = decoder.mask_tokens["text"][0]
    embedded = decoder.embed["text"](hidden)
    for row in range(2):
        kept = {p: slot for slot, p in enumerate(keep[row].tolist()) if p >= 0}
        for p in range(7):
            content = embedded[row, kept[p]] if p in kept else mask_token
            torch.testing.assert_close(filled[row, p], content + positions[p])

    (out,) = decoder([view])
    assert out.shape == (2, 7, 16)
    # Masked positions depend only on mask token + positions + kept context: the decoder
    # output is the head of its fusion encoder run on exactly that filled sequence.
    from peace_core.encoder import Segment

    manual = decoder.encoder([Segment("text", filled, padding)], mask_padding=False).hidden[0]
    torch.testing.assert_close(out, decoder.mask_heads["text"](manual))
    # A padding slot's content (keep = -1) is never read.
    noisy = hidden.clone()
    noisy[1, 2] = 100.0
    torch.testing.assert_close(decoder([DecoderView("text", noisy, keep, padding)])[0], out)
    # Changing the mask token changes the predictions at masked positions.
    with torch.no_grad():
        decoder.mask_tokens["text"].add_(1.0)
    assert not torch.allclose(decoder([view])[0][0, 1], out[0, 1])


def test_decoder_padding_flag_and_joint_decoding():
    loose, strict = _decoder(), _decoder(mask_padding=True)
    strict.load_state_dict(loose.state_dict())
    keep = torch.tensor([[0, 1], [0, 2]])
    hidden = torch.randn(2, 2, 16)
    padded = torch.zeros(2, 5, dtype=torch.bool)
    padded[1, 3:] = True
    view = DecoderView("text", hidden, keep, padded)
    # Official behaviour: padded positions are attended, so the padded row's outputs differ.
    assert not torch.allclose(loose([view])[0][1, :3], strict([view])[0][1, :3])
    torch.testing.assert_close(loose([view])[0][0], strict([view])[0][0])

    image = DecoderView(
        "vision",
        torch.randn(2, 3, 16),
        torch.tensor([[0, 4, 6]] * 2),
        torch.zeros(2, 9, dtype=torch.bool),
    )
    text_out, image_out = loose([view, image])
    assert text_out.shape == (2, 5, 16) and image_out.shape == (2, 9, 16)
    # Joint decoding lets the modalities see each other.
    assert not torch.allclose(text_out, loose([view])[0])


def test_decoder_rejects_bad_views():
    decoder = _decoder()
    hidden, keep = torch.randn(1, 2, 16), torch.tensor([[0, 1]])
    with pytest.raises(KeyError, match="no such modality"):
        decoder([DecoderView("audio", hidden, keep, torch.zeros(1, 4, dtype=torch.bool))])
    with pytest.raises(ValueError, match="max_positions"):
        decoder([DecoderView("text", hidden, keep, torch.zeros(1, 21, dtype=torch.bool))])
    with pytest.raises(ValueError, match=r"0\.\.3"):
        decoder([DecoderView("text", hidden, keep + 3, torch.zeros(1, 4, dtype=torch.bool))])
    with pytest.raises(ValueError, match="hidden must be"):
        decoder([DecoderView("text", hidden[..., :8], keep, torch.zeros(1, 4, dtype=torch.bool))])
    with pytest.raises(ValidationError, match="divisible"):
        DecoderConfig(dim=30, heads=4)


def test_decoder_config_follows_official_proportions():
    official = DecoderConfig.for_encoder(EncoderConfig(dim=1536, depth=40, heads=24, ffn_dim=6144))
    assert (official.dim, official.heads, official.ffn_dim, official.depth) == (768, 12, 2048, 2)
    tiny = DecoderConfig.for_encoder(EncoderConfig(dim=64, heads=4, ffn_dim=128))
    assert (tiny.dim, tiny.heads, tiny.ffn_dim) == (64, 4, 128)
    assert not tiny.mask_padding  # the official decoder attends to padding
    assert DecoderConfig.for_encoder(EncoderConfig(), depth=3).depth == 3


# -------------------------------------------------------------------------------- the objective


def test_loss_is_finite_and_reaches_every_trained_part(pair):
    objective = PretrainObjective(tiny_model("text", "vision"))
    loss, metrics = objective(pair, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and math.isfinite(loss.item())
    expected = {
        "loss", "logit_scale", "align:text-vision",
        "align_acc:vision->text", "align_acc:text->vision",
        "dcl:text", "dcl:vision", "dcl:joint:text", "dcl:joint:vision",
        "dcl_acc:text", "dcl_acc:vision", "dcl_acc:joint:text", "dcl_acc:joint:vision",
        "align_chance:text-vision", "spread:vision", "spread:text",
    }  # fmt: skip
    assert set(metrics) == expected
    assert all(isinstance(value, float) for value in metrics.values())
    # Chance is ln(candidates per row): the batch, on one process.
    batch = pair["vision"]["pixels"].shape[0]
    assert metrics["align_chance:text-vision"] == pytest.approx(math.log(batch))
    assert 0.0 < metrics["spread:vision"] < 1.5 and 0.0 < metrics["spread:text"] < 1.5
    weighted = (
        metrics["align:text-vision"]
        + 0.5 * metrics["dcl:text"]
        + 1.0 * metrics["dcl:vision"]
        + 0.5 * metrics["dcl:joint:text"]
        + 0.5 * metrics["dcl:joint:vision"]
    )
    assert metrics["loss"] == pytest.approx(weighted, rel=1e-5)
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)

    loss.backward()
    model, decoder = objective.model, objective.decoder
    trained = {
        "text adapter": model.adapters["text"].token_embed.weight,
        "vision adapter": model.adapters["vision"].stem.conv1.weight,
        "shared attention": model.encoder.blocks[0].attn.q_proj.weight,
        "text FFN": model.encoder.blocks[1].ffns["text"].wo.weight,
        "vision projection": model.projections["vision"].weight,
        "logit_scale": model.logit_scale,
        "decoder embed": decoder.embed["vision"].weight,
        "decoder mask token": decoder.mask_tokens["text"],
        "decoder positions": decoder.positions["vision"].weight,
        "decoder block": decoder.encoder.blocks[1].attn.v_proj.weight,
        "decoder mask head": decoder.mask_heads["text"].weight,
    }
    for name, param in trained.items():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


def test_same_seed_same_loss(objective, pair):
    first, first_metrics = objective(pair, torch.Generator().manual_seed(11))
    again, again_metrics = objective(pair, torch.Generator().manual_seed(11))
    other, _ = objective(pair, torch.Generator().manual_seed(12))
    assert torch.equal(first, again) and first_metrics == again_metrics
    assert not torch.equal(first, other)


def test_single_modality_batches_get_only_their_view(objective, pair):
    for modality in pair:
        loss, metrics = objective({modality: pair[modality]}, torch.Generator().manual_seed(0))
        assert set(metrics) == {"loss", f"dcl:{modality}", f"dcl_acc:{modality}"}
        weight = 0.5 if modality == "text" else 1.0
        assert loss.item() == pytest.approx(weight * metrics[f"dcl:{modality}"], rel=1e-6)


def _count_adapter_calls(model):
    calls = {name: 0 for name in model.adapters}

    def counter(name):
        def hook(module, args, kwargs, output):
            calls[name] += 1

        return hook

    handles = [
        adapter.register_forward_hook(counter(name), with_kwargs=True)
        for name, adapter in model.adapters.items()
    ]
    return calls, handles


@pytest.mark.parametrize(
    ("weights", "text_calls", "vision_calls", "views"),
    [
        # unmasked x2, joint pass, single students x2, joint student
        ({}, 4, 4, {"text", "vision", "joint:text", "joint:vision"}),
        # stage 2 shape: no text-only view -> no text-only student
        ({"anchor": 0.0}, 3, 4, {"vision", "joint:text", "joint:vision"}),
        # no joint views -> neither joint pass nor joint student
        ({"joint_anchor": 0.0, "joint_other": 0.0}, 2, 2, {"text", "vision"}),
        # only the image view: text is never encoded
        ({"align": 0.0, "anchor": 0.0, "joint_anchor": 0.0, "joint_other": 0.0}, 0, 2, {"vision"}),
        # one joint view still needs the joint student (both modalities masked)
        ({"dcl_weights": {"joint:vision": 0.0}}, 4, 4, {"text", "vision", "joint:text"}),
    ],
)
def test_zero_weight_views_are_skipped(pair, weights, text_calls, vision_calls, views):
    model = tiny_model("text", "vision")
    objective = PretrainObjective(model, ObjectiveConfig(weights=LossWeights(**weights)))
    calls, handles = _count_adapter_calls(model)
    try:
        _, metrics = objective(pair, torch.Generator().manual_seed(0))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"text": text_calls, "vision": vision_calls}
    assert {key[4:] for key in metrics if key.startswith("dcl:")} == views
    assert ("align:text-vision" in metrics) == (weights.get("align", 1.0) > 0)


class RecordingDenoising(DenoisingContrast):
    def __init__(self):
        super().__init__()
        self.teachers: list[torch.Tensor] = []

    def forward_with_metrics(self, student, teacher, masked, padding_mask=None):
        self.teachers.append(teacher.detach().clone())
        return super().forward_with_metrics(student, teacher, masked, padding_mask)


@pytest.mark.parametrize("from_joint", [False, True])
def test_stage2_audio_target_from_joint_pass(from_joint):
    model = tiny_model("text", "audio").eval()
    config = ObjectiveConfig(
        weights=LossWeights.stage2(),
        single_targets_from_joint=["audio"] if from_joint else [],
    )
    objective = PretrainObjective(model, config)
    objective.denoising = RecordingDenoising()
    batch = {"text": text_batch(size=3), "audio": audio_batch()}
    _, metrics = objective(batch, torch.Generator().manual_seed(0))
    assert {key for key in metrics if key.startswith("dcl:")} == {
        "dcl:audio", "dcl:joint:text", "dcl:joint:audio",
    }  # fmt: skip
    with torch.no_grad():
        alone = model({"audio": batch["audio"]})["audio"].hidden
        fused = model(batch, joint=True)["audio"].hidden
    audio_teacher = objective.denoising.teachers[0]  # single views come first
    expected, unexpected = (fused, alone) if from_joint else (alone, fused)
    torch.testing.assert_close(audio_teacher, expected)
    assert not torch.allclose(audio_teacher, unexpected, atol=1e-4)


def test_tiny_model_learns_with_the_full_objective():
    model = tiny_model("text", "vision", seed=1)
    objective = PretrainObjective(model)
    batch = {"text": text_batch(size=6, seed=4), "vision": vision_batch(size=6, seed=4)}
    # The official peak learning rate; much larger ones let Adam collapse this tiny model.
    optimizer = torch.optim.AdamW(objective.parameters(), lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(30):
        loss, metrics = objective(batch, gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics)
    assert all(math.isfinite(step["loss"]) for step in history)

    def mean(key, steps):
        return sum(step[key] for step in steps) / len(steps)

    start, end = history[:5], history[-5:]
    assert mean("loss", end) < 0.8 * mean("loss", start), [step["loss"] for step in history]
    for key in (
        "align:text-vision",
        "dcl:text",
        "dcl:vision",
        "dcl:joint:text",
        "dcl:joint:vision",
    ):
        assert mean(key, end) < mean(key, start), key


# -------------------------------------------------------------------------------- bad input


def test_bad_batches_and_settings_are_named(objective, pair):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ObjectiveInputError, match="does not have"):
        objective({"audio": {}}, gen)
    with pytest.raises(ObjectiveInputError, match="non-empty"):
        objective({}, gen)
    with pytest.raises(ObjectiveInputError, match=r"torch\.Generator"):
        objective(pair, 0)
    three = PretrainObjective(tiny_model("text", "vision", "audio"))
    with pytest.raises(ObjectiveInputError, match="no aligned pair connects"):
        three({"vision": pair["vision"], "audio": audio_batch()}, gen)
    with pytest.raises(ObjectiveInputError, match=r"objective\.pairs .* \['imu'\]"):
        PretrainObjective(three.model, ObjectiveConfig(pairs=[("vision", "imu")]))
    with pytest.raises(ValueError, match="with itself"):
        ObjectiveConfig(pairs=[("vision", "vision")])
    idle = PretrainObjective(objective.model, ObjectiveConfig(weights=LossWeights(anchor=0.0)))
    with pytest.raises(ObjectiveInputError, match="weighted 0"):
        idle({"text": pair["text"]}, gen)
    with pytest.raises(ObjectiveInputError, match="single_targets_from_joint"):
        PretrainObjective(objective.model, ObjectiveConfig(single_targets_from_joint=["audio"]))
    with pytest.raises(ValidationError, match="joint"):
        LossWeights(dcl_weights={"Joint-Text": 1.0})
    with pytest.raises(ValidationError, match=">= 0"):
        LossWeights(dcl_weights={"text": -1.0})
    with pytest.raises(ValidationError, match="extra"):
        LossWeights(aling=1.0)


def test_masker_breaking_the_contract_is_reported(pair):
    def hides_cls(batch, padding_mask, *, generator, joint=False, single_view_mask=None):
        masked = torch.zeros_like(padding_mask)
        masked[:, 0] = True
        return masked

    def hides_padding(batch, padding_mask, *, generator, joint=False, single_view_mask=None):
        return padding_mask.clone()

    model = tiny_model("text", "vision")
    gen = torch.Generator().manual_seed(0)
    for masker, message in ((hides_cls, "CLS"), (hides_padding, "padding")):
        objective = PretrainObjective(model, maskers={"text": masker})
        with pytest.raises(ObjectiveInputError, match=f"'text' masker hid .*{message}"):
            objective({"text": pair["text"]}, gen)


def test_loss_weight_resolution():
    weights = LossWeights()
    assert [weights.dcl(v, "text") for v in ("text", "vision", "joint:text", "joint:audio")] == [
        0.5, 1.0, 0.5, 0.5,
    ]  # fmt: skip
    stage2 = LossWeights.stage2(dcl_weights={"joint:audio": 0.25})
    assert [stage2.dcl(v, "text") for v in ("text", "audio", "joint:text", "joint:audio")] == [
        0.0, 1.0, 0.5, 0.25,
    ]  # fmt: skip


def test_configured_pairs_pretrain_audio_with_vision_without_text():
    """Any pair of modalities can be contrasted: no text, the pair's first modality leads."""
    model = tiny_model("vision", "audio")
    config = ObjectiveConfig(anchor=None, pairs=[("vision", "audio")])
    objective = PretrainObjective(model, config)
    batch = {"audio": audio_batch(size=3), "vision": vision_batch(size=3)}
    plan = objective.plan(batch)
    assert plan.names == ["vision", "audio"] and plan.pairs == [("vision", "audio")]
    loss, metrics = objective(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert metrics["align_chance:vision-audio"] == pytest.approx(math.log(3))
    assert {"align:vision-audio", "dcl:joint:vision", "dcl:joint:audio"} <= set(metrics)
    for name in ("adapters.vision.", "adapters.audio.", "encoder.blocks.0.attn."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
    # Without an anchor every view takes the non-anchor weights.
    assert config.weights.dcl("vision", config.anchor) == config.weights.other


def test_anchored_batch_of_three_aligns_each_with_the_anchor_and_fuses_all():
    objective = PretrainObjective(tiny_model("text", "vision", "audio"))
    batch = {"vision": vision_batch(size=3), "audio": audio_batch(size=3), "text": text_batch(3)}
    plan = objective.plan(batch)
    assert plan.names[0] == "text" and set(plan.names) == {"text", "vision", "audio"}
    assert plan.pairs == [("text", "vision"), ("text", "audio")]
    _, metrics = objective(batch, torch.Generator().manual_seed(0))
    assert {"align:text-vision", "align:text-audio", "dcl:joint:audio"} <= set(metrics)


@pytest.mark.parametrize(
    ("modality", "shared_work"),
    [("audio", "feature_extractor"), ("text", "token_embed"), ("vision", "stem")],
)
def test_adapter_precompute_runs_the_shared_work_once_and_changes_nothing(
    monkeypatch, modality, shared_work
):
    other = "audio" if modality == "audio" else "vision"
    objective = PretrainObjective(tiny_model("text", other)).train()
    adapter = objective.model.adapters[modality]
    assert callable(getattr(adapter, "precompute", None))
    batch = {"text": text_batch(3), other: audio_batch(3) if other == "audio" else vision_batch(3)}
    calls = []
    getattr(adapter, shared_work).register_forward_hook(lambda *_: calls.append(1))

    def loss_and_grads():
        calls.clear()
        objective.zero_grad(set_to_none=True)
        loss, _ = objective(batch, torch.Generator().manual_seed(3))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
        return loss.detach(), grads, len(calls)

    shared_loss, shared_grads, shared_calls = loss_and_grads()
    monkeypatch.setattr(type(adapter), "precompute", None)  # as an adapter without the hook
    loss, grads, calls_per_view = loss_and_grads()

    assert shared_calls == 1
    assert calls_per_view == 4  # unmasked, joint, masked single and masked joint views
    torch.testing.assert_close(shared_loss, loss, atol=1e-6, rtol=1e-6)
    assert shared_grads.keys() == grads.keys()
    shared = [n for n in grads if f".{shared_work}." in n]
    assert shared and all(grads[n].abs().sum() > 0 for n in shared)
    for name, grad in grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
def test_step_agrees_across_cpu_gemm_libraries(pair, backend):
    """The image-text step's loss and every gradient are the same, to fp32 rounding, whether the
    fusion layers' GEMMs run on torch's BLAS or on oneDNN (peace_core.gemm)."""
    results = {}
    for name in ("blas", "onednn"):
        backend(name)
        loss, _, grads = _step(PretrainObjective(tiny_model("text", "vision", seed=3)), pair)
        results[name] = (loss, grads)
    (loss_blas, grads_blas), (loss_onednn, grads_onednn) = results["blas"], results["onednn"]
    torch.testing.assert_close(loss_onednn, loss_blas, rtol=1e-5, atol=1e-6)
    assert grads_blas.keys() == grads_onednn.keys() and len(grads_blas) > 20
    for name, grad in grads_blas.items():
        torch.testing.assert_close(grads_onednn[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def _step(objective, batch, seed=0):
    objective.zero_grad(set_to_none=True)
    loss, metrics = objective(batch, torch.Generator().manual_seed(seed))
    loss.backward()
    grads = {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("modalities", [("text", "vision"), ("text", "audio")])
def test_skipped_last_block_work_leaves_loss_and_gradients_unchanged(monkeypatch, modalities):
    """The step computes the decoder's last block only at masked positions and trains the
    unmasked passes only through their embeddings; against a step that computes everything,
    the loss, every metric and every gradient agree."""
    batches = {"text": text_batch(), "vision": vision_batch(), "audio": audio_batch()}
    batch = {m: batches[m] for m in modalities}
    batch = {m: {k: v[:3] for k, v in b.items()} for m, b in batch.items()}
    model = tiny_model(*modalities, seed=5)
    objective = PretrainObjective(model, ObjectiveConfig(weights=LossWeights(joint_anchor=0.0)))
    objective.train()
    torch.manual_seed(0)
    fast = _step(objective, batch)

    decoder_forward, model_forward = PretrainDecoder.forward, type(model).forward
    monkeypatch.setattr(
        PretrainDecoder,
        "forward",
        lambda self, views, outputs_at=None: decoder_forward(self, views),
    )
    monkeypatch.setattr(
        type(model),
        "forward",
        lambda self, batch, hidden_grad=True, **kw: model_forward(self, batch, **kw),
    )
    torch.manual_seed(0)
    full = _step(objective, batch)

    torch.testing.assert_close(fast[0], full[0], rtol=1e-5, atol=1e-6)
    assert fast[1].keys() == full[1].keys()
    for name, value in full[1].items():
        assert math.isclose(fast[1][name], value, rel_tol=1e-4, abs_tol=1e-5), name
    assert fast[2].keys() == full[2].keys()
    for name, grad in full[2].items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(fast[2][name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_hidden_grad_false_detaches_hidden_and_keeps_the_embedding_gradient(pair):
    model = tiny_model("text", "vision", seed=2)
    out = model({"vision": pair["vision"]}, hidden_grad=False)["vision"]
    reference = model({"vision": pair["vision"]})["vision"]
    assert not out.hidden.requires_grad and out.embedding.requires_grad
    torch.testing.assert_close(out.hidden, reference.hidden.detach(), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.embedding.sum(), list(model.parameters()), allow_unused=True)
    want = torch.autograd.grad(
        reference.embedding.sum(), list(model.parameters()), allow_unused=True
    )
    for got, expected in zip(grads, want):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
