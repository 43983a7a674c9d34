"""The entry module: cheap import, registrations, factories and the options model."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

import peace_audio
import peace_audio.plugin as plugin
from peace_audio.adapter import AudioAdapter
from peace_audio.masking import AudioBlockMasker
from peace_audio.options import AudioOptions
from peace_audio.preprocess import AudioPreprocessor
from peace_registry.contract import BuildContext, ModalitySpec
from peace_registry.registry import Registry


def test_entry_module_imports_no_heavy_library():
    code = (
        "import sys, peace_audio.plugin\n"
        "heavy = [m for m in ('torch', 'torchaudio', 'soundfile', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert peace_audio.plugin.PEACE_PLUGIN_API == '1.4'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_package_exposes_its_api_lazily():
    assert peace_audio.AudioAdapter is AudioAdapter
    assert peace_audio.AudioPreprocessor is AudioPreprocessor
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = peace_audio.nope


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.from_plugins({"audio": plugin})


def _context(options: AudioOptions, **overrides) -> BuildContext:
    values = dict(
        modality="audio", dim=32, heads=4, depth=3, ffn_dim=48, num_bias_tables=1, options=options
    )
    values.update(overrides)
    return BuildContext(**values)


def test_registers_the_audio_modality(registry):
    spec = registry.modality("audio")
    assert isinstance(spec, ModalitySpec)
    assert spec.input_keys == ("waveform", "lengths")
    assert spec.file_extensions == ("wav", "flac", "ogg", "mp3")
    assert spec.options is AudioOptions
    assert registry.modalities() == ["audio"]


def test_factories_build_every_component(registry):
    options = AudioOptions(feature_layers=[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2)
    adapter = registry.adapter("audio").build(_context(options, num_bias_tables=3, norm_eps=1e-6))
    assert isinstance(adapter, AudioAdapter) and len(adapter.rel_pos_tables) == 3
    assert adapter.feature_norm.eps == 1e-6 and adapter.rel_pos_tables[0].embedding_dim == 4
    assert registry.ffn("audio") is None  # the core's GeGLU FFN
    assert isinstance(registry.masker("audio").build(_context(options)), AudioBlockMasker)
    preprocessor = registry.preprocessor("audio").build(options)
    assert isinstance(preprocessor, AudioPreprocessor)
    assert sorted(preprocessor.decoders) == ["flac", "mp3", "ogg", "wav"]


def test_factories_reject_foreign_options(registry):
    with pytest.raises(TypeError, match="expected AudioOptions"):
        registry.preprocessor("audio").build(object())


def test_option_defaults_are_the_official_values():
    options = AudioOptions()
    assert options.sample_rate == 16000
    assert options.feature_layers == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    assert (options.conv_pos_depth, options.conv_pos_width, options.conv_pos_groups) == (5, 95, 16)
    assert options.conv_pos_kernel == 19
    assert options.bucket_size == 512
    assert (options.max_duration, options.min_duration) == (15.0, 1.0)
    assert (options.mask_ratio, options.joint_mask_ratio) == (0.55, 0.45)
    assert (options.mask_span, options.mask_prob_adjust) == (5, 0.1)
    assert all(field.description for field in AudioOptions.model_fields.values())


def test_options_validation_errors():
    with pytest.raises(ValidationError, match="extra"):
        AudioOptions(mask_ration=0.5)
    with pytest.raises(ValidationError, match=r"feature_layers\[1\]"):
        AudioOptions(feature_layers=[(8, 10, 5), (8, 0, 2)])
    with pytest.raises(ValidationError, match="at least one"):
        AudioOptions(feature_layers=[])
    with pytest.raises(ValidationError, match="min_duration"):
        AudioOptions(min_duration=2.0, max_duration=1.5)
    with pytest.raises(ValidationError, match="mask_ratio"):
        AudioOptions(mask_ratio=1.2)
    # lists from TOML/JSON configs become tuples
    assert AudioOptions(feature_layers=[[8, 10, 5], [8, 3, 2]] + [[8, 2, 2]] * 5).feature_layers[
        0
    ] == (
        8,
        10,
        5,
    )
