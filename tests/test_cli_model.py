"""`peace models`, `peace convert` and `peace embed` from the command line (in-process)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
from PIL import Image

from peace_core import create_model, from_pretrained, save_pretrained
from peace_core.cli import main

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "one_peace_parity_a"


def test_models_json_lists_presets_with_exact_counts(capsys):
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    big = rows["one-peace-4b"]
    assert abs(big["parameters"] - 3.885e9) / 3.885e9 < 0.005
    assert abs(big["branch_parameters"]["vision"] - 1.517e9) / 1.517e9 < 0.005
    tiny = create_model("tiny", device="meta")
    assert rows["tiny"]["parameters"] == sum(p.numel() for p in tiny.parameters())


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="parity fixture not available")
def test_convert_official_writes_native_checkpoint_and_report(tmp_path, capsys):
    out = tmp_path / "one-peace.safetensors"
    code = main(["convert", str(FIXTURE / "checkpoint.pt"), str(out), "--modalities", "vision"])
    assert code == 0
    report = json.loads((tmp_path / "one-peace.safetensors.report.json").read_text())
    assert report["modalities"] == ["vision"]
    assert report["missing"] == []
    assert any("rp_bucket" in key or "version" in key for key in report["ignored"])
    assert any(key.startswith("encoder_wrapper.text_adapter") for key in report["mapped"])
    assert any(key.startswith("adapters.text") for key in report["dropped_modalities"])
    converted = from_pretrained(out)
    original = from_pretrained(FIXTURE / "checkpoint.pt", modalities=["vision"])
    pixels = torch.load(FIXTURE / "inputs.pt", weights_only=True)["image"]
    with torch.no_grad():
        a = converted.branch("vision")({"vision": {"pixels": pixels}})["vision"].embedding
        b = original.branch("vision")({"vision": {"pixels": pixels}})["vision"].embedding
    assert torch.equal(a, b)


def test_convert_reports_bad_input(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "out.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_pretrained(create_model("tiny"), path)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_embed_files_and_strings(tiny_checkpoint, tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(_png(0))
    sound = tmp_path / "b.flac"
    sf.write(sound, np.random.default_rng(0).normal(size=16000) * 0.1, 16000)
    out = tmp_path / "emb"
    args = ["embed", str(tiny_checkpoint), str(image), str(sound), "--text", "a red star"]
    assert main([*args, "--out", str(out)]) == 0
    model = from_pretrained(tiny_checkpoint)
    expected = model.encode(vision=[image], text=["a red star"])
    assert np.allclose(np.load(out / "vision.npy"), expected["vision"].numpy(), atol=1e-5)
    assert np.allclose(np.load(out / "text.npy"), expected["text"].numpy(), atol=1e-5)
    assert np.load(out / "audio.npy").shape == (1, 128)
    index = [json.loads(line) for line in (out / "text.index.jsonl").read_text().splitlines()]
    assert index == [{"row": 0, "source": "a red star"}]


def test_embed_shards_skips_bad_samples(tiny_checkpoint, tmp_path, capsys):
    shard = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as writer:
        for i in range(5):
            writer.write({"__key__": f"s{i}", "png": _png(i), "txt": f"caption {i}".encode()})
        writer.write({"__key__": "broken", "png": b"not a png", "txt": b"bad"})
    out = tmp_path / "emb"
    args = ["embed", str(tiny_checkpoint), "--shards", str(shard), "--modality", "vision", "text"]
    assert main([*args, "--out", str(out), "--batch-size", "2"]) == 0
    assert np.load(out / "vision.npy").shape == (5, 128)
    sources = (out / "vision.index.jsonl").read_text()
    assert "s4" in sources and "broken" not in sources
    assert "broken" in capsys.readouterr().out  # the skipped sample is reported


def test_embed_rejects_unknown_file_types(tiny_checkpoint, tmp_path, capsys):
    stray = tmp_path / "notes.xyz"
    stray.write_text("?")
    assert main(["embed", str(tiny_checkpoint), str(stray), "--out", str(tmp_path / "o")]) == 1
    assert "no modality of this model reads .xyz" in capsys.readouterr().err
