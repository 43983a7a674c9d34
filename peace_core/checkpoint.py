"""Reading and writing checkpoint files without ever running code stored in them.

* Native ``.safetensors``: tensors + the model config as JSON metadata.
* Native ``.pt``: ``{"peace_format": 1, "config": ..., "state_dict": ...}`` via ``torch.save``.
* Foreign ``torch.save`` files (official fairseq checkpoints) are read with ``weights_only=True``
  plus an explicit allow-list of harmless containers.
* Plain-pickle files (the official vision-only file is one: "Invalid magic number" for
  ``torch.load``) are read by an unpickler that only knows how to rebuild tensors and dicts.

Anything else a file asks to construct is refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import torch

from peace_registry.errors import PeaceError

NATIVE_FORMAT_VERSION = 1
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_SAFETENSORS_CONFIG_KEY = "peace_config"

#: Harmless types fairseq checkpoints may hold besides tensors and builtins.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


class CheckpointError(PeaceError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need arbitrary code to load; it is refused, nothing was run."""


def _load_storage_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Rebuilds tensors, dicts and builtins; refuses every other global."""

    _allowed: ClassVar[dict[tuple[str, str], Any]] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
        ("argparse", "Namespace"): argparse.Namespace,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load: the file asks to construct {module}.{name}, which is not a "
                "tensor or a plain container; only load files from sources you trust, and convert "
                "them to safetensors there"
            ) from None


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file into plain containers and CPU tensors, safely.

    A sharded training checkpoint (a directory, :mod:`peace_core.sharded_checkpoint`) is read
    consolidated: its model weights as ``state_dict`` and the decoder's as ``decoder``."""
    path = Path(path)
    if path.is_dir():
        from peace_core.sharded_checkpoint import is_sharded_checkpoint, read_consolidated

        if is_sharded_checkpoint(path):
            return read_consolidated(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if zipfile.is_zipfile(path):
        loaded = _read_torch_file(path, mmap=True)
    else:
        loaded = _read_plain_pickle(path)
        if loaded == _LEGACY_TORCH_MAGIC:  # torch.save's pre-zip format starts with this number
            loaded = _read_torch_file(path, mmap=False)
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"{str(path)!r} holds a {type(loaded).__name__}, expected a dict of tensors or a "
            "checkpoint dict"
        )
    return loaded


def _read_torch_file(path: Path, *, mmap: bool) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            # mmap keeps unused tensors (modalities not asked for) off the heap.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors and plain "
            f"containers ({_unsupported_global(err)}); nothing from it was run"
        ) from err
    except RuntimeError as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {_first_line(err)}") from err


def _read_plain_pickle(path: Path) -> Any:
    with path.open("rb") as handle:
        try:
            return _TensorOnlyUnpickler(handle).load()
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"{str(path)!r}: {err}") from None
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise CheckpointError(
                f"cannot read {str(path)!r}: not a torch checkpoint, safetensors file or pickle "
                f"({_first_line(err)})"
            ) from err


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    raw_config = metadata.get(_SAFETENSORS_CONFIG_KEY)
    config = json.loads(raw_config) if raw_config is not None else None
    return {"peace_format": NATIVE_FORMAT_VERSION, "config": config, "state_dict": tensors}


def is_native(checkpoint: dict[str, Any]) -> bool:
    return "peace_format" in checkpoint and "state_dict" in checkpoint


#: A file's SHA-256 sits beside it as ``<name>.sha256`` (written before the file is in place).
CHECKSUM_SUFFIX = ".sha256"


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def verify_checksum(path: str | os.PathLike[str]) -> str | None:
    """``None`` when ``path`` matches the SHA-256 written beside it (or it has none, as files
    from elsewhere); otherwise what is wrong."""
    recorded = checksum_path(path)
    if not recorded.is_file():
        return None
    fields = recorded.read_text(encoding="utf-8").split()  # "<sha256>  <name>"
    expected = fields[0] if fields else ""
    if not Path(path).is_file():
        return f"{os.fspath(path)!r} is missing"
    if file_sha256(path) != expected:
        return f"{os.fspath(path)!r} is corrupt: its SHA-256 differs from the one written with it"
    return None


def write_checkpoint(
    path: str | os.PathLike[str],
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
    *,
    checksum: bool = False,
) -> Path:
    """Write a native checkpoint atomically (a temp file renamed into place).

    ``.safetensors`` stores tensors and the config only; other suffixes use ``torch.save`` and may
    carry ``extra`` plain data (optimizer state, step, ...). ``checksum`` writes the file's
    SHA-256 beside it (:func:`verify_checksum`) before the file is renamed into place. A failed
    write (a full disk) leaves whatever was at ``path`` before untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            if extra:
                raise CheckpointError("safetensors checkpoints hold weights and config only")
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={_SAFETENSORS_CONFIG_KEY: json.dumps(config)})
        else:
            payload = {"peace_format": NATIVE_FORMAT_VERSION, "config": config}
            payload["state_dict"] = tensors
            payload.update(extra or {})
            torch.save(payload, tmp)
        fsync_path(tmp)  # on disk before it takes the name: a power cut cannot leave a torn file
        if checksum:
            _write_text_atomically(checksum_path(path), f"{file_sha256(tmp)}  {path.name}\n")
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    fsync_path(temporary)
    os.replace(temporary, path)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _unsupported_global(err: BaseException) -> str:
    """The line of torch's weights-only error that names what the file wanted to construct."""
    for line in str(err).splitlines():
        if "unsupported" in line.lower():
            return line.strip()
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
