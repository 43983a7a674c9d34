"""Shared helpers of the audio plugin tests: parity fixture access and tiny adapters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from peace_audio.adapter import AudioAdapter
from peace_audio.options import AudioOptions

FIXTURE_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "fixtures"
PARITY_DIR = FIXTURE_DIR / "one_peace_parity_a"

#: The parity fixture's audio sizes (its config.json): 32-channel extractor, dim 64, 4 heads.
FIXTURE_FEATURE_LAYERS = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2
FIXTURE_DIM, FIXTURE_HEADS, FIXTURE_BUCKET = 64, 4, 32
TINY_DIM, TINY_HEADS = 16, 2

#: Official adapter keys (relative to ``encoder_wrapper.audio_adapter.``) -> ours.
_OFFICIAL_TO_OURS = [
    (r"embed_audios\.0\.conv_layers\.(\d+)\.0\.weight", r"feature_extractor.layers.\1.conv.weight"),
    (
        r"embed_audios\.0\.conv_layers\.(\d+)\.2\.1\.(weight|bias)",
        r"feature_extractor.layers.\1.norm.\2",
    ),
    (r"embed_audios\.2\.(weight|bias)", r"feature_norm.\1"),
    (r"embed_audios\.3\.(weight|bias)", r"feature_proj.\1"),
    (r"cls_embedding", "cls_token"),
    (r"cls_pos_embed", "cls_pos"),
    (r"rel_pos_table_list\.(\d+)\.weight", r"rel_pos_tables.\1.weight"),
]


def _load(name: str) -> dict:
    path = PARITY_DIR / name
    if not path.is_file():
        pytest.skip(f"parity fixture {path} not present")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def parity_inputs() -> dict:
    return _load("inputs.pt")


@pytest.fixture(scope="session")
def parity_expected() -> dict:
    return _load("expected.pt")


def official_audio_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official audio-adapter weights under our parameter names (mask_embedding dropped)."""
    prefix = "encoder_wrapper.audio_adapter."
    ours: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        if not key.startswith(prefix) or key.endswith("mask_embedding"):
            continue
        key = key[len(prefix) :]
        position = re.fullmatch(r"embed_positions\.(\d+)\.0\.(weight|bias)", key)
        if position:  # official index 0 is a transpose, so conv layer i is embed_positions.{i+1}
            ours[f"conv_pos.layers.{int(position[1]) - 1}.conv.{position[2]}"] = value
            continue
        for pattern, target in _OFFICIAL_TO_OURS:
            if re.fullmatch(pattern, key):
                ours[re.sub(pattern, target, key)] = value
                break
        else:
            raise AssertionError(f"unmapped official audio key {key}")
    return ours


def _fixture_options(**overrides) -> AudioOptions:
    return AudioOptions(
        feature_layers=FIXTURE_FEATURE_LAYERS,
        bucket_size=FIXTURE_BUCKET,
        conv_pos_sees_padding=True,  # the official behaviour
        **overrides,
    )


@pytest.fixture(scope="session")
def official_adapter() -> AudioAdapter:
    """An adapter of the fixture's sizes holding the fixture's official weights."""
    state = _load("checkpoint.pt")["model"]
    adapter = AudioAdapter(FIXTURE_DIM, FIXTURE_HEADS, _fixture_options())
    adapter.load_state_dict(official_audio_state(state), strict=True)
    return adapter.eval()


def _tiny_options(**overrides) -> AudioOptions:
    """Official kernels/strides with 8 channels, small conv positions: fast on a CPU."""
    values = {
        "feature_layers": [(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] * 2,
        "conv_pos_depth": 2,
        "conv_pos_width": 10,
        "conv_pos_groups": 4,
        "bucket_size": 16,
    }
    values.update(overrides)
    return AudioOptions(**values)


def _tiny_adapter(seed: int = 0, **overrides) -> AudioAdapter:
    torch.manual_seed(seed)
    adapter = AudioAdapter(TINY_DIM, TINY_HEADS, _tiny_options(**overrides)).eval()
    with torch.no_grad():  # non-zero tables so relative-position lookups are checkable
        for table in adapter.rel_pos_tables:
            table.weight.normal_()
    return adapter


@pytest.fixture
def tiny_options():
    """``tiny_options(**overrides)`` -> fast AudioOptions (official kernels and strides)."""
    return _tiny_options


@pytest.fixture
def tiny_adapter():
    """``tiny_adapter(seed=0, **option_overrides)`` -> a seeded dim-16 adapter in eval mode."""
    return _tiny_adapter


@pytest.fixture
def fixture_options():
    """``fixture_options(**overrides)`` -> AudioOptions of the parity fixture's sizes."""
    return _fixture_options
