"""A modality the core has never heard of joins the first-party ones: one plugin, no code change."""

from __future__ import annotations

import torch

from peace_core import create_model, from_pretrained, save_pretrained
from peace_registry.testing import ToyPlugin, temporary_plugins


def test_third_party_modality_in_a_three_way_joint_branch(tmp_path):
    with temporary_plugins({"toy-dist": ToyPlugin("lidar")}, installed=True):
        torch.manual_seed(0)
        model = create_model("tiny", modalities=["vision", "text", "lidar"]).eval()
        assert model.modalities == ("vision", "text", "lidar")
        lidar_items = model.preprocessor("lidar").examples(2, seed=1)
        batch = model.preprocess(
            vision=model.preprocessor("vision").examples(2), text=["a", "b"], lidar=lidar_items
        )
        with torch.no_grad():
            joint = model.branch("vision", "text", "lidar")(batch)
            alone = model.branch("lidar")({"lidar": batch["lidar"]})
        assert set(joint) == {"vision", "text", "lidar"}
        # In the fused sequence the lidar tokens attend to image and text tokens.
        assert not torch.allclose(joint["lidar"].hidden, alone["lidar"].hidden)
        # The branch holds the lidar adapter and FFNs and nothing of audio.
        names = [name for name, _ in model.branch("lidar").named_parameters()]
        assert any("ffns.lidar" in name for name in names)
        assert not any("vision" in name or "text" in name for name in names)

        path = save_pretrained(model, tmp_path / "with-lidar.safetensors")
        reloaded = from_pretrained(path, modalities=["lidar"])
        with torch.no_grad():
            again = reloaded.branch("lidar")({"lidar": batch["lidar"]})
        assert torch.allclose(again["lidar"].embedding, alone["lidar"].embedding, atol=1e-6)
