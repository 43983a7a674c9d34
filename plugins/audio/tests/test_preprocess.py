"""Audio preprocessing: official parity, odd inputs, decoders, errors, collate, examples."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from peace_audio.frames import frame_count
from peace_audio.options import AudioOptions
from peace_audio.preprocess import AudioInputError, AudioPreprocessor, decode_audio_bytes


@pytest.fixture
def preprocess() -> AudioPreprocessor:
    return AudioPreprocessor(AudioOptions())


def _tone(seconds: float, rate: int, *, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    time = np.arange(round(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * time) + 0.05 * rng.standard_normal(time.size)).astype(
        np.float32
    )


def _encode(wave: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


# --------------------------------------------------------------------------------- parity


def test_reproduces_the_official_preprocessing(parity_inputs, fixture_options):
    options = fixture_options()
    preprocess = AudioPreprocessor(options)
    samples = [preprocess((clip.numpy(), 16000)) for clip in parity_inputs["audio_raw"]]
    batch = preprocess.collate(samples)
    assert torch.equal(batch["lengths"], parity_inputs["audio_lengths"])
    torch.testing.assert_close(batch["waveform"], parity_inputs["audio"], atol=1e-6, rtol=0)
    # the adapter's frame counts from these lengths give the fixture's padding mask
    counts = frame_count(batch["lengths"], options.feature_layers)
    width = parity_inputs["audio_padding_mask"].shape[1] - 1
    padding = torch.cat(
        [torch.zeros(3, 1, dtype=torch.bool), torch.arange(width) >= counts[:, None]], 1
    )
    assert torch.equal(padding, parity_inputs["audio_padding_mask"])


# --------------------------------------------------------------------------------- odd inputs


def test_resamples_8_khz(preprocess):
    wave = _tone(1.5, 8000)
    out = preprocess((wave, 8000))["waveform"]
    assert out.shape == (24000,)
    expected = F.layer_norm(AF.resample(torch.from_numpy(wave), 8000, 16000), (24000,))
    torch.testing.assert_close(out, expected)
    assert abs(out.mean().item()) < 1e-5 and out.std(unbiased=False).item() == pytest.approx(
        1, abs=1e-4
    )


def test_44_1_khz_stereo_is_averaged_then_resampled(preprocess):
    left, right = _tone(1.2, 44100, freq=300), _tone(1.2, 44100, freq=500, seed=1)
    frames_last = np.stack([left, right], axis=1)  # soundfile layout [frames, channels]
    out = preprocess((frames_last, 44100))["waveform"]
    assert out.shape == (19200,)
    same = preprocess({"array": torch.from_numpy(frames_last.T.copy()), "sampling_rate": 44100})
    torch.testing.assert_close(same["waveform"], out)  # torchaudio layout [channels, frames]
    mono = torch.from_numpy((left + right) / 2)
    expected = F.layer_norm(AF.resample(mono, 44100, 16000), (19200,))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_short_clip_is_tiled_to_exactly_min_duration(preprocess):
    wave = _tone(0.2, 16000)  # 3200 samples
    out = preprocess((wave, 16000))
    assert out["waveform"].shape == (16000,) and int(out["lengths"]) == 16000
    normalised = F.layer_norm(torch.from_numpy(wave), (3200,))
    torch.testing.assert_close(out["waveform"], normalised.repeat(5))
    odd = preprocess((_tone(0.3, 16000), 16000))["waveform"]  # 4800 does not divide 16000
    assert odd.shape == (16000,)
    torch.testing.assert_close(odd[4800:9600], odd[:4800])
    torch.testing.assert_close(odd[14400:], odd[: 16000 - 14400])


def test_long_clip_is_normalised_whole_then_cropped(preprocess):
    rng = np.random.default_rng(3)
    wave = np.concatenate([_tone(15, 16000), 3 * rng.standard_normal(5 * 16000).astype(np.float32)])
    out = preprocess((wave, 16000))
    assert out["waveform"].shape == (240000,) and int(out["lengths"]) == 240000
    # official order: layer_norm over the whole 20 s clip, then keep the first 15 s
    expected = F.layer_norm(torch.from_numpy(wave), wave.shape)[:240000]
    torch.testing.assert_close(out["waveform"], expected)


def test_durations_follow_the_options():
    options = AudioOptions(sample_rate=8000, max_duration=2.0, min_duration=0.5)
    preprocess = AudioPreprocessor(options)
    assert preprocess((_tone(3.0, 8000), 8000))["waveform"].shape == (16000,)
    assert preprocess((_tone(0.1, 8000), 8000))["waveform"].shape == (4000,)
    assert preprocess((_tone(1.0, 16000), 16000))["waveform"].shape == (8000,)


def test_train_mode_is_the_same(preprocess):
    item = (_tone(1.3, 16000), 16000)
    torch.testing.assert_close(
        preprocess(item, train=True)["waveform"], preprocess(item)["waveform"]
    )


# --------------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    ("ext", "fmt", "subtype", "tolerance"),
    [
        ("wav", "WAV", "PCM_16", 1e-3),
        ("flac", "FLAC", "PCM_16", 1e-3),
        ("ogg", "OGG", "VORBIS", 0.3),
        ("mp3", "MP3", "MPEG_LAYER_III", 0.3),
    ],
)
def test_decoders_read_every_extension(preprocess, ext, fmt, subtype, tolerance):
    if fmt not in soundfile.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    wave = _tone(1.0, 16000)
    data = _encode(wave, 16000, fmt, subtype)
    decoded, rate = preprocess.decoders[ext](data)
    assert rate == 16000 and decoded.dtype == np.float32 and decoded.ndim == 1
    sample = preprocess(preprocess.decoders[ext](data))
    reference = preprocess((wave, 16000))["waveform"]
    assert sample["waveform"].shape[0] >= 16000
    # lossy codecs: compare by relative RMS error of the normalised waveforms
    error = (sample["waveform"][:16000] - reference).pow(2).mean().sqrt() / reference.std()
    assert error < tolerance
    torch.testing.assert_close(preprocess(data)["waveform"], sample["waveform"])  # raw bytes


def test_paths_file_objects_and_mappings(preprocess, tmp_path):
    wave = _tone(1.1, 22050)
    path = tmp_path / "clip.flac"
    soundfile.write(path, wave, 22050)
    from_path = preprocess(path)["waveform"]
    assert from_path.shape == (17600,)
    torch.testing.assert_close(preprocess(str(path))["waveform"], from_path)
    with open(path, "rb") as handle:
        torch.testing.assert_close(preprocess(handle)["waveform"], from_path)
    decoded, rate = soundfile.read(path, dtype="float32")
    for item in (
        {"array": decoded, "sampling_rate": rate},
        {"array": decoded, "sample_rate": rate},
    ):
        torch.testing.assert_close(preprocess(item)["waveform"], from_path)


# --------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ((np.array([0.1, np.nan, 0.2] * 1000, dtype=np.float32), 16000), "NaN or infinite"),
        ((torch.tensor([0.0, math.inf] * 1000), 16000), "NaN or infinite"),
        ((np.zeros(0, dtype=np.float32), 16000), "is empty"),
        ((np.zeros((0, 2), dtype=np.float32), 16000), "is empty"),
        (
            b"RIFF\x00\x00garbage that is no audio file",
            r"could not decode audio bytes \(35 bytes\)",
        ),
        ("/no/such/clip.wav", r"audio file '/no/such/clip.wav' does not exist"),
        (np.zeros(16000, dtype=np.float32), "needs its sample rate"),
        ((np.zeros(16000, dtype=np.float32), 0), "positive"),
        ((np.zeros(16000, dtype=np.float32), 1.5), "whole number"),
        ((np.zeros(16000, dtype=np.float32), "16k"), "sample rate"),
        ((np.zeros(16000, dtype=np.complex64), 16000), "real numbers"),
        ((np.zeros((4, 4), dtype=np.float32), 16000), "square"),
        ((np.zeros((2, 3, 400), dtype=np.float32), 16000), "1-D .* or 2-D"),
        (({"array": np.zeros(16000)}), "sampling_rate"),
        (([0.1] * 16000, 16000), "numpy array or torch tensor"),
        (object(), "unsupported audio item of type object"),
        (12, "unsupported audio item of type int"),
    ],
)
def test_bad_inputs_are_errors_naming_the_input(preprocess, item, message):
    with pytest.raises(AudioInputError, match=message):
        preprocess(item)


def test_corrupt_bytes_through_the_decoder():
    with pytest.raises(AudioInputError, match="could not decode"):
        decode_audio_bytes(b"\x00" * 100)


def test_audio_input_error_is_a_value_error():
    assert issubclass(AudioInputError, ValueError)


# --------------------------------------------------------------------------------- collate


def test_collate_zero_pads_at_the_end(preprocess):
    samples = [preprocess((_tone(s, 16000, seed=i), 16000)) for i, s in enumerate((1.0, 1.3, 0.4))]
    batch = preprocess.collate(samples)
    assert batch["waveform"].shape == (3, 20800) and batch["waveform"].dtype == torch.float32
    assert (
        batch["lengths"].tolist() == [16000, 20800, 16000] and batch["lengths"].dtype == torch.long
    )
    assert torch.count_nonzero(batch["waveform"][0, 16000:]) == 0
    torch.testing.assert_close(batch["waveform"][1], samples[1]["waveform"])


def test_collate_rejects_bad_samples(preprocess):
    with pytest.raises(ValueError, match="no samples"):
        preprocess.collate([])
    with pytest.raises(ValueError, match="sample 1 needs a non-empty 1-D 'waveform'"):
        preprocess.collate([{"waveform": torch.ones(5)}, {"image": torch.ones(5)}])
    with pytest.raises(ValueError, match="lengths=4"):
        preprocess.collate([{"waveform": torch.ones(5), "lengths": torch.tensor(4)}])


# --------------------------------------------------------------------------------- examples


def test_examples_are_varied_valid_and_deterministic(preprocess):
    items = preprocess.examples(6, seed=3)
    assert len(items) == 6
    assert {type(item) for item in items} == {tuple, dict, bytes}
    samples = [preprocess(item) for item in items]
    lengths = {int(sample["lengths"]) for sample in samples}
    assert len(lengths) > 1 and min(lengths) == 16000  # some tiled, some longer: padding happens
    again = [preprocess(item) for item in preprocess.examples(6, seed=3)]
    for first, second in zip(samples, again):
        torch.testing.assert_close(first["waveform"], second["waveform"])
    other = preprocess(preprocess.examples(1, seed=4)[0])["waveform"]
    assert not torch.equal(other[:16000], samples[0]["waveform"][:16000])
