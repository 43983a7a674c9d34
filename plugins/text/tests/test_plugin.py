"""The entry module, registration through the registry, and the options model."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

import peace_text.plugin as text_plugin
from peace_registry import Registry, get_registry
from peace_registry.contract import BuildContext
from peace_text import TextAdapter, TextOptions, TextPreprocessor, WholeWordMasker


def test_entry_module_imports_no_heavy_libraries() -> None:
    code = (
        "import sys, peace_text.plugin, peace_text\n"
        "heavy = [m for m in ('torch', 'tokenizers', 'PIL', 'torchaudio') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert peace_text.plugin.PEACE_PLUGIN_API == '1.5'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_installed_entry_point_provides_text() -> None:
    registry = get_registry()
    assert "text" in registry.modalities()
    assert registry.plugin("text").name == "text"


def test_registers_every_component() -> None:
    registry = Registry.from_plugins({"text": text_plugin})
    spec = registry.modality("text")
    assert spec.input_keys == ("tokens", "word_start")
    assert set(spec.file_extensions) == {"txt", "json"}
    assert spec.options is TextOptions
    options = TextOptions(vocab_size=260, tokenizer={"kind": "bytes"}, bucket_size=8)
    ctx = BuildContext(
        modality="text",
        dim=32,
        heads=4,
        depth=3,
        ffn_dim=64,
        num_bias_tables=3,
        options=options,
        norm_eps=1e-6,
    )
    adapter = registry.adapter("text").build(ctx)
    assert isinstance(adapter, TextAdapter) and len(adapter.rel_pos_tables) == 3
    assert adapter.token_embed.num_embeddings == 260
    assert registry.ffn("text") is None  # the core's GeGLU FFN
    assert isinstance(registry.masker("text").build(ctx), WholeWordMasker)
    preprocessor = registry.preprocessor("text").build(options)
    assert isinstance(preprocessor, TextPreprocessor)
    with pytest.raises(TypeError, match="expected TextOptions"):
        registry.preprocessor("text").build(object())


def test_option_defaults_are_the_official_values() -> None:
    options = TextOptions()
    assert options.model_dump() == {
        "vocab_size": 50264,
        "bos_id": 0,
        "pad_id": 1,
        "eos_id": 2,
        "unk_id": 3,
        "max_positions": 514,
        "bucket_size": 256,
        "max_tokens": 70,
        "lowercase": True,
        "tokenizer": {
            "kind": "official",
            "bpe_dir": None,
            "serialized": None,
            "verify_sha256": True,
        },
        "mask_ratio": 0.15,
        "joint_mask_ratio": 0.4,
    }
    assert all(field.description for field in TextOptions.model_fields.values())


def test_options_refuse_what_cannot_work() -> None:
    with pytest.raises(ValidationError, match="max_token"):
        TextOptions(max_tokenz=5)
    with pytest.raises(ValidationError, match="'official', 'trained', 'bytes'"):
        TextOptions(tokenizer={"kind": "sentencepiece"})
    with pytest.raises(ValidationError, match="not both"):
        TextOptions(tokenizer={"kind": "official", "bpe_dir": "x", "serialized": "{}"})
    with pytest.raises(ValidationError, match="needs 72 positions"):
        TextOptions(max_positions=71)
    with pytest.raises(ValidationError, match="special ids"):
        TextOptions(pad_id=0)
    with pytest.raises(ValidationError, match="serialized"):
        TextOptions(vocab_size=300, tokenizer={"kind": "trained"})
    with pytest.raises(ValidationError, match="mask_ratio"):
        TextOptions(mask_ratio=1.5)
