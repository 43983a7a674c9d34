"""Our model, loaded from an official-format checkpoint, reproduces the official outputs.

Fixture: ../shared/fixtures/one_peace_parity_a (a tiny random-weight ONE-PEACE, its inputs and the
official implementation's outputs in fp32). Skipped when the fixture is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peace_core import from_pretrained

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "one_peace_parity_a"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="parity fixture not available")

HIDDEN_TOL = 1e-5
EMBED_TOL = 1e-6


@pytest.fixture(scope="module")
def model():
    return from_pretrained(FIXTURE / "checkpoint.pt")


@pytest.fixture(scope="module")
def inputs():
    return torch.load(FIXTURE / "inputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURE / "expected.pt", weights_only=True)


def _batches(inputs):
    return {
        "text": {"tokens": inputs["text_tokens"]},
        "vision": {"pixels": inputs["image"]},
        "audio": {"waveform": inputs["audio"], "lengths": inputs["audio_lengths"]},
    }


def _assert_close_valid(actual, reference, padding_mask, tol):
    assert actual.shape == reference.shape
    valid = ~padding_mask
    diff = (actual - reference).abs()[valid].max().item()
    assert diff <= tol, f"max abs difference {diff:.3g} exceeds {tol}"


OFFICIAL_NAME = {"text": "text", "vision": "image", "audio": "audio"}


@pytest.mark.parametrize("modality", ["text", "vision", "audio"])
@torch.no_grad()
def test_single_modality_parity(model, inputs, expected, modality):
    name = OFFICIAL_NAME[modality]
    out = model.branch(modality)({modality: _batches(inputs)[modality]})[modality]
    assert torch.equal(out.padding_mask, expected[f"{name}_padding_mask"])
    _assert_close_valid(out.hidden, expected[f"{name}_hidden"], out.padding_mask, HIDDEN_TOL)
    diff = (out.embedding - expected[f"{name}_embed"]).abs().max().item()
    assert diff <= EMBED_TOL, f"embedding differs by {diff:.3g}"


@pytest.mark.parametrize(("other", "key"), [("vision", "vl"), ("audio", "al")])
@torch.no_grad()
def test_joint_parity(model, inputs, expected, other, key):
    batches = _batches(inputs)
    out = model.branch(other, "text")({"text": batches["text"], other: batches[other]})
    hidden = torch.cat([out["text"].hidden, out[other].hidden], dim=1)
    mask = torch.cat([out["text"].padding_mask, out[other].padding_mask], dim=1)
    assert torch.equal(mask, expected[f"{key}_padding_mask"])
    _assert_close_valid(hidden, expected[f"{key}_hidden"], mask, HIDDEN_TOL)


@torch.no_grad()
def test_audio_clips_alone_parity(model, inputs, expected):
    branch = model.branch("audio")
    for index, length in enumerate(inputs["audio_lengths"].tolist()):
        clip = inputs["audio"][index : index + 1, :length]
        out = branch({"audio": {"waveform": clip, "lengths": torch.tensor([length])}})["audio"]
        reference = expected["audio_hidden_single"][index]
        _assert_close_valid(out.hidden[0], reference, out.padding_mask[0], HIDDEN_TOL)
        diff = (out.embedding[0] - expected["audio_embed_single"][index]).abs().max().item()
        assert diff <= EMBED_TOL


@torch.no_grad()
def test_vision_only_load_builds_no_other_modality(inputs, expected):
    model = from_pretrained(FIXTURE / "checkpoint.pt", modalities=["vision"])
    assert model.modalities == ("vision",)
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if ".text" in n or ".audio" in n or "text." in n]
    assert all(p.device.type == "cpu" for p in model.parameters())
    out = model.branch("vision")({"vision": {"pixels": inputs["image"]}})["vision"]
    _assert_close_valid(out.hidden, expected["image_hidden"], out.padding_mask, HIDDEN_TOL)
