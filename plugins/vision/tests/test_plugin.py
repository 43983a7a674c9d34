"""The entry module: cheap to import, registers every vision component through the hooks."""

from __future__ import annotations

import subprocess
import sys

import torch

import peace_vision
import peace_vision.plugin as plugin
from peace_registry import BuildContext, Registry
from peace_vision.adapter import VisionAdapter
from peace_vision.masking import VisionMasker
from peace_vision.options import VisionOptions
from peace_vision.preprocess import VisionPreprocessor


def test_entry_module_imports_no_heavy_packages() -> None:
    code = (
        "import sys, peace_vision, peace_vision.plugin; "
        "heavy = [m for m in ('torch', 'PIL', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy; print(peace_vision.plugin.PEACE_PLUGIN_API)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1.2"


def test_registers_every_component() -> None:
    registry = Registry.from_plugins({"vision": plugin}, strict=True)
    assert registry.modalities() == ["vision"]
    spec = registry.modality("vision")
    assert spec.input_keys == ("pixels",)
    assert spec.file_extensions == ("jpg", "jpeg", "png", "webp")
    assert spec.options is VisionOptions
    options = VisionOptions(image_size=64)
    ctx = BuildContext("vision", 32, 4, 3, 64, 3, options)
    adapter = registry.adapter("vision").build(ctx)
    assert isinstance(adapter, VisionAdapter) and len(adapter.rel_pos_tables) == 3
    assert registry.ffn("vision") is None  # the core's GeGLU FFN
    assert isinstance(registry.masker("vision").build(ctx), VisionMasker)
    preprocessor = registry.preprocessor("vision").build(options)
    assert isinstance(preprocessor, VisionPreprocessor)
    batch = preprocessor.collate([preprocessor(item) for item in preprocessor.examples(2)])
    out = adapter(batch)
    assert out.tokens.shape == (2, 17, 32)


def test_builds_in_the_requested_dtype() -> None:
    ctx = BuildContext("vision", 32, 4, 2, 64, 1, VisionOptions(image_size=64), dtype=torch.float64)
    adapter = plugin.build_adapter(ctx)
    assert {p.dtype for p in adapter.parameters()} == {torch.float64}
    out = adapter({"pixels": torch.zeros(1, 3, 64, 64)})
    assert out.tokens.dtype == torch.float64


def test_package_exposes_the_public_api_lazily() -> None:
    assert peace_vision.VisionAdapter is VisionAdapter
    assert peace_vision.VisionPreprocessor is VisionPreprocessor
    assert set(peace_vision.__all__) >= {"VisionOptions", "VisionMasker", "ImageInputError"}
