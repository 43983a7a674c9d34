"""Named component variants: a third party adds a block-wise image masker (``vision:block``) to the
vision modality it does not own, and a config selects it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import pytest
import torch

from peace_core import create_model
from peace_core.cli.plugins import check_plugin
from peace_core.pretrain import ObjectiveConfig, PretrainObjective
from peace_core.pretrain.config import ModelSection
from peace_registry import (
    ComponentConflictError,
    MaskerSpec,
    PluginLoadError,
    Registry,
    UnknownComponentError,
    hookimpl,
)
from peace_registry.conformance import ModalityConformance
from peace_registry.testing import temporary_plugins


class BlockMasker:
    """Hides square blocks of 2x2 patches (BEiT-style) until ``mask_ratio`` of the patches are
    hidden; the joint view hides blocks at ``joint_mask_ratio``. Reads only the padding mask:
    a patch grid of side ``sqrt(N - 1)`` after CLS."""

    def __init__(self, mask_ratio: float, joint_mask_ratio: float, block: int = 2) -> None:
        self.mask_ratio, self.joint_mask_ratio, self.block = mask_ratio, joint_mask_ratio, block

    def units(self, batch: Mapping[str, torch.Tensor], padding_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(padding_mask.shape[1]).expand_as(padding_mask)
        return (positions - 1).masked_fill(padding_mask, -1)

    def __call__(
        self,
        batch: Mapping[str, torch.Tensor],
        padding_mask: torch.Tensor,
        *,
        generator: torch.Generator,
        joint: bool = False,
        single_view_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows, length = padding_mask.shape
        side = math.isqrt(length - 1)
        ratio = self.joint_mask_ratio if joint else self.mask_ratio
        hidden = torch.zeros(rows, length, dtype=torch.bool)
        for row in range(rows):
            patches = int((~padding_mask[row, 1:]).sum())
            target = round(ratio * patches)
            order: list[int] = []  # patches in the order blocks cover them
            while len(order) < target:
                top, left = torch.randint(0, side - self.block + 1, (2,), generator=generator)
                for r in range(int(top), int(top) + self.block):
                    for c in range(int(left), int(left) + self.block):
                        if r * side + c not in order:
                            order.append(r * side + c)
            hidden[row, [1 + p for p in order[:target]]] = True
        return hidden & ~padding_mask


class BlockMaskerPlugin:
    """A third-party plugin adding a masker variant to a modality someone else registers."""

    PEACE_PLUGIN_API = "1.2"

    @hookimpl
    def peace_register_maskers(self, register):
        def build(ctx):
            return BlockMasker(ctx.options.mask_ratio, ctx.options.joint_mask_ratio)

        register(MaskerSpec("vision", build, variant="block"))


def _tiny_config(**variants):
    return {
        "name": "variants",
        "encoder": {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64},
        "modalities": {
            "vision": {"image_size": 64},
            "text": {"tokenizer": {"kind": "bytes"}, "vocab_size": 260},
        },
        "variants": variants,
    }


@pytest.fixture
def registry():
    with temporary_plugins({"blocks": BlockMaskerPlugin()}, installed=True) as registry:
        yield registry


def test_a_config_selects_the_third_party_masker_and_pretraining_uses_it(registry):
    torch.manual_seed(0)
    default = create_model(_tiny_config())
    assert type(default.masker("vision")).__name__ == "VisionMasker"
    model = create_model(_tiny_config(vision={"masker": "block"}))
    masker = model.masker("vision")
    assert isinstance(masker, BlockMasker)
    assert model.masker("vision") is masker  # built once
    assert registry.variants("masker", "vision") == ["block"]

    pixels = torch.randn(3, 3, 64, 64)
    batch = {"vision": {"pixels": pixels}, "text": model.preprocess(text=["a", "b", "c"])["text"]}
    objective = PretrainObjective(model, ObjectiveConfig())
    assert objective.maskers["vision"] is masker
    padding = model({"vision": batch["vision"]})["vision"].padding_mask
    hidden = objective.make_mask(
        "vision", batch["vision"], padding, torch.Generator().manual_seed(1)
    )
    # 64-px images: a 4x4 grid; 75 % of 16 patches, hidden in 2x2 blocks.
    assert hidden[:, 1:].sum(dim=1).tolist() == [12, 12, 12]
    grid = hidden[0, 1:].view(4, 4)
    blocks = grid.unfold(0, 2, 1).unfold(1, 2, 1).reshape(3, 3, 4).all(dim=-1)
    assert blocks.any(), "no full 2x2 block hidden"
    loss, _ = objective(batch, torch.Generator().manual_seed(2))
    assert torch.isfinite(loss)


def test_pretrain_config_picks_variants_by_name(registry):
    from peace_core.pretrain.build import build_model

    section = ModelSection(config=_tiny_config(), variants={"vision": {"masker": "block"}})
    model = build_model(section, registry=registry)
    assert model.config.variants == {"vision": {"masker": "block"}}
    assert isinstance(model.masker("vision"), BlockMasker)


def test_an_unknown_variant_is_named_with_the_ones_there_are(registry):
    with pytest.raises(UnknownComponentError, match=r"vision:blok.*vision:block"):
        create_model(_tiny_config(vision={"masker": "blok"}))
    with pytest.raises(ValueError, match=r"variants name modalities \['audio'\]"):
        create_model(_tiny_config(audio={"masker": "block"}))


def test_two_plugins_registering_one_variant_conflict():
    with (
        temporary_plugins(
            {"blocks": BlockMaskerPlugin(), "blocks2": BlockMaskerPlugin()},
            installed=True,
            strict=False,
        ) as registry,
        pytest.raises(ComponentConflictError, match="vision:block"),
    ):
        registry.masker("vision", "block")


def test_a_variant_name_must_be_a_plain_name():
    class BadVariant:
        PEACE_PLUGIN_API = "1.2"

        @hookimpl
        def peace_register_maskers(self, register):
            register(MaskerSpec("vision", lambda ctx: None, variant="Block-1"))

    with pytest.raises(PluginLoadError, match="invalid masker variant name 'Block-1'"):
        Registry.discover(strict=True, extra_plugins={"bad": BadVariant()})


def test_peace_plugins_check_runs_the_conformance_suite_on_the_variant(registry, capsys):
    assert check_plugin(registry, registry.plugin("blocks"))
    out = capsys.readouterr().out
    assert "OK   variant vision:block:" in out and "checks passed" in out


class TestBlockMaskerConformance(ModalityConformance):
    """A variant passes the same conformance suite as the modality's default."""

    modality = "vision"
    variants: ClassVar[dict[str, str]] = {"masker": "block"}

    def conformance_registry(self) -> Registry:
        return Registry.discover(strict=True, extra_plugins={"blocks": BlockMaskerPlugin()})
