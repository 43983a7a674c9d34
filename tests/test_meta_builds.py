"""Every preset builds on the meta device, with every installed modality, holding no memory.

Both ways a user asks for it: ``with torch.device("meta"): create_model(preset)`` and
``create_model(preset, device="meta")``. The official-size ``one-peace-4b`` (3.9 B parameters, 15.5
GB of fp32 weights when real) must build in seconds and leave the resident set where it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from process_memory import peak_rss_growth

from peace_core import create_model, list_modalities, list_models
from peace_core.model import PeaceModel

PRESETS = list_models()
MIB = 2**20


def in_meta_context(preset: str) -> PeaceModel:
    with torch.device("meta"):
        return create_model(preset)


def on_meta(preset: str) -> PeaceModel:
    return create_model(preset, device="meta")


def real_tensors(model: PeaceModel) -> list[str]:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, tensor in tensors if not tensor.is_meta]


def test_the_presets_are_the_known_ones() -> None:
    assert {"tiny", "small", "base", "large", "one-peace-4b"} <= set(PRESETS)


@pytest.mark.parametrize("build", [in_meta_context, on_meta], ids=["context", "device-arg"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_on_meta_with_every_modality(
    preset: str, build: Callable[[str], PeaceModel]
) -> None:
    model = build(preset)
    assert set(model.modalities) == set(list_modalities()) >= {"vision", "audio", "text"}
    assert not real_tensors(model), f"{preset}: real tensors {real_tensors(model)[:5]}"
    assert sum(p.numel() for p in model.parameters()) > 0
    for name in model.modalities:  # every modality's own modules are there, on meta too
        assert any(p.is_meta for p in model.adapters[name].parameters())
        assert model.projections[name].weight.is_meta
    assert torch.empty(1).device.type == "cpu"  # the context did not leak


@pytest.mark.parametrize("build", [in_meta_context, on_meta], ids=["context", "device-arg"])
def test_the_official_size_model_builds_in_seconds_without_memory(
    build: Callable[[str], PeaceModel], record_property: Callable[[str, Any], None]
) -> None:
    started = time.perf_counter()
    model, growth = peak_rss_growth(lambda: build("one-peace-4b"))
    seconds = time.perf_counter() - started
    record_property("one_peace_4b_meta_build_seconds", round(seconds, 3))
    record_property("one_peace_4b_meta_build_rss_growth_mib", round(growth / MIB, 1))
    parameters = sum(p.numel() for p in model.parameters())
    assert abs(parameters - 3.885e9) / 3.885e9 < 0.005  # the real size, none of it allocated
    assert not real_tensors(model)
    assert seconds < 30.0, f"building one-peace-4b on meta took {seconds:.1f} s"
    # fp32 weights would be 15.5 GB; what grows is module objects and bookkeeping.
    assert growth < 256 * MIB, f"building one-peace-4b on meta grew the peak by {growth / MIB} MiB"
