"""Raw signals in, ``{"signal": [C,T], "frames": []}`` samples out; collate and ``npy`` decoding.

Accepted raw items: a ``[C,T]`` numpy array or torch tensor (C = ``options.channels``), a path to
an ``.npy`` file, or the bytes of one. T is cut to ``max_frames * frame_size`` steps (a random
window when ``train=True``, the start otherwise) and zero-padded to whole frames; ``frames`` counts
the frames that hold data, so the adapter can mark the rest as padding.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from peace_template.options import SignalOptions


def decode_npy(data: bytes) -> np.ndarray:
    """The array in an ``.npy`` file's bytes (no pickles: a dataset must not run code)."""
    try:
        return np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise ValueError(f"not a readable .npy array ({len(data)} bytes): {err}") from err


class SignalPreprocessor:
    """The signal modality's :class:`~peace_registry.contract.Preprocessor`."""

    def __init__(self, options: SignalOptions) -> None:
        self.options = options
        self.decoders: dict[str, Callable[[bytes], Any]] = {"npy": decode_npy}

    def _to_array(self, item: Any) -> tuple[np.ndarray, str]:
        """The item as an array, and how to name it in errors."""
        if isinstance(item, (str, os.PathLike)):
            name = repr(os.fspath(item))
            try:
                return np.load(item, allow_pickle=False), name
            except (ValueError, EOFError) as err:  # a missing file raises FileNotFoundError
                raise ValueError(f"signal file {name} is not a readable .npy array: {err}") from err
        if isinstance(item, (bytes, bytearray, memoryview)):
            return decode_npy(item), "signal <bytes>"
        if isinstance(item, torch.Tensor):
            tensor = item.detach().cpu()
            if tensor.is_floating_point():
                tensor = tensor.float()  # numpy has no bfloat16
            return tensor.numpy(), "signal tensor"
        if isinstance(item, np.ndarray):
            return item, "signal array"
        raise TypeError(
            f"signal input of type {type(item).__name__}: expected a [C,T] array or tensor, "
            "an .npy path or .npy bytes"
        )

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        array, name = self._to_array(item)
        channels = self.options.channels
        if array.ndim != 2 or array.shape[0] != channels or array.shape[1] == 0:
            raise ValueError(f"{name} has shape {array.shape}, expected [{channels}, T] with T > 0")
        numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
        if not (numeric and np.isfinite(array).all()):
            raise ValueError(f"{name} must hold finite numbers, got dtype {array.dtype}")
        signal = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy we own
        frame, most = self.options.frame_size, self.options.max_frames * self.options.frame_size
        if signal.shape[1] > most:
            start = random.randint(0, signal.shape[1] - most) if train else 0
            signal = signal[:, start : start + most]
        if self.options.standardize:
            mean = signal.mean(dim=1, keepdim=True)
            signal = (signal - mean) / signal.std(dim=1, keepdim=True, correction=0).clamp(min=1e-6)
        frames = -(-signal.shape[1] // frame)  # a partly filled last frame counts
        signal = torch.nn.functional.pad(signal, (0, frames * frame - signal.shape[1]))
        return {"signal": signal, "frames": torch.tensor(frames)}

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Zero-pad every signal to the longest and stack: ``signal`` [B,C,T], ``frames`` [B]."""
        if not samples:
            raise ValueError("signal collate: no samples to collate")
        longest = max(sample["signal"].shape[1] for sample in samples)
        signals = [
            torch.nn.functional.pad(s["signal"], (0, longest - s["signal"].shape[1]))
            for s in samples
        ]
        frames = torch.stack([s["frames"] for s in samples])
        return {"signal": torch.stack(signals), "frames": frames}

    def examples(self, count: int, seed: int = 0) -> list[Any]:
        """``count`` small valid raw items of varied lengths and kinds (array, tensor, bytes)."""
        rng = np.random.default_rng(seed)
        items: list[Any] = []
        for number in range(count):
            steps = int(rng.integers(1, 6 * self.options.frame_size))
            array = rng.standard_normal((self.options.channels, steps)).astype(np.float32)
            if number % 3 == 1:
                items.append(torch.from_numpy(array))
            elif number % 3 == 2:
                buffer = io.BytesIO()
                np.save(buffer, array)
                items.append(buffer.getvalue())
            else:
                items.append(array)
        return items
