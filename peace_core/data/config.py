"""Data configuration: which webdataset shards to read, how to mix them, and when to give up.

Everything here is plain data validated by pydantic (``extra="forbid"``: a typo lists the valid
fields), so a data section can live in the same TOML/YAML file as the model and trainer settings.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, field_validator, model_validator
from webdataset.shardlists import expand_urls

from peace_core.config import StrictModel
from peace_registry.contract import check_modality_name

_GLOB_CHARS = frozenset("*?[")


class DatasetConfig(StrictModel):
    """One source of samples: a set of shards whose samples all hold the same modalities."""

    name: str = Field(min_length=1, description="names the dataset in stats and error messages")
    urls: str | list[str] = Field(
        description="shards: a brace pattern ('data-{000000..000009}.tar'), a glob "
        "('data/*.tar'), or a list of such patterns and paths",
    )
    modalities: list[str] = Field(
        min_length=1, description="modalities every sample must hold, e.g. ['vision', 'text']"
    )
    weight: float = Field(1.0, gt=0.0, description="share of the samples drawn from this dataset")
    batch_size: int | None = Field(None, gt=0, description="default: the data config's batch_size")
    shuffle_buffer: int | None = Field(
        None, ge=0, description="samples held for shuffling; 0 disables; default: the data config's"
    )

    @field_validator("modalities")
    @classmethod
    def _valid_modalities(cls, names: list[str]) -> list[str]:
        for name in names:
            check_modality_name(name)
        if len(set(names)) != len(names):
            raise ValueError(f"modalities are listed twice: {names}")
        return names


class DataConfig(StrictModel):
    """Several datasets mixed by weight into batches of one dataset (one modality set) each.

    With ``epoch_samples`` set, shards are resampled with replacement and an epoch is that many
    samples (rounded up to whole batches); without it every shard is read exactly once per epoch.
    """

    datasets: list[DatasetConfig] = Field(min_length=1)
    batch_size: int = Field(32, gt=0, description="samples per batch (per rank)")
    shuffle_buffer: int = Field(1000, ge=0, description="samples held for shuffling; 0 disables")
    epoch_samples: int | None = Field(
        None,
        gt=0,
        description="samples per epoch over all ranks, with resampled shards; "
        "None reads every shard once per epoch (no resampling)",
    )
    workers: int = Field(2, ge=0, description="DataLoader worker processes per rank")
    seed: int = Field(0, ge=0, description="seeds shard sampling, shuffling and mixing")
    max_bad_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="abort when a dataset's share of bad samples exceeds this"
    )
    min_samples_for_limit: int = Field(
        200, gt=0, description="samples a dataset must have seen before max_bad_fraction applies"
    )
    resume: Literal["exact", "reseed"] = Field(
        "exact",
        description="mid-epoch resume: 'exact' replays the epoch and drops the batches already "
        "consumed (same batches as an uninterrupted run); 'reseed' starts the rest of the epoch "
        "from a fresh seed (fast, statistically equivalent)",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [dataset.name for dataset in self.datasets]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"dataset names must be unique; repeated: {repeated}")
        return self

    def batch_size_of(self, dataset: DatasetConfig) -> int:
        return dataset.batch_size if dataset.batch_size is not None else self.batch_size

    def shuffle_buffer_of(self, dataset: DatasetConfig) -> int:
        return dataset.shuffle_buffer if dataset.shuffle_buffer is not None else self.shuffle_buffer

    @property
    def modalities(self) -> list[str]:
        """Every modality some dataset needs, sorted."""
        return sorted({name for dataset in self.datasets for name in dataset.modalities})


def _is_remote(url: str) -> bool:
    # "pipe:curl ...", "http://...", "s3://...": webdataset opens these; we cannot glob or stat.
    return url.startswith("pipe:") or "://" in url


def expand_shards(urls: str | Sequence[str], *, dataset: str = "dataset") -> list[str]:
    """Expand brace patterns and globs into the list of shard urls, in a stable order.

    Local shards must exist: a missing file or a glob matching nothing raises
    ``FileNotFoundError`` naming the dataset and the pattern.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns:
        raise ValueError(f"dataset {dataset!r}: no shard urls given")
    shards: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"dataset {dataset!r}: a shard url must be a non-empty string")
        for url in expand_urls(pattern):  # braces, and '::' joining several patterns
            if _is_remote(url):
                shards.append(url)
            elif _GLOB_CHARS & set(url):
                matches = sorted(glob.glob(os.path.expanduser(url)))
                if not matches:
                    raise FileNotFoundError(f"dataset {dataset!r}: no shard matches {url!r}")
                shards.extend(matches)
            else:
                path = os.path.expanduser(url)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"dataset {dataset!r}: shard {url!r} does not exist")
                shards.append(path)
    return shards
