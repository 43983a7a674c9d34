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

Bounds, so that no input can make preprocessing allocate without limit (a ten-minute clip gives
the same ``max_duration`` seconds as any other; a file's header is never trusted for sizes):

* only the first ``max_input_duration`` seconds (600 by default) are read: files are decoded in
  blocks up to there (channels averaged block by block) and arrays cut there, before
  resampling; the "whole clip" normalised is those seconds;
* sample rates above :data:`MAX_SAMPLE_RATE` (384 kHz) are refused;
* :func:`resample` is torchaudio's (a Hann-windowed sinc) run over pieces of the clip, so its
  working memory stays a few MB; a rate pair whose polyphase kernel would be large (an odd rate
  such as 22254 Hz reduces to thousands of phases) gets the same filter evaluated per output
  sample instead.

NaN or infinite samples (also values beyond float32's range) are refused with an
:class:`AudioInputError`, never passed on to become a NaN embedding.
"""

from __future__ import annotations

import functools
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

from peace_audio.options import DEFAULT_MAX_INPUT_DURATION, AudioOptions
from peace_registry.errors import PeaceError

#: File extensions this modality decodes (webdataset keys and ``file_extensions``).
AUDIO_EXTENSIONS: tuple[str, ...] = ("wav", "flac", "ogg", "mp3")

#: eps of the whole-clip normalisation (``F.layer_norm``'s default, as the official code uses).
NORMALISE_EPS = 1e-5

#: Highest sample rate accepted (hi-res audio's highest): with ``max_input_duration`` it bounds
#: what one clip may decode to.
MAX_SAMPLE_RATE = 384_000

#: Values (frames x channels) decoded per read: files are read in blocks, never into one array
#: sized by the length their header claims (a few bytes of FLAC may claim 2^36 samples).
_READ_BLOCK_VALUES = 1 << 20

#: Most samples allocated on a header's word (128 MB): beyond, the array grows as data comes.
_PREALLOCATE_MAX = 1 << 25

#: torchaudio's resampling filter (its defaults): Hann-windowed sinc, 6 zero crossings a side,
#: cut-off at 99 % of the lower Nyquist frequency.
_LOWPASS_WIDTH = 6
_ROLLOFF = 0.99

#: Most coefficients of a polyphase kernel torchaudio may precompute (4 MB). 44.1 kHz -> 16 kHz
#: needs 76 k; 22254 -> 16000 Hz would need 89 M (8000 phases), 44101 -> 16000 Hz 706 M.
POLYPHASE_BUDGET = 1 << 20

#: Kernel values per chunk of the per-output-sample resampler.
_DIRECT_CHUNK_VALUES = 1 << 18

#: Input samples per piece of a polyphase resampling (see :func:`resample`).
_RESAMPLE_CHUNK = 1 << 18


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


_DECODE_ERRORS = (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError)


def _decode_error(what: str, err: Exception) -> AudioInputError:
    hint = ""
    if "MP3" not in soundfile.available_formats():
        hint = (
            f"; note: this libsndfile ({soundfile.__libsndfile_version__}) cannot read MP3 "
            "(needs libsndfile >= 1.1 built with MPEG support)"
        )
    return AudioInputError(f"could not decode {what}: {err}{hint}")


def _decode(source: Any, what: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """Decode a path or file-like object with soundfile: mono float32 samples and the rate.

    At most ``max_seconds`` are read, in blocks, channels averaged block by block: memory follows
    what is decoded (bounded), never the length or channel count the header claims."""
    try:
        audio = soundfile.SoundFile(source)
    except _DECODE_ERRORS as err:
        raise _decode_error(what, err) from err
    with audio:
        rate = _sample_rate(audio.samplerate, what)
        limit = math.ceil(max_seconds * rate)
        block = max(1, _READ_BLOCK_VALUES // max(audio.channels, 1))
        # The header's length is only a hint for the first allocation (capped); the array
        # doubles when the file holds more, up to the limit.
        samples = np.empty(min(max(audio.frames, 0), limit, _PREALLOCATE_MAX), dtype=np.float32)
        read = 0
        try:
            while read < limit:
                data = audio.read(min(block, limit - read), dtype="float32", always_2d=True)
                if len(data) == 0:
                    break
                mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
                if read + len(mono) > len(samples):
                    grown = np.empty(min(limit, max(read + len(mono), 2 * len(samples))), "f4")
                    grown[:read] = samples[:read]
                    samples = grown
                samples[read : read + len(mono)] = mono
                read += len(mono)
        except _DECODE_ERRORS as err:
            raise _decode_error(what, err) from err
    return samples[:read], rate


def decode_audio_bytes(
    data: bytes, max_seconds: float = DEFAULT_MAX_INPUT_DURATION
) -> tuple[np.ndarray, int]:
    """Decode an encoded audio file (wav, flac, ogg, mp3...) from its bytes: ``(samples, rate)``,
    the samples mono float32 (channels averaged), at most the first ``max_seconds``."""
    return _decode(io.BytesIO(bytes(data)), _describe(data), max_seconds)


def resample(
    wave: torch.Tensor,
    orig: int,
    new: int,
    *,
    polyphase_budget: int = POLYPHASE_BUDGET,
    chunk: int = _RESAMPLE_CHUNK,
) -> torch.Tensor:
    """Resample a 1-D float waveform from ``orig`` to ``new`` Hz with torchaudio's filter, in
    memory that does not grow with the rates and only linearly (about 2x) with the clip.

    ``torchaudio.functional.resample`` precomputes one kernel row per phase of the reduced ratio:
    ``new/g`` rows of about ``orig/g`` taps (``g`` their gcd), which is tiny for the usual rates
    but gigabytes for odd ones. Beyond ``polyphase_budget`` coefficients the same windowed sinc
    is evaluated at each output sample's own taps instead. Either way the clip is processed in
    pieces of about ``chunk`` input samples, each with the neighbours its filter reads, so that
    the convolution's unfolded windows (14 floats per input sample at 2:1) stay a few MB: the
    result is the whole clip's, up to float rounding."""
    if orig == new:
        return wave
    gcd = math.gcd(orig, new)
    orig_r, new_r = orig // gcd, new // gcd
    width = math.ceil(_LOWPASS_WIDTH * orig_r / (min(orig_r, new_r) * _ROLLOFF))
    if new_r * (2 * width + orig_r) > polyphase_budget:
        return _resample_per_sample(wave, orig_r, new_r, width)
    length = wave.numel()
    step = orig_r * max(1, chunk // orig_r)  # whole blocks of orig_r: output indices stay exact
    if length <= step:
        return AF.resample(wave, orig, new)
    # Output j reads inputs (j // new_r) * orig_r - width .. + orig_r + width: a margin of whole
    # blocks covering that gives every piece's outputs exactly as the whole clip has them.
    margin = orig_r * (math.ceil((width + orig_r) / orig_r) + 1)
    target = -(-new_r * length // orig_r)
    pieces = []
    for start in range(0, length, step):
        stop = min(start + step, length)
        low, high = max(0, start - margin), min(length, stop + margin)
        out = AF.resample(wave[low:high], orig, new)
        first = (start - low) * new_r // orig_r
        end = stop * new_r // orig_r if stop < length else target
        pieces.append(out[first : first + end - start * new_r // orig_r])
    return torch.cat(pieces)


def _resample_per_sample(wave: torch.Tensor, orig: int, new: int, width: int) -> torch.Tensor:
    """torchaudio's sinc filter (``orig``/``new`` reduced, ``width`` its half-width in input
    samples) at each output sample: output ``j`` sits at input position ``j*orig/new`` and sums
    the inputs within ``width`` of it, weighted ``sinc(t) * cos(pi t / 12)^2`` with
    ``t = base * (i - position) / orig`` clamped to +-6. Offsets are exact integers."""
    base = min(orig, new) * _ROLLOFF
    length = wave.numel()
    target = -(-new * length // orig)
    offsets = torch.arange(-width, width + 2)
    padded = F.pad(wave.to(torch.float64), (width + 1, width + 2))
    out = torch.empty(target, dtype=torch.float64)
    chunk = max(1, _DIRECT_CHUNK_VALUES // offsets.numel())
    for start in range(0, target, chunk):
        j = torch.arange(start, min(start + chunk, target), dtype=torch.int64)
        inputs = (j * orig // new)[:, None] + offsets  # [C, taps] input indices
        t = (inputs * new - (j * orig)[:, None]).to(torch.float64) * (base / (orig * new))
        t = t.clamp(-_LOWPASS_WIDTH, _LOWPASS_WIDTH)
        window = torch.cos(t * (math.pi / _LOWPASS_WIDTH / 2)) ** 2
        t = t * math.pi
        sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
        kernel = sinc * window * (base / orig)
        out[start : start + len(j)] = (padded[inputs + width + 1] * kernel).sum(dim=1)
    return out.to(wave.dtype)


def _as_tensor(array: Any, what: str) -> torch.Tensor:
    if isinstance(array, np.ndarray):
        if array.dtype.kind not in "fiu":
            raise AudioInputError(f"{what}: samples must be real numbers, got dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif isinstance(array, torch.Tensor):
        if array.is_complex() or array.dtype == torch.bool:
            raise AudioInputError(f"{what}: samples must be real numbers, got dtype {array.dtype}")
        if array.layout != torch.strided or array.is_meta:
            where = "the meta device" if array.is_meta else f"the {array.layout} layout"
            raise AudioInputError(f"{what}: a tensor on {where} holds no readable samples")
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
    if value > MAX_SAMPLE_RATE:
        raise AudioInputError(
            f"{what}: sample rate {int(value)} Hz is above the highest accepted, "
            f"{MAX_SAMPLE_RATE} Hz; resample it first"
        )
    return int(value)


def _all_finite(wave: torch.Tensor) -> bool:
    """``torch.isfinite(wave).all()`` a piece at a time: on a whole 10-minute 48 kHz clip
    isfinite's temporaries take 6x the clip's memory."""
    return all(bool(torch.isfinite(piece).all()) for piece in wave.split(_READ_BLOCK_VALUES))


class AudioPreprocessor:
    """Raw audio -> ``{"waveform": [S] float32, "lengths": [] long}``; ``collate`` pads a batch."""

    def __init__(self, options: AudioOptions | None = None) -> None:
        self.options = options if options is not None else AudioOptions()
        decode = functools.partial(decode_audio_bytes, max_seconds=self.options.max_input_duration)
        self.decoders: dict[str, Callable[[bytes], Any]] = dict.fromkeys(AUDIO_EXTENSIONS, decode)

    # ----------------------------------------------------------------------- raw -> samples

    def load(self, item: Any) -> tuple[torch.Tensor, int]:
        """Any accepted raw item -> (float32 samples, 1-D or 2-D, sample rate). A file is read
        only up to ``max_input_duration`` seconds (mono); arrays are returned whole."""
        what = _describe(item)
        longest = self.options.max_input_duration
        if isinstance(item, (str, os.PathLike)):
            if not os.path.isfile(item):
                raise AudioInputError(f"{what} does not exist or is not a file")
            data, rate = _decode(os.fspath(item), what, longest)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            data, rate = decode_audio_bytes(item, longest)
        elif hasattr(item, "read"):
            data, rate = _decode(item, what, longest)
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
        """One raw clip -> ``{"waveform", "lengths"}`` (see the module doc for the steps and the
        bounds). Empty clips, and NaN or infinite samples (also finite ones beyond float32's
        range), are an :class:`AudioInputError` naming the input: a model must never see them."""
        what = _describe(item)
        samples, rate = self.load(item)
        if samples.numel() == 0:
            raise AudioInputError(f"{what} is empty (no samples)")
        # Only the first max_input_duration seconds count (a file was read only that far).
        wave = _to_mono(samples, what)[: math.ceil(self.options.max_input_duration * rate)]
        if not _all_finite(wave):
            raise AudioInputError(
                f"{what} contains NaN or infinite samples (or samples beyond float32's range)"
            )
        if rate != self.options.sample_rate:
            wave = resample(wave, rate, self.options.sample_rate)
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
