"""A modality the core has never heard of joins the first-party ones: one plugin, no code change."""

from __future__ import annotations

import torch

from peace_core import create_model, from_pretrained, save_pretrained
from peace_registry.testing import ToyPlugin, temporary_plugins


def test_third_party_modality_in_a_three_way_joint_branch(tmp_path):
    with temporary_plugins({"toy-dist": ToyPlugin("imu")}, installed=True):
        torch.manual_seed(0)
        model = create_model("tiny", modalities=["vision", "text", "imu"]).eval()
        assert model.modalities == ("vision", "text", "imu")
        imu_items = model.preprocessor("imu").examples(2, seed=1)
        batch = model.preprocess(
            vision=model.preprocessor("vision").examples(2), text=["a", "b"], imu=imu_items
        )
        with torch.no_grad():
            joint = model.branch("vision", "text", "imu")(batch)
            alone = model.branch("imu")({"imu": batch["imu"]})
        assert set(joint) == {"vision", "text", "imu"}
        # In the fused sequence the IMU tokens attend to image and text tokens.
        assert not torch.allclose(joint["imu"].hidden, alone["imu"].hidden)
        # The branch holds the IMU adapter and FFNs and nothing of audio.
        names = [name for name, _ in model.branch("imu").named_parameters()]
        assert any("ffns.imu" in name for name in names)
        assert not any("vision" in name or "text" in name for name in names)

        path = save_pretrained(model, tmp_path / "with-imu.safetensors")
        reloaded = from_pretrained(path, modalities=["imu"])
        with torch.no_grad():
            again = reloaded.branch("imu")({"imu": batch["imu"]})
        assert torch.allclose(again["imu"].embedding, alone["imu"].embedding, atol=1e-6)
