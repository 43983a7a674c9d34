"""The model users hold: create_model, branches that share parameters, encode, compose, loading."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from peace_core import (
    compose,
    create_model,
    from_pretrained,
    list_modalities,
    list_models,
    save_pretrained,
)
from peace_core.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from peace_core.model import ModelConfigError
from peace_registry.errors import CheckpointFormatError, UnknownComponentError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny").eval()


def test_presets_and_modalities_are_listed():
    assert {"tiny", "small", "base", "large", "one-peace-4b"} <= set(list_models())
    assert {"vision", "audio", "text"} <= set(list_modalities())


def test_create_model_errors_are_clear():
    with pytest.raises(UnknownComponentError, match=r"did you mean 'tiny'"):
        create_model("tinny")
    with pytest.raises(ModelConfigError, match="did you mean 'depth'"):
        create_model("tiny", detph=3)
    with pytest.raises(UnknownComponentError, match="vision"):
        create_model("tiny", modalities=["visoin"])


def test_branch_shares_parameters_and_holds_only_its_modalities(model):
    branch = model.branch("vision")
    names = dict(branch.named_parameters())
    assert not any(".text" in name or ".audio" in name for name in names)
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in branch.parameters()), "a branch must not copy parameters"
    shared = branch.encoder.blocks[0].attn.q_proj.weight
    assert shared is model.encoder.blocks[0].attn.q_proj.weight
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in branch.parameters()) < total
    with pytest.raises(KeyError, match="built with"):
        model.branch("imu")


def test_branch_forward_outputs(model):
    batch = model.preprocess(
        vision=model.preprocessor("vision").examples(2), text=["a red circle", "two blue squares"]
    )
    single = model.branch("vision", "text")(batch, joint=False)
    joint = model.branch("vision", "text")(batch)
    for out in (single, joint):
        assert set(out) == {"vision", "text"}
        for result in out.values():
            assert result.hidden.shape[:2] == result.padding_mask.shape
            assert result.embedding.shape == (2, model.config.encoder.dim)
            assert torch.allclose(result.embedding.norm(dim=-1), torch.ones(2), atol=1e-5)
    # The fused sequence lets modalities see each other: joint text states differ from text alone.
    assert not torch.allclose(single["text"].hidden, joint["text"].hidden)
    # A single-modality branch over the same inputs equals the non-joint multi-branch output.
    alone = model.branch("text")({"text": batch["text"]})["text"]
    assert torch.allclose(alone.hidden, single["text"].hidden, atol=1e-6)
    with pytest.raises(KeyError, match="does not have"):
        model.branch("text")(batch)


def test_encode_and_compose(model):
    out = model.encode(text=["a dog", "a cat", "a bird"], batch_size=2)
    assert out["text"].shape == (3, model.config.encoder.dim)
    again = model.encode(text=["a cat"])
    assert torch.allclose(again["text"][0], out["text"][1], atol=1e-5)
    query = compose(out["text"][0], out["text"][1])
    assert torch.allclose(query.norm(), torch.tensor(1.0))
    summed = compose(out["text"][0], out["text"][1], mode="sum")
    assert torch.allclose(query, summed, atol=1e-6)
    with pytest.raises(TypeError, match="list of inputs"):
        model.encode(text="a dog")
    with pytest.raises(ValueError, match="share a shape"):
        compose(out["text"][0], out["text"])


def _tiny_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    return save_pretrained(create_model("tiny"), tmp_path / "tiny.safetensors")


def test_native_round_trip_and_subset(tmp_path):
    path = _tiny_checkpoint(tmp_path)
    original = from_pretrained(path)
    reloaded = from_pretrained(path, modalities=["text"])
    assert reloaded.modalities == ("text",)
    a = original.encode(text=["hello world"])["text"]
    b = reloaded.encode(text=["hello world"])["text"]
    assert torch.allclose(a, b, atol=1e-6)


def test_missing_unexpected_and_wrong_shape_keys(tmp_path):
    path = _tiny_checkpoint(tmp_path)
    checkpoint = read_checkpoint(path)
    config, state = checkpoint["config"], dict(checkpoint["state_dict"])

    missing = dict(state)
    missing.pop("encoder.blocks.0.attn.q_proj.weight")
    write_checkpoint(tmp_path / "missing.pt", config, missing)
    with pytest.raises(CheckpointError, match=r"lacks 1 key.*blocks\.0\.attn\.q_proj\.weight"):
        from_pretrained(tmp_path / "missing.pt")
    with pytest.warns(UserWarning, match="fresh initialisation"):
        from_pretrained(tmp_path / "missing.pt", strict=False)

    unexpected = dict(state, **{"encoder.blocks.0.extra": torch.zeros(1)})
    write_checkpoint(tmp_path / "unexpected.pt", config, unexpected)
    with pytest.raises(CheckpointError, match=r"does not have: encoder\.blocks\.0\.extra"):
        from_pretrained(tmp_path / "unexpected.pt")

    wrong = dict(state, **{"projections.text.weight": torch.zeros(3, 3)})
    write_checkpoint(tmp_path / "wrong.pt", config, wrong)
    with pytest.raises(CheckpointError, match=r"projections\.text\.weight.*\(3, 3\).*\(128, 128\)"):
        from_pretrained(tmp_path / "wrong.pt")


def test_dtype_and_unknown_format(tmp_path):
    path = _tiny_checkpoint(tmp_path)
    half = from_pretrained(path, modalities=["text"], dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointFormatError, match="no installed plugin recognises"):
        from_pretrained(foreign)


def test_presets_below_4b_train_from_scratch_and_4b_uses_the_official_init():
    from peace_core.presets import PRESETS

    schemes = {name: p["config"]["encoder"]["init"] for name, p in PRESETS.items()}
    assert schemes == {
        "tiny": "scratch",
        "small": "scratch",
        "base": "scratch",
        "large": "scratch",
        "one-peace-4b": "official",
    }
    official = create_model("tiny", modalities=["text"], init="official")
    scratch = create_model("tiny", modalities=["text"])
    assert official.projections["text"].weight.abs().max() <= 0.02
    assert scratch.projections["text"].weight.std() > 0.07  # 128 ** -0.5 = 0.088


def test_presets_hold_encoder_sizes_and_plugins_size_their_modalities():
    from peace_core.factory import resolve_config
    from peace_core.presets import PRESETS

    # Core names no modality and no option field of one.
    for preset in PRESETS.values():
        assert "modalities" not in preset["config"]
    # Built by name, a preset has every installed modality, each sized by its plugin ...
    tiny = resolve_config("tiny")
    assert set(tiny.modalities) == {"vision", "audio", "text"}
    assert tiny.modalities["vision"]["image_size"] == 64
    assert tiny.modalities["audio"]["sample_rate"] == 8000
    assert tiny.modalities["text"]["tokenizer"] == {"kind": "bytes"}
    # ... a preset a plugin does not size gets its defaults, and a config dict only its own.
    assert resolve_config("small").modalities["vision"] == {}
    raw = {**PRESETS["tiny"]["config"], "modalities": {"vision": {"image_size": 32}}}
    assert resolve_config(raw).modalities["vision"] == {"image_size": 32}


def test_branches_are_cached_and_rebuilt_when_a_module_is_replaced(model):
    branch = model.branch("vision", "text")
    assert model.branch("vision", "text") is branch
    assert model.branch("text", "vision") is not branch  # another order is another branch
    block = model.encoder.blocks[0]
    model.encoder.blocks[0] = copy.deepcopy(block)  # e.g. wrapped for sharding
    try:
        rebuilt = model.branch("vision", "text")
        assert rebuilt is not branch
        assert rebuilt.encoder.blocks[0].attn is model.encoder.blocks[0].attn
    finally:
        model.encoder.blocks[0] = block


def test_the_model_forward_builds_no_branch(model, monkeypatch):
    def refuse(*names):
        raise AssertionError(f"model.forward built a branch of {names}")

    pixels = torch.randn(2, 3, 64, 64)
    expected = model.branch("vision")({"vision": {"pixels": pixels}})["vision"].embedding
    monkeypatch.setattr(model, "branch", refuse)
    out = model({"vision": {"pixels": pixels}})["vision"].embedding
    torch.testing.assert_close(out, expected)


def test_a_joint_sequence_gives_the_same_states_in_either_order(model):
    batch = model.preprocess(text=["a red circle", "a blue square"])
    batch["vision"] = {"pixels": torch.randn(2, 3, 64, 64)}
    text_first = model(batch)
    vision_first = model({"vision": batch["vision"], "text": batch["text"]})
    # Relative positions are per modality, so only the order of the fused sequence differs; the
    # attention is order-free apart from them: both orders give the same states, up to rounding.
    torch.testing.assert_close(
        text_first["text"].embedding, vision_first["text"].embedding, atol=1e-5, rtol=1e-5
    )
