"""Long inputs: a 10-minute clip, a 4000-token text, a 4096-px image.

Through preprocessor -> model embedding on the ``tiny`` model, each is cut or resized to its
plugin's documented limit (the output shapes are asserted to equal it), and the same limits are
checked for the official options on the preprocessor output alone. A collated batch over an
adapter's limit is refused before the adapter computes anything, and no step allocates more than a
small multiple of what the input already occupies.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from process_memory import peak_rss_growth

from peace_core import create_model
from peace_core.model import PeaceModel
from peace_registry.errors import PeaceError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
MIB = 2**20
TEN_MINUTES = 600.0


@pytest.fixture(scope="module")
def model() -> PeaceModel:
    torch.manual_seed(0)
    return create_model("tiny").eval()


def _tone(seconds: float, rate: int) -> np.ndarray:
    time_axis = np.arange(round(seconds * rate), dtype=np.float32) / rate
    rng = np.random.default_rng(0)
    noise = 0.05 * rng.standard_normal(time_axis.size, dtype=np.float32)
    return (0.4 * np.sin(2 * np.pi * 440.0 * time_axis) + noise).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def test_a_ten_minute_clip_is_cropped_to_max_duration_and_embedded(model: PeaceModel) -> None:
    pre = model.preprocessor("audio")
    options = pre.options
    assert options.max_input_duration == TEN_MINUTES  # the default: a 10-minute clip is read whole
    limit = round(options.max_duration * options.sample_rate)  # tiny: 5 s at 8 kHz
    assert limit == options.max_samples == 40_000
    for rate in (options.sample_rate, 16_000):  # the tiny rate, and the official rate resampled
        clip = _tone(TEN_MINUTES, rate)
        sample = pre((clip, rate))
        assert sample["waveform"].shape == (limit,) and int(sample["lengths"]) == limit
        assert torch.isfinite(sample["waveform"]).all()
    embedding = model.encode(audio=[(clip, 16_000)])["audio"]
    assert embedding.shape == (1, model.config.encoder.dim)
    assert torch.isfinite(embedding).all()


def test_the_official_options_keep_fifteen_seconds_of_a_ten_minute_clip() -> None:
    from peace_audio.options import AudioOptions
    from peace_audio.preprocess import AudioPreprocessor

    options = AudioOptions()
    assert (options.sample_rate, options.max_duration) == (16_000, 15.0)
    sample = AudioPreprocessor(options)((_tone(TEN_MINUTES, 16_000), 16_000))
    assert sample["waveform"].shape == (options.max_samples,) == (240_000,)


def test_a_ten_minute_file_decodes_with_bounded_memory(model: PeaceModel) -> None:
    pre = model.preprocessor("audio")
    buffer = io.BytesIO()
    soundfile.write(buffer, _tone(TEN_MINUTES, 16_000), 16_000, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()  # 19 MB of PCM
    sample, growth = peak_rss_growth(lambda: pre(data))
    assert sample["waveform"].shape == (pre.options.max_samples,)
    # Decoded mono float32 is 38 MB; resampled, normalised and cut, a few copies more at most.
    assert growth < 200 * MIB, (
        f"decoding a 10-minute file raised the peak by {growth / MIB:.0f} MiB"
    )


def test_files_are_read_in_blocks_into_a_growing_mono_array(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peace_audio import preprocess

    left, right = _tone(3.0, 8000), 0.5 * _tone(3.0, 8000)[::-1]
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([left, right], 1), 8000, format="WAV", subtype="FLOAT")
    whole, rate = preprocess.decode_audio_bytes(buffer.getvalue())
    assert rate == 8000 and whole.shape == (24_000,)
    np.testing.assert_allclose(whole, (left + right) / 2, rtol=0, atol=1e-7)  # channels averaged
    # A first allocation far smaller than the file (a header may under-state its length) and
    # many small reads: the array grows to the same samples.
    monkeypatch.setattr(preprocess, "_PREALLOCATE_MAX", 100)
    monkeypatch.setattr(preprocess, "_READ_BLOCK_VALUES", 999)
    grown, _ = preprocess.decode_audio_bytes(buffer.getvalue())
    np.testing.assert_array_equal(grown, whole)
    cut, _ = preprocess.decode_audio_bytes(buffer.getvalue(), max_seconds=1.5)
    np.testing.assert_array_equal(cut, whole[:12_000])


def test_only_max_input_duration_seconds_are_read_and_normalised(model: PeaceModel) -> None:
    from peace_audio.options import AudioOptions
    from peace_audio.preprocess import AudioPreprocessor

    rate = 8000
    tiny = model.preprocessor("audio").options.model_dump()
    options = AudioOptions(**{**tiny, "max_input_duration": 20.0})
    pre = AudioPreprocessor(options)
    quiet, loud = _tone(20.0, rate), 50 * _tone(TEN_MINUTES - 20.0, rate)
    clip = np.concatenate([quiet, loud])
    expected = torch.nn.functional.layer_norm(torch.from_numpy(quiet), quiet.shape)
    buffer = io.BytesIO()
    soundfile.write(buffer, clip, rate, format="WAV", subtype="FLOAT")
    for item in ((clip, rate), buffer.getvalue()):
        waveform = pre(item)["waveform"]
        # Normalised over the first 20 s only: the loud rest was never read.
        torch.testing.assert_close(waveform, expected[: options.max_samples])
    with pytest.raises(ValueError, match=r"max_input_duration .* must be at least max_duration"):
        AudioOptions(max_input_duration=10.0)


@pytest.mark.parametrize("official", [False, True], ids=["tiny", "official-extractor"])
def test_a_too_long_collated_waveform_is_refused_before_the_extractor_runs(
    model: PeaceModel, official: bool
) -> None:
    adapter = model.adapters["audio"]
    if official:  # the 512-channel extractor would allocate [1, 1.9 M, 512] floats per layer
        config = {"encoder": model.config.encoder.model_dump(), "modalities": {"audio": {}}}
        adapter = create_model(config).adapters["audio"]
    rate = adapter.options.sample_rate
    waveform = torch.zeros(1, int(TEN_MINUTES * rate))
    batch = {"waveform": waveform, "lengths": torch.tensor([waveform.shape[1]])}
    started = time.perf_counter()
    with torch.no_grad(), pytest.raises(PeaceError) as caught:
        adapter(batch)
    assert time.perf_counter() - started < 1.0
    message = str(caught.value)
    assert f"audio of {waveform.shape[1]} samples (600.00 s at {rate} Hz)" in message
    assert "over the relative-position limit of 1024" in message and "lower max_duration" in message


def test_the_token_limit_check_costs_no_memory(model: PeaceModel) -> None:
    adapter = model.adapters["audio"]
    waveform = torch.zeros(1, int(TEN_MINUTES * 8000))
    batch = {"waveform": waveform, "lengths": torch.tensor([waveform.shape[1]])}

    def refused() -> str:
        try:
            with torch.no_grad():
                adapter(batch)
        except PeaceError as exc:
            return str(exc)
        raise AssertionError("a 10-minute waveform was not refused")

    message, growth = peak_rss_growth(refused)
    assert "relative-position limit" in message
    # Running the extractor first (as before) took hundreds of MB for the tiny 32-channel layers.
    assert growth < 16 * MIB, f"refusing raised the peak by {growth / MIB:.0f} MiB"


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

#: 4000 words of varied text: far more than 4000 tokens for every tokenizer here.
LONG_TEXT = " ".join(
    ["a dog runs on the beach", "Café crème", "日本語のテキスト", "numbers 3.14159"][i % 4]
    for i in range(1000)
)


def test_a_4000_token_text_is_truncated_to_max_tokens_and_embedded(model: PeaceModel) -> None:
    pre = model.preprocessor("text")
    assert len(LONG_TEXT.encode("utf-8")) > 4000  # bytes are the tiny preset's tokens
    sample = pre(LONG_TEXT)
    limit = pre.options.max_tokens + 1  # the first max_tokens tokens, then EOS
    assert sample["tokens"].shape == sample["word_start"].shape == (limit,) == (97,)
    assert int(sample["tokens"][-1]) == pre.options.eos_id
    embedding = model.encode(text=[LONG_TEXT])["text"]
    assert embedding.shape == (1, model.config.encoder.dim) and torch.isfinite(embedding).all()


def test_the_official_tokenizer_keeps_70_of_4000_tokens() -> None:
    from peace_text.options import TextOptions
    from peace_text.preprocess import TextPreprocessor

    bpe = FIXTURES / "gpt2_bpe"
    if not bpe.is_dir():
        pytest.skip(f"the official BPE files are not at {bpe}")
    pre = TextPreprocessor(TextOptions(tokenizer={"kind": "official", "bpe_dir": str(bpe)}))
    assert len(pre.tokenizer.bpe_ids([LONG_TEXT])[0]) > 4000
    sample = pre(LONG_TEXT)
    assert sample["tokens"].shape == (pre.options.max_tokens + 1,) == (71,)


def test_a_too_long_collated_text_is_refused_before_embedding(model: PeaceModel) -> None:
    tokens = torch.full((1, 4000), 10, dtype=torch.long)
    batch = {"tokens": tokens, "word_start": torch.zeros(1, 4000, dtype=torch.bool)}
    with pytest.raises(PeaceError, match=r"text of 4000 tokens plus CLS needs 4001 positions"):
        model.adapters["text"](batch)


# --------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------


def _big_image(side: int = 4096) -> Image.Image:
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1)], axis=2)
    rgb = np.concatenate([rgb, rgb[:, :, :1]], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


def test_a_4096_px_image_is_resized_to_image_size_and_embedded(model: PeaceModel) -> None:
    pre = model.preprocessor("vision")
    image = _big_image()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    side = pre.options.image_size  # tiny: 64
    for item in (image, np.asarray(image), buffer.getvalue()):
        for train in (False, True):
            assert pre(item, train=train)["pixels"].shape == (3, side, side) == (3, 64, 64)
    embedding = model.encode(vision=[buffer.getvalue()])["vision"]
    assert embedding.shape == (1, model.config.encoder.dim) and torch.isfinite(embedding).all()


def test_the_official_options_resize_a_4096_px_image_to_256() -> None:
    from peace_vision.options import VisionOptions
    from peace_vision.preprocess import VisionPreprocessor

    pre = VisionPreprocessor(VisionOptions())
    assert pre(_big_image())["pixels"].shape == (3, 256, 256)


def test_a_4096_px_collated_batch_is_refused_before_the_stem_runs(model: PeaceModel) -> None:
    pixels = torch.empty(1, 3, 4096, 4096)  # pages never touched: no memory until computed on
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"256x256 patch grid.* at most 64x64 pixels"):
        model.adapters["vision"]({"pixels": pixels})
    assert time.perf_counter() - started < 1.0


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header (with a valid CRC) claims ``width x height`` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_an_image_header_claiming_10_gigapixels_is_refused_before_decoding(
    model: PeaceModel,
) -> None:
    data = _png_claiming(100_000, 100_000)
    started = time.perf_counter()
    with pytest.raises(PeaceError, match=r"could not decode image .*exceeds limit.*decompression"):
        model.preprocessor("vision")(data)
    assert time.perf_counter() - started < 1.0
