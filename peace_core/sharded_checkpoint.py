"""Sharded checkpoints: a directory written by every rank through ``torch.distributed.checkpoint``.

Layout of ``step_00001000/``::

    .metadata          DCP's index of every tensor's shards (where each piece lies)
    __0_0.distcp ...   each rank's own shards (tensors only)
    trainer.pt         rank 0's plain state: configs, step, per-rank states (``weights_only``)
    checksums.json     the SHA-256 of each file above

Only tensors go through DCP: everything else lives in ``trainer.pt``, which loads with
``weights_only=True``. DCP's index is a pickle; it is read by an unpickler that knows DCP's
metadata classes and nothing else, and DCP's loader is never asked to unpickle a stored object,
so reading an untrusted sharded checkpoint runs no code from it (as for single files,
:mod:`peace_core.checkpoint`).

A directory is written as ``step_00001000.partial`` and renamed when every rank has finished, so
a crash mid-write never leaves something that looks complete. It can be read back resharded onto
any number of ranks (:func:`load_sharded`), or consolidated into plain full tensors without any
process group (:func:`read_sharded_tensors`), which is how ``from_pretrained``, ``peace convert``
and ``model.init_from`` accept it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pathlib
import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem

from peace_core.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    file_sha256,
    fsync_path,
)

#: The plain part of a sharded checkpoint; its presence marks the directory as one.
TRAINER_FILE = "trainer.pt"
#: DCP's index file.
INDEX_FILE = ".metadata"
#: The SHA-256 of every file of the directory, written last.
CHECKSUMS_FILE = "checksums.json"
PARTIAL_SUFFIX = ".partial"


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    return path.is_dir() and (path / TRAINER_FILE).is_file() and (path / INDEX_FILE).is_file()


# ------------------------------------------------------------------------------------- reading


class _IndexUnpickler(pickle.Unpickler):
    """Rebuilds DCP's index (its metadata dataclasses, sizes, dtypes); refuses everything else."""

    _dcp_classes: ClassVar[set[str]] = {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    }
    _other: ClassVar[dict[tuple[str, str], Any]] = {
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # name lookup
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        # The index records where it was saved.
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == dcp_metadata.__name__ and name in self._dcp_classes:
            return getattr(dcp_metadata, name)
        if module == _StorageInfo.__module__ and name == _StorageInfo.__name__:
            return _StorageInfo
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), _TORCH_ENUMS)
        ):
            return getattr(torch, name)
        if (module, name) in self._other:
            return self._other[(module, name)]
        raise UnsafeCheckpointError(
            f"refusing to read this sharded checkpoint's index: it asks to construct "
            f"{module}.{name}, which is not part of a checkpoint index; nothing from it was run"
        )


_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = Path(self.path) / INDEX_FILE
        try:
            with path.open("rb") as handle:
                metadata = _IndexUnpickler(handle).load()
        except UnsafeCheckpointError:
            raise
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as err:
            raise CheckpointError(f"cannot read the index of {str(self.path)!r}: {err}") from err
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointError(f"{str(path)!r} is not a checkpoint index")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner, minus unpickling stored objects: sharded checkpoints hold tensors only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise UnsafeCheckpointError(
            f"refusing to load {read_item.dest_index.fqn!r}: a sharded checkpoint holds tensors "
            "only, and this entry is a pickled object"
        )


def read_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The plain part (``trainer.pt``) of the sharded checkpoint at ``path``."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            f"{str(path)!r} is not a sharded checkpoint (expected {TRAINER_FILE} and {INDEX_FILE})"
        )
    from peace_core.checkpoint import read_checkpoint

    return read_checkpoint(path / TRAINER_FILE)


def tensor_index(path: str | os.PathLike[str]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor the sharded checkpoint holds: ``{flat name: (full size, dtype)}``."""
    metadata = _SafeReader(os.fspath(path)).read_metadata()
    index = {}
    for name, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, dcp_metadata.TensorStorageMetadata):
            index[name] = (entry.size, entry.properties.dtype)
    return index


def load_sharded(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Fill ``state`` (nested dicts of tensors or DTensors, the shapes this run uses) in place
    from the checkpoint at ``path``, resharding as needed. Every rank of a process group must
    call it; without a process group it reads everything in this process."""
    with _reading(path):
        dcp.load(state, storage_reader=_SafeReader(os.fspath(path)), planner=_TensorsOnlyPlanner())


def read_sharded_tensors(path: str | os.PathLike[str], prefix: str) -> dict[str, torch.Tensor]:
    """The full tensors under ``prefix`` (e.g. ``"objective.model."``), consolidated in this
    process without a process group, with the prefix removed from their names."""
    wanted = {
        name: torch.empty(size, dtype=dtype)
        for name, (size, dtype) in tensor_index(path).items()
        if name.startswith(prefix)
    }
    if wanted:
        with _reading(path):
            dcp.load(
                wanted,
                storage_reader=_SafeReader(os.fspath(path)),
                planner=_TensorsOnlyPlanner(),
                no_dist=True,
            )
    return {name[len(prefix) :]: tensor for name, tensor in wanted.items()}


#: Where a training checkpoint keeps the model's and the decoder's tensors.
MODEL_PREFIX = "objective.model."
DECODER_PREFIX = "objective.decoder."


def read_consolidated(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A sharded training checkpoint as a native one: its plain entries (config, step...) with
    the full model weights as ``state_dict`` and the decoder's as ``decoder``; no optimizer."""
    trainer = read_trainer_state(path)
    consolidated = {k: v for k, v in trainer.items() if k not in ("ranks", "param_groups")}
    consolidated["state_dict"] = read_sharded_tensors(path, MODEL_PREFIX)
    consolidated["decoder"] = read_sharded_tensors(path, DECODER_PREFIX)
    if not consolidated["state_dict"]:
        raise CheckpointError(f"the sharded checkpoint {str(path)!r} holds no model weights")
    return consolidated


# ------------------------------------------------------------------------------------- writing


def save_sharded(
    final: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    trainer_state: Mapping[str, Any] | None,
) -> Path:
    """Write a sharded checkpoint at ``final``: every rank of the default process group calls
    (or one process without a group); rank 0 passes ``trainer_state``. Each rank hashes its own
    shards, rank 0 writes the hashes (``checksums.json``, :func:`verify_sharded`) and renames the
    finished ``.partial`` directory into place."""
    final = Path(final)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        _remove_tree(partial)
        partial.mkdir(parents=True)
    _barrier()
    with _quiet_dcp():
        dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(os.fspath(partial)))
    mine = {p.name: file_sha256(p) for p in sorted(partial.glob(f"__{rank}_*.distcp"))}
    hashes = _gather(mine)
    if rank == 0:
        assert trainer_state is not None, "rank 0 writes the trainer state"
        torch.save(dict(trainer_state), partial / TRAINER_FILE)
        files = {name: digest for rank_hashes in hashes for name, digest in rank_hashes.items()}
        for name in (INDEX_FILE, TRAINER_FILE):
            files[name] = file_sha256(partial / name)
        (partial / CHECKSUMS_FILE).write_text(json.dumps(files, indent=1, sort_keys=True))
        for name in (TRAINER_FILE, CHECKSUMS_FILE):  # DCP syncs the shards it writes itself
            fsync_path(partial / name)
        _remove_tree(final)
        os.replace(partial, final)
        fsync_path(final.parent)
    _barrier()
    return final


def verify_sharded(path: str | os.PathLike[str]) -> str | None:
    """``None`` when every file of the sharded checkpoint matches its recorded SHA-256 (ranks of a
    process group share the hashing out and agree on the answer), else what is wrong."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        return f"{str(path)!r} is not a complete sharded checkpoint"
    listed = path / CHECKSUMS_FILE
    problem = None
    if listed.is_file():
        try:
            expected = dict(json.loads(listed.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            expected, problem = {}, f"{str(listed)!r} is unreadable"
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for name in sorted(expected)[rank::world]:
            file = path / name
            if not file.is_file():
                problem = f"{str(file)!r} is missing"
            elif file_sha256(file) != expected[name]:
                problem = f"{str(file)!r} is corrupt: its SHA-256 differs from the one recorded"
    problems = _gather(problem)
    return next((p for p in problems if p is not None), None)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(value: Any) -> list[Any]:
    """``value`` from every rank (rank order); ``[value]`` without a process group."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def remove_sharded(path: str | os.PathLike[str]) -> None:
    _remove_tree(Path(path))


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    import shutil

    shutil.rmtree(path)


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP's notes that say nothing to a user: a single-process load is what was asked for, and
    its writer still touches the deprecated TypedStorage."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        yield


@contextlib.contextmanager
def _reading(path: str | os.PathLike[str]) -> Iterator[None]:
    """DCP reports a rank's failure wrapped in a ``CheckpointException`` (a BaseException): give
    our own errors back as they were, and anything else as a CheckpointError naming the path."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_dcp():
            yield
    except CheckpointException as wrapped:
        failures = [failure[0] for failure in wrapped.failures.values()]
        for failure in failures:
            if isinstance(failure, CheckpointError):
                raise failure from None
        first = failures[0] if failures else wrapped
        raise CheckpointError(
            f"cannot load the sharded checkpoint {os.fspath(path)!r}: {_short(first)}"
        ) from None
    except (CheckpointError, UnsafeCheckpointError):
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise CheckpointError(
            f"cannot load the sharded checkpoint {os.fspath(path)!r}: {_short(err)}"
        ) from err


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return " ".join(lines[:3]) if lines else type(err).__name__
