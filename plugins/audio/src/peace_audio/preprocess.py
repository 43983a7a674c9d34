"""Audio preprocessing: decode, mono, resample, normalise, crop, tile; then collate (spec §1.2).

Accepted raw items (anything else is an error naming what was given):

* a path (``str`` or ``os.PathLike``) to an audio file, decoded with ``soundfile``;
* the encoded file itself as ``bytes``/``bytearray``/``memoryview``, or a binary file object;
* ``(array, sample_rate)``: a numpy array or torch tensor with its sample rate (what the
  webdataset decoders here return);
* a mapping ``{"array": ..., "sampling_rate": ...}`` (Hugging Face ``datasets`` audio) or
  ``{"array": ..., "sample_rate": ...}``.

Arrays are 1-D (mono) or 2-D with channels on the SHORTER axis (``[frames, channels]`` as
soundfile returns, or ``[channels, frames]`` as torchaudio does); channels are averaged.

The steps, in the official order (``audio_postprocess`` and the hub's ``process_audio``):
mono -> resample to ``sample_rate`` -> ``layer_norm`` over the WHOLE clip (zero mean, unit
variance, eps 1e-5) -> keep the first ``max_duration`` seconds -> clips shorter than
``min_duration`` are repeated and cut to exactly ``min_duration`` seconds. Normalising before
cropping matters only for clips longer than ``max_duration``; the official code does it that way.
``train=True`` changes nothing: the official pretraining also keeps the start of each clip.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from peace_audio.options import AudioOptions
from peace_registry.errors import PeaceError

#: File extensions this modality decodes (webdataset keys and ``file_extensions``).
AUDIO_EXTENSIONS: tuple[str, ...] = ("wav", "flac", "ogg", "mp3")

#: eps of the whole-clip normalisation (``F.layer_norm``'s default, as the official code uses).
NORMALISE_EPS = 1e-5


#: Base durations of ``examples``: short enough for CPU tests with the official 512-channel stack.
_EXAMPLE_SECONDS = (1.1, 0.6, 1.05, 0.8, 1.15, 0.5)


class AudioInputError(PeaceError, ValueError):
    """A raw audio item that cannot be turned into a waveform; the message names the item."""


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"audio file {os.fspath(item)!r}"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"audio bytes ({len(item)} bytes)"
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return f"audio array of shape {tuple(item.shape)}"
    return f"audio item of type {type(item).__name__}"


def _decode(source: Any, what: str) -> tuple[np.ndarray, int]:
    """Decode a path or file-like object with soundfile; errors say which input failed."""
    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=False)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        hint = ""
        if "MP3" not in soundfile.available_formats():
            hint = (
                f"; note: this libsndfile ({soundfile.__libsndfile_version__}) cannot read MP3 "
                "(needs libsndfile >= 1.1 built with MPEG support)"
            )
        raise AudioInputError(f"could not decode {what}: {err}{hint}") from err
    return data, int(rate)


def decode_audio_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an encoded audio file (wav, flac, ogg, mp3...) from its bytes: ``(array, rate)``."""
    return _decode(io.BytesIO(bytes(data)), _describe(data))


def _as_tensor(array: Any, what: str) -> torch.Tensor:
    if isinstance(array, np.ndarray):
        if array.dtype.kind not in "fiu":
            raise AudioInputError(f"{what}: samples must be real numbers, got dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif isinstance(array, torch.Tensor):
        if array.is_complex() or array.dtype == torch.bool:
            raise AudioInputError(f"{what}: samples must be real numbers, got dtype {array.dtype}")
        tensor = array.detach().cpu()
    else:
        raise AudioInputError(
            f"{what}: expected a numpy array or torch tensor of samples, got {type(array).__name__}"
        )
    return tensor.to(torch.float32)


def _to_mono(wave: torch.Tensor, what: str) -> torch.Tensor:
    if wave.ndim == 1:
        return wave
    if wave.ndim != 2:
        raise AudioInputError(
            f"{what}: expected 1-D (mono) or 2-D (multichannel) samples, "
            f"got shape {tuple(wave.shape)}"
        )
    rows, cols = wave.shape
    if rows == cols:
        raise AudioInputError(
            f"{what}: cannot tell channels from frames in a square {rows}x{cols} array; "
            "pass it as 1-D mono"
        )
    return wave.mean(dim=0 if rows < cols else 1)


def _sample_rate(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise AudioInputError(f"{what}: sample rate must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0 and float(value).is_integer()):
        raise AudioInputError(f"{what}: sample rate must be a positive whole number, got {value!r}")
    return int(value)


class AudioPreprocessor:
    """Raw audio -> ``{"waveform": [S] float32, "lengths": [] long}``; ``collate`` pads a batch."""

    def __init__(self, options: AudioOptions | None = None) -> None:
        self.options = options if options is not None else AudioOptions()
        self.decoders: dict[str, Callable[[bytes], Any]] = dict.fromkeys(
            AUDIO_EXTENSIONS, decode_audio_bytes
        )

    # ----------------------------------------------------------------------- raw -> samples

    def load(self, item: Any) -> tuple[torch.Tensor, int]:
        """Any accepted raw item -> (float32 samples, 1-D or 2-D, sample rate)."""
        what = _describe(item)
        if isinstance(item, (str, os.PathLike)):
            if not os.path.isfile(item):
                raise AudioInputError(f"{what} does not exist or is not a file")
            data, rate = _decode(os.fspath(item), what)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            data, rate = decode_audio_bytes(item)
        elif hasattr(item, "read"):
            data, rate = _decode(item, what)
        elif isinstance(item, tuple) and len(item) == 2:
            data, rate = item
        elif isinstance(item, Mapping) and "array" in item:
            rate = item.get("sampling_rate", item.get("sample_rate"))
            if rate is None:
                raise AudioInputError(
                    f"{what}: a mapping needs 'sampling_rate' (or 'sample_rate') beside 'array'"
                )
            data = item["array"]
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            raise AudioInputError(
                f"{what}: an array needs its sample rate; pass (array, sample_rate) or "
                "{'array': array, 'sampling_rate': rate}"
            )
        else:
            raise AudioInputError(
                f"unsupported {what}: expected a path, bytes, a binary file object, "
                "(array, sample_rate) or {'array': ..., 'sampling_rate': ...}"
            )
        return _as_tensor(data, what), _sample_rate(rate, what)

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        what = _describe(item)
        samples, rate = self.load(item)
        if samples.numel() == 0:
            raise AudioInputError(f"{what} is empty (no samples)")
        wave = _to_mono(samples, what)
        if not torch.isfinite(wave).all():
            raise AudioInputError(f"{what} contains NaN or infinite samples")
        if rate != self.options.sample_rate:
            wave = AF.resample(wave, rate, self.options.sample_rate)
            if wave.numel() == 0:
                raise AudioInputError(
                    f"{what} has too few samples to resample from {rate} Hz to "
                    f"{self.options.sample_rate} Hz"
                )
        wave = F.layer_norm(wave, wave.shape, eps=NORMALISE_EPS)
        wave = wave[: self.options.max_samples]
        shortest = self.options.min_samples
        if wave.numel() < shortest:
            wave = wave.repeat(math.ceil(shortest / wave.numel()))[:shortest]
        return {"waveform": wave.contiguous(), "lengths": torch.tensor(wave.numel())}

    # ----------------------------------------------------------------------- samples -> batch

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Zero-pad waveforms at the end to ``[B, S_max]``; ``lengths`` ``[B]`` long."""
        if not samples:
            raise ValueError("audio collate: got no samples")
        waves = []
        for position, sample in enumerate(samples):
            wave = sample.get("waveform") if isinstance(sample, Mapping) else None
            if not isinstance(wave, torch.Tensor) or wave.ndim != 1 or wave.numel() == 0:
                raise ValueError(
                    f"audio collate: sample {position} needs a non-empty 1-D 'waveform' tensor "
                    "(the output of the audio preprocessor)"
                )
            if "lengths" in sample and int(sample["lengths"]) != wave.numel():
                raise ValueError(
                    f"audio collate: sample {position} says lengths={int(sample['lengths'])} but "
                    f"its waveform has {wave.numel()} samples"
                )
            waves.append(wave)
        lengths = torch.tensor([wave.numel() for wave in waves], dtype=torch.long)
        batch = waves[0].new_zeros(len(waves), int(lengths.max()))
        for row, wave in enumerate(waves):
            batch[row, : wave.numel()] = wave
        return {"waveform": batch, "lengths": lengths}

    # ----------------------------------------------------------------------- examples

    def examples(self, count: int, seed: int = 0) -> list[Any]:
        """``count`` varied valid raw items: tones with noise at several rates and lengths, mono and
        stereo arrays, and encoded WAV bytes (so decoding and padding both get exercised)."""
        if count < 0:
            raise ValueError(f"examples: count must be >= 0, got {count}")
        rng = np.random.default_rng(seed)
        rates = (16000, 8000, 22050, 44100)
        items: list[Any] = []
        for index in range(count):
            rate = rates[index % len(rates)]
            # Some clips under min_duration (tiled), some over (padding), a little jitter.
            seconds = _EXAMPLE_SECONDS[index % len(_EXAMPLE_SECONDS)] * rng.uniform(0.97, 1.03)
            frames = max(int(seconds * rate), 1)
            time = np.arange(frames, dtype=np.float32) / rate
            tone = np.sin(2 * np.pi * float(rng.uniform(110, 880)) * time)
            wave = (0.5 * tone + 0.05 * rng.standard_normal(frames)).astype(np.float32)
            kind = index % 3
            if kind == 0:
                items.append((wave, rate))
            elif kind == 1:
                stereo = np.stack([wave, 0.5 * wave], axis=1)  # [frames, channels]
                items.append({"array": stereo, "sampling_rate": rate})
            else:
                buffer = io.BytesIO()
                soundfile.write(buffer, wave, rate, format="WAV", subtype="PCM_16")
                items.append(buffer.getvalue())
        return items
