"""Behaviour of the signal modality beyond the conformance suite."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from peace_core import create_model, from_pretrained, save_pretrained
from peace_registry import BuildContext, get_registry

from peace_template.adapter import SignalAdapter
from peace_template.masking import SignalMasker
from peace_template.options import SignalOptions
from peace_template.preprocess import SignalPreprocessor

OPTIONS = SignalOptions(channels=2, frame_size=4, max_frames=8)


def test_entry_module_is_cheap_and_registered_through_the_entry_point() -> None:
    code = "import sys, peace_template.plugin; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [record] = [r for r in get_registry().plugins() if r.entry == "peace_template.plugin"]
    assert record.status == "ok" and record.dist == "peace-template"
    assert get_registry().modality("signal").options is SignalOptions


def test_padding_is_the_frames_past_each_length_and_keep_gathers_positions() -> None:
    pre = SignalPreprocessor(OPTIONS)
    batch = pre.collate([pre(np.ones((2, 9))), pre(np.ones((2, 3)))])  # 3 frames and 1 frame
    assert batch["signal"].shape == (2, 2, 12) and batch["frames"].tolist() == [3, 1]
    adapter = SignalAdapter(BuildContext("signal", 16, 4, 2, 32, 1, OPTIONS)).eval()
    out = adapter(batch)
    assert out.tokens.shape == (2, 4, 16)
    assert out.padding_mask.tolist() == [[False] * 4, [False, False, True, True]]
    keep = torch.tensor([[0, 2], [0, -1]])
    kept = adapter(batch, keep=keep)
    assert torch.equal(kept.tokens[0], out.tokens[0, [0, 2]])
    assert kept.padding_mask.tolist() == [[False, False], [False, True]]
    assert torch.equal(kept.rel_pos.index[0], out.rel_pos.index[[0, 2]][:, [0, 2]])


def test_masker_hides_whole_frames_at_the_ratio() -> None:
    padding = torch.tensor([[False] * 9, [False] * 5 + [True] * 4])
    masker = SignalMasker(OPTIONS)  # mask_ratio 0.5
    mask = masker({}, padding, generator=torch.Generator().manual_seed(0))
    assert mask.sum(dim=1).tolist() == [4, 2]  # round(0.5 * 8), round(0.5 * 4) (half to even)
    assert not (mask[:, 0] | (mask & padding).any(dim=1)).any()


@pytest.mark.parametrize(
    ("item", "error", "words"),
    [
        (np.zeros((3, 8)), ValueError, "expected [2, T]"),
        (np.array([[np.nan], [0.0]]), ValueError, "finite"),
        (b"not an npy file", ValueError, "not a readable .npy"),
        ("missing.npy", FileNotFoundError, "missing.npy"),
        ([1.0, 2.0], TypeError, "list"),
    ],
)
def test_bad_input_raises_an_error_naming_it(item: object, error: type, words: str) -> None:
    with pytest.raises(error, match=re.escape(words)):
        SignalPreprocessor(OPTIONS)(item)


def test_npy_files_decode_to_what_arrays_give(tmp_path) -> None:
    array = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", array)
    pre = SignalPreprocessor(OPTIONS)
    from_bytes = pre(pre.decoders["npy"]((tmp_path / "x.npy").read_bytes()))
    torch.testing.assert_close(from_bytes, pre(array))
    torch.testing.assert_close(pre(str(tmp_path / "x.npy")), pre(array))


def test_a_model_embeds_signals_and_reloads_from_its_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", modalities=["signal"])  # the preset's options for this modality
    items = model.preprocessor("signal").examples(3, seed=1)
    embeddings = model.encode(signal=items)["signal"]
    assert embeddings.shape == (3, model.config.encoder.dim) and torch.isfinite(embeddings).all()
    reloaded = from_pretrained(save_pretrained(model, tmp_path / "signal.safetensors"))
    torch.testing.assert_close(reloaded.encode(signal=items)["signal"], embeddings)
