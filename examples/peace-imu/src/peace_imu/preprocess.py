"""Raw inertial windows in, ``{"imu": [T,6], "lengths": []}`` samples out; collate and decoders.

A window is accelerometer + gyroscope samples with time along the first axis: ``[T, 6]``, columns
``ax, ay, az`` (m/s²) and ``gx, gy, gz`` (rad/s). Accepted raw items:

* a ``[T, 6]`` numpy array or torch tensor, sampled at ``options.source_rate``;
* a dict ``{"data": [T, 6] array or tensor, "rate": hz}``, or ``{"data": ..., "t": [T] seconds}``
  for timestamped (possibly irregular) samples; without either key, ``source_rate``;
* a path (``str`` or ``os.PathLike``) to a ``.npy`` file (a ``[T, 6]`` array at ``source_rate``)
  or a ``.csv`` file (below), or the raw bytes of either (``.npy`` is told by its magic number).

CSV: a header row naming the columns ``ax, ay, az, gx, gy, gz`` in any order (names are trimmed
and case-insensitive), optionally ``t`` (seconds); one row per sample. With ``t`` the samples are
resampled from their timestamps, which must increase strictly but may be irregular; without it
the rows are at ``source_rate``.

Every window is resampled to ``options.sample_rate`` by linear interpolation (``numpy.interp``,
per channel) onto a regular grid starting at the first sample and ending at or before the last;
there is no anti-aliasing filter, so low-pass data holding energy above ``sample_rate / 2``
before downsampling it. A window is then cut to ``max_seconds`` (whole patches): a random crop
when ``train=True``, the centre otherwise. Trailing samples that do not fill a whole patch of
``patch_size`` samples are dropped, and each channel is divided by its fixed
``options.channel_scales`` entry (accelerometer in g, gyroscope in π rad/s by default).

Bad input raises :class:`ImuInputError` (a ``ValueError``) naming the input and saying what was
expected; a missing file raises ``FileNotFoundError``, an unsupported type ``TypeError``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peace_imu.options import CHANNELS, ImuOptions

#: The optional CSV column of timestamps, in seconds.
TIME_COLUMN = "t"
#: The first bytes of every ``.npy`` file.
NPY_MAGIC = b"\x93NUMPY"
EXPECTED = "a [T, 6] window (time along the first axis; columns ax, ay, az, gx, gy, gz)"


class ImuInputError(ValueError):
    """A raw imu input that cannot become a window; the message names the input and says what
    was expected."""


@dataclass(frozen=True)
class Window:
    """A validated raw window before resampling: ``data`` ``[T,6]`` float64 and either its
    ``rate`` (Hz) or its ``times`` (``[T]`` seconds, strictly increasing)."""

    data: np.ndarray
    rate: float | None
    times: np.ndarray | None
    name: str


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def decode_npy(data: bytes, name: str = "imu .npy bytes") -> np.ndarray:
    """The array in an ``.npy`` file's bytes (no pickles: a dataset must not run code)."""
    try:
        return np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise ImuInputError(
            f"{name} ({len(data)} bytes) is not a readable .npy array: {err}"
        ) from err


def parse_csv(text: str, name: str = "imu CSV") -> dict[str, np.ndarray]:
    """CSV text -> ``{"data": [T,6]}`` in ``CHANNELS`` order, plus ``"t"`` ``[T]`` when the
    header has a ``t`` column (see the module doc for the format)."""
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[list[float]] = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # blank lines
        if header is None:
            header = _checked_header([cell.strip().lower() for cell in row], name)
            continue
        if len(row) != len(header):
            raise ImuInputError(
                f"{name}: line {reader.line_num} has {len(row)} fields, the header has "
                f"{len(header)} ({', '.join(header)})"
            )
        values = []
        for column, cell in zip(header, row):
            try:
                values.append(float(cell))
            except ValueError:
                raise ImuInputError(
                    f"{name}: line {reader.line_num}, column {column!r}: {cell.strip()!r} is not a "
                    "number"
                ) from None
        rows.append(values)
    if header is None:
        raise ImuInputError(
            f"{name} is empty: expected a header row with columns {', '.join(CHANNELS)} (and "
            f"optionally {TIME_COLUMN}), then one row per sample"
        )
    table = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    result = {"data": table[:, [header.index(column) for column in CHANNELS]]}
    if TIME_COLUMN in header:
        result["t"] = table[:, header.index(TIME_COLUMN)]
    return result


def _checked_header(columns: list[str], name: str) -> list[str]:
    expected = (
        f"expected a header with columns {', '.join(CHANNELS)} and optionally {TIME_COLUMN} "
        "(seconds)"
    )
    unknown = [column for column in columns if column not in (*CHANNELS, TIME_COLUMN)]
    if unknown:
        raise ImuInputError(f"{name}: unknown CSV column(s) {unknown}: {expected}")
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    if repeated:
        raise ImuInputError(f"{name}: CSV column(s) {repeated} appear more than once: {expected}")
    missing = [column for column in CHANNELS if column not in columns]
    if missing:
        raise ImuInputError(f"{name}: missing CSV column(s) {missing}: {expected}")
    return columns


def decode_csv(data: bytes, name: str = "imu .csv bytes") -> dict[str, np.ndarray]:
    """A ``.csv`` file's bytes (UTF-8) -> the dict :func:`parse_csv` returns."""
    try:
        text = bytes(data).decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as err:
        raise ImuInputError(
            f"{name} ({len(data)} bytes) is neither a .npy array nor UTF-8 CSV text: {err}"
        ) from err
    return parse_csv(text, name)


def decode_bytes(data: bytes, name: str = "imu bytes") -> np.ndarray | dict[str, np.ndarray]:
    """``.npy`` or CSV bytes, told apart by the ``.npy`` magic number."""
    data = bytes(data)
    return decode_npy(data, name) if data.startswith(NPY_MAGIC) else decode_csv(data, name)


# --------------------------------------------------------------------------------------------
# Validation and resampling
# --------------------------------------------------------------------------------------------


def checked_array(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as float64 ``[T,6]`` with T > 0 and finite values, else :class:`ImuInputError`."""
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ImuInputError(f"{name} has dtype {array.dtype}: expected real numbers, {EXPECTED}")
    if array.ndim != 2:
        shape = tuple(array.shape)
        raise ImuInputError(
            f"{name} has {array.ndim} dimension(s) (shape {shape}): expected {EXPECTED}"
        )
    steps, channels = array.shape
    if channels != len(CHANNELS):
        hint = (
            "; it looks transposed ([6, T]): pass its transpose (array.T) instead"
            if steps == len(CHANNELS)
            else ""
        )
        raise ImuInputError(
            f"{name} has {channels} channel(s) (shape {tuple(array.shape)}): expected {EXPECTED}"
            f"{hint}"
        )
    if steps == 0:
        raise ImuInputError(f"{name} is empty (0 samples, shape {tuple(array.shape)}): {EXPECTED}")
    data = array.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        row, column = (int(i) for i in np.argwhere(~finite)[0])
        raise ImuInputError(
            f"{name} holds {int((~finite).sum())} non-finite value(s) (NaN or inf), the first at "
            f"sample {row}, column {CHANNELS[column]!r}: expected finite numbers"
        )
    return data


def checked_times(times: Any, steps: int, name: str) -> np.ndarray:
    """Timestamps (seconds) as float64 ``[steps]``, finite and strictly increasing."""
    times = _as_numpy(times, f"{name} timestamps")
    if times.ndim != 1 or times.shape[0] != steps:
        raise ImuInputError(
            f"{name} has {steps} samples but timestamps of shape {tuple(times.shape)}: expected "
            f"[{steps}] seconds, one per sample"
        )
    times = times.astype(np.float64)
    if not np.isfinite(times).all():
        raise ImuInputError(f"{name} timestamps hold NaN or inf: expected finite seconds")
    steps_back = np.flatnonzero(np.diff(times) <= 0)
    if steps_back.size:
        at = int(steps_back[0]) + 1
        raise ImuInputError(
            f"{name} timestamps do not increase strictly: t[{at}] = {times[at]:g} s follows "
            f"t[{at - 1}] = {times[at - 1]:g} s; expected strictly increasing seconds (sort the "
            "samples and drop duplicates)"
        )
    return times


def resample(
    data: np.ndarray, target: float, *, rate: float | None = None, times: np.ndarray | None = None
) -> np.ndarray:
    """``data`` ``[T,C]`` sampled at ``rate`` Hz (or at ``times`` seconds) -> ``[T',C]`` at
    ``target`` Hz, by linear interpolation onto ``times[0] + k / target`` for every k that stays
    within the last sample. No anti-aliasing filter; equal rates return ``data`` unchanged."""
    if times is None:
        if rate is None:
            raise ValueError("resample needs a rate or timestamps")
        if rate == target:
            return data
        times = np.arange(data.shape[0]) / rate
    # The epsilon keeps a grid point that lands on the last sample up to float rounding.
    count = math.floor((times[-1] - times[0]) * target + 1e-6) + 1
    grid = times[0] + np.arange(count) / target
    grid = np.minimum(grid, times[-1])
    return np.stack([np.interp(grid, times, column) for column in data.T], axis=1)


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        return (tensor.double() if tensor.is_floating_point() else tensor).numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):  # inside a dict, a nested list is unambiguous
        try:
            return np.asarray(value)
        except ValueError as err:  # ragged rows
            raise ImuInputError(f"{name} is not a rectangular table of numbers: {err}") from err
    raise TypeError(
        f"{name} is a {type(value).__name__}: expected a numpy array, a torch tensor or a list"
    )


def _rate(value: Any, name: str) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise ImuInputError(f"{name} has rate {value!r}: expected a positive number of Hz")
    return rate


# --------------------------------------------------------------------------------------------
# The preprocessor
# --------------------------------------------------------------------------------------------


class ImuPreprocessor:
    """The imu modality's :class:`~peace_registry.contract.Preprocessor` (see the module doc)."""

    def __init__(self, options: ImuOptions) -> None:
        self.options = options
        self.decoders: dict[str, Callable[[bytes], Any]] = {"npy": decode_npy, "csv": decode_csv}

    def window(self, item: Any) -> Window:
        """Any accepted raw item -> a validated :class:`Window` (not yet resampled)."""
        if isinstance(item, str) and "\n" in item:
            raise ImuInputError(
                "imu input is a string holding line breaks, not a path: pass CSV text as bytes "
                "(text.encode())"
            )
        if isinstance(item, (str, os.PathLike)):
            return self._file(Path(item))
        if isinstance(item, (bytes, bytearray, memoryview)):
            return self._from_decoded(decode_bytes(item), "imu bytes")
        if isinstance(item, Mapping):
            return self._from_dict(item, "imu dict")
        if isinstance(item, torch.Tensor):
            return self._from_decoded(_as_numpy(item, "imu tensor"), "imu tensor")
        if isinstance(item, np.ndarray):
            return self._from_decoded(item, "imu array")
        raise TypeError(
            f"imu input of type {type(item).__name__}: expected {EXPECTED} as a numpy array or "
            'torch tensor, a dict {"data": ..., "rate": hz}, a .npy/.csv path, or .npy/CSV bytes'
        )

    def _file(self, path: Path) -> Window:
        name = f"imu file {str(path)!r}"
        suffix = path.suffix.lower()
        if suffix not in (".npy", ".csv"):
            raise ImuInputError(f"{name} has suffix {suffix!r}: expected a .npy or .csv file")
        data = path.read_bytes()  # a missing file raises FileNotFoundError naming it
        decoded = decode_npy(data, name) if suffix == ".npy" else decode_csv(data, name)
        return self._from_decoded(decoded, name)

    def _from_decoded(self, decoded: np.ndarray | Mapping[str, Any], name: str) -> Window:
        if isinstance(decoded, Mapping):
            return self._from_dict(decoded, name)
        return Window(checked_array(decoded, name), self.options.source_rate, None, name)

    def _from_dict(self, item: Mapping[str, Any], name: str) -> Window:
        unknown = sorted(str(key) for key in item if key not in ("data", "rate", "t"))
        if unknown or "data" not in item or ("rate" in item and "t" in item):
            raise ImuInputError(
                f"{name} has keys {sorted(map(str, item))}: expected 'data' ({EXPECTED}) and at "
                "most one of 'rate' (Hz) or 't' (seconds per sample)"
            )
        data = checked_array(_as_numpy(item["data"], f"{name} 'data'"), name)
        if "t" in item:
            return Window(data, None, checked_times(item["t"], data.shape[0], name), name)
        rate = _rate(item["rate"], name) if "rate" in item else self.options.source_rate
        return Window(data, rate, None, name)

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        options = self.options
        window = self.window(item)
        data = resample(window.data, options.sample_rate, rate=window.rate, times=window.times)
        patch = options.patch_size
        if data.shape[0] < patch:
            raise ImuInputError(
                f"{window.name} is {data.shape[0]} sample(s) at {options.sample_rate:g} Hz "
                f"({data.shape[0] / options.sample_rate:.3g} s): shorter than one patch of "
                f"{patch} samples ({patch / options.sample_rate:.3g} s)"
            )
        if data.shape[0] > options.max_samples:
            extra = data.shape[0] - options.max_samples
            start = random.randint(0, extra) if train else extra // 2
            data = data[start : start + options.max_samples]
        data = data[: data.shape[0] // patch * patch]  # whole patches only
        scaled = (data / np.asarray(options.channel_scales)).astype(np.float32)
        return {"imu": torch.from_numpy(scaled), "lengths": torch.tensor(scaled.shape[0])}

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Zero-pad every window to the longest and stack: ``imu`` ``[B,T,6]`` float32,
        ``lengths`` ``[B]`` long (samples holding data; the rest is padding)."""
        if not samples:
            raise ValueError("imu collate: no samples to collate")
        longest = max(sample["imu"].shape[0] for sample in samples)
        windows = [
            torch.nn.functional.pad(sample["imu"], (0, 0, 0, longest - sample["imu"].shape[0]))
            for sample in samples
        ]
        lengths = torch.stack([torch.as_tensor(sample["lengths"]).long() for sample in samples])
        return {"imu": torch.stack(windows), "lengths": lengths}

    def examples(self, count: int, seed: int = 0) -> list[Any]:
        """``count`` small valid raw items: varied lengths (some longer than ``max_seconds``),
        rates and kinds (array, ``{"data", "rate"}`` dict, CSV bytes with irregular timestamps,
        tensor, ``.npy`` bytes, CSV bytes without timestamps)."""
        rng = np.random.default_rng(seed)
        options = self.options
        shortest = 1.5 * options.patch_size / options.sample_rate
        longest = max(1.25 * options.max_seconds, 2 * shortest)
        items: list[Any] = []
        for number in range(count):
            kind = number % 6
            rate = (
                float(rng.choice([25.0, 100.0, 120.0])) if kind in (1, 2) else options.source_rate
            )
            seconds = float(rng.uniform(shortest, longest))
            # One more sample than the duration needs: the span is at least `seconds`.
            steps = math.ceil(seconds * rate) + 1
            times = np.arange(steps) / rate
            if kind == 2:  # irregular: every interval jitters by up to ±30 %
                times = np.concatenate([[0.0], np.cumsum(rng.uniform(0.7, 1.3, steps - 1) / rate)])
            data = _motion(rng, times)
            if kind == 0:
                items.append(data.astype(np.float32))
            elif kind == 1:
                items.append({"data": data, "rate": rate})
            elif kind == 2:
                items.append(_csv_bytes(data, times))
            elif kind == 3:
                items.append(torch.from_numpy(data.astype(np.float32)))
            elif kind == 4:
                buffer = io.BytesIO()
                np.save(buffer, data.astype(np.float32))
                items.append(buffer.getvalue())
            else:
                items.append(_csv_bytes(data, None))
        return items


def _motion(rng: np.random.Generator, times: np.ndarray) -> np.ndarray:
    """A plausible ``[T,6]`` window: gravity along a random direction plus a few sinusoids and
    noise on the accelerometer (m/s²), sinusoids and noise on the gyroscope (rad/s)."""
    gravity = rng.standard_normal(3)
    gravity *= 9.81 / np.linalg.norm(gravity)
    frequency = rng.uniform(0.5, 3.0, size=(1, 6))
    phase = rng.uniform(0, 2 * np.pi, size=(1, 6))
    amplitude = np.concatenate([rng.uniform(0.5, 3.0, 3), rng.uniform(0.2, 2.0, 3)])
    wave = amplitude * np.sin(2 * np.pi * frequency * times[:, None] + phase)
    noise = rng.standard_normal((times.shape[0], 6)) * np.array([0.05] * 3 + [0.01] * 3)
    return wave + noise + np.concatenate([gravity, np.zeros(3)])


def _csv_bytes(data: np.ndarray, times: np.ndarray | None) -> bytes:
    """A CSV file: with timestamps in the first column, or (without) the gyroscope first, so that
    the reader's column reordering is exercised."""
    if times is None:
        order = [3, 4, 5, 0, 1, 2]
        header = [CHANNELS[i] for i in order]
        table = data[:, order]
    else:
        header = [TIME_COLUMN, *CHANNELS]
        table = np.concatenate([times[:, None], data], axis=1)
    lines = [",".join(header)] + [",".join(f"{value:.6g}" for value in row) for row in table]
    return ("\n".join(lines) + "\n").encode()
