"""Our model, loaded from an official-format checkpoint, reproduces the official outputs.

Fixture: ../shared/fixtures/one_peace_parity_a (a tiny random-weight ONE-PEACE, its inputs and the
official implementation's outputs in fp32). Skipped when the fixture is absent.
"""

from __future__ import annotations

import re
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


def _vision_only_file(tmp_path):
    """The layout of the official vision-only file: renamed keys, no text/audio/heads, a pickle."""
    import pickle

    full = torch.load(FIXTURE / "checkpoint.pt", weights_only=True)["model"]
    renamed = {}
    for key, value in full.items():
        for old, new in (
            ("encoder_wrapper.fusion_model.", "encoder."),
            ("encoder_wrapper.image_adapter.", "image_adapter."),
        ):
            if key.startswith(old):
                rest = key[len(old) :]
                other_modality = re.search(r"(text|audio)_", rest)
                final_norm = re.fullmatch(r"image_layer_norm\.\w+", rest)
                if not (other_modality or final_norm):
                    renamed[new + rest] = value
    path = tmp_path / "one-peace-vision.pkl"
    path.write_bytes(pickle.dumps({"model": renamed, "matching_heuristics": True}))
    return path


@torch.no_grad()
def test_vision_only_official_file_loads_its_backbone(tmp_path, inputs, expected):
    path = _vision_only_file(tmp_path)
    with pytest.raises(Exception, match="lacks"):
        from_pretrained(path)
    with pytest.warns(UserWarning, match="fresh initialisation"):
        model = from_pretrained(path, strict=False)
    assert model.modalities == ("vision",)
    branch = model.branch("vision")
    adapter_out = branch.adapters["vision"]({"pixels": inputs["image"]})
    from peace_core.encoder import Segment

    segment = Segment("vision", adapter_out.tokens, adapter_out.padding_mask, adapter_out.rel_pos)
    states = branch.encoder([segment], return_layer_states=True).layer_states
    for layer, state in enumerate(states):
        diff = (state - expected["image_layer_states"][layer]).abs().max().item()
        assert diff <= HIDDEN_TOL


def test_an_official_modality_no_plugin_claims_is_left_out_with_a_warning(inputs, expected):
    import peace_audio.plugin
    import peace_text.plugin
    from peace_core import builtin_plugin
    from peace_registry import PeaceWarning, Registry

    registry = Registry.from_plugins(
        {"core": builtin_plugin, "text": peace_text.plugin, "audio": peace_audio.plugin}
    )
    with pytest.warns(PeaceWarning, match=r"official modalities \['image'\] are left out"):
        model = from_pretrained(FIXTURE / "checkpoint.pt", registry=registry)
    assert sorted(model.modalities) == ["audio", "text"]
    # What the plugins that are there map still reproduces the official model.
    with torch.no_grad():
        out = model({"text": {"tokens": inputs["text_tokens"]}})["text"]
    _assert_close_valid(out.hidden, expected["text_hidden"], out.padding_mask, HIDDEN_TOL)
    assert (out.embedding - expected["text_embed"]).abs().max().item() <= EMBED_TOL
