"""The webdataset pipeline: shards -> samples -> tensors -> batches of one dataset each.

Per dataset, in every DataLoader worker::

    shard urls (resampled, or split by node and worker) -> tar samples -> shuffle buffer
      -> decode + preprocess (bad samples skipped and counted) -> batches -> collate

and a seeded mixer picks which dataset the next batch comes from, so that each dataset supplies
about ``weight / sum(weights)`` of the samples. A batch holds one dataset, hence one modality set.

Splitting by node and worker. With ``epoch_samples`` (resampled shards) every (rank, worker) draws
its own seeded stream of shards, so any number of shards serves any number of workers, and the
epoch is a fixed number of batches per rank (the same on every rank, as DDP needs), shared out
among the workers. Without it, the shard list (shuffled by a seed common to all ranks) is split
by rank and then by worker, so each shard, hence each sample, is read exactly once per epoch.

Bad samples. Each record carries the counts of its worker since the previous record (a last
record holding only ``"stats"`` carries the rest; see ``stats.py``); :class:`WebDataLoader`
merges them in the main process, enforces the error-rate limit on the totals and counts the
batches handed out (the data position). Workers also check their own totals, so a worker that
meets nothing but bad data stops instead of searching forever.

Determinism. Every random choice (shard resampling, shard order, shuffling, mixing) draws from
its own ``random.Random`` seeded by (seed, epoch, rank, worker, dataset, purpose), and worker
processes seed torch / numpy / random from the same values, so preprocessing augmentations repeat
too. Given the same seed, epoch, world size and worker count the batches are identical, in the
same order (the DataLoader returns worker outputs round-robin).

Resume. :attr:`WebDataLoader.position` (seed, epoch, batches consumed) goes into checkpoints.
``resume="exact"`` replays the interrupted epoch and drops the batches already consumed: the run
continues with exactly the batches it would have seen (costs the time to read them again).
``resume="reseed"`` (resampled data only) instead runs the rest of the epoch from a seed salted
with the number of batches consumed: no replay, same data distribution, different batches.
A plain single pass over the shards (no ``epoch_samples``) always resumes exactly.

Why not ``webdataset.RandomMix`` and ``ResampledShards``: RandomMix draws from the global
``random`` module and ResampledShards keeps its epoch in the object (lost when DataLoader workers
are re-created each epoch), so neither repeats exactly; the few lines here do.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples
from webdataset.utils import pytorch_worker_info

from peace_core.data.config import DataConfig, DatasetConfig, expand_shards
from peace_core.data.samples import BadSampleError, DecodedSample, SampleDecoder
from peace_core.data.stats import DataStats
from peace_registry.contract import Preprocessor
from peace_registry.errors import PeaceError

if TYPE_CHECKING:
    pass

#: A batch record: {"dataset": name, "modalities": {name: collated}, "meta": [...]}.
Batch = dict[str, Any]

#: Resampled shards in a row that yield no sample before we call the dataset empty.
_EMPTY_SHARDS_LIMIT = 100


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (no dependence on ``PYTHONHASHSEED``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def share_of(total: int, index: int, parts: int) -> int:
    """How many of ``total`` items part ``index`` of ``parts`` takes (the first ones take one
    more when it does not divide)."""
    return total // parts + (1 if index < total % parts else 0)


@dataclass(frozen=True)
class DataPosition:
    """Where a rank's data stream stands: enough to resume it (see the module docstring)."""

    seed: int
    epoch: int
    batches_consumed: int


class _Counter:
    """A worker's counts: the running total (for the limit) and the delta for the next record."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.total = DataStats()
        self.pending = DataStats()

    def ok(self, dataset: str, count: int = 1) -> None:
        self.total.record_ok(dataset, count)
        self.pending.record_ok(dataset, count)

    def bad(self, dataset: str, reason: str, detail: str) -> None:
        self.total.record_bad(dataset, reason, detail)
        self.pending.record_bad(dataset, reason, detail)
        # Checked here too, so that a worker stuck on bad data stops without sending a batch.
        self.total.check(self.config.max_bad_fraction, self.config.min_samples_for_limit)


class WebDataPipeline(IterableDataset):
    """Batches from webdataset shards, for a DataLoader with ``batch_size=None``.

    ``preprocessors`` maps every modality the datasets need to its built preprocessor and
    ``file_extensions`` to its extensions (``ModalitySpec.file_extensions``). ``rank`` and
    ``world_size`` default to torch.distributed's (or the RANK / WORLD_SIZE variables).
    """

    def __init__(
        self,
        config: DataConfig,
        preprocessors: Mapping[str, Preprocessor],
        file_extensions: Mapping[str, Sequence[str]],
        *,
        train: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        missing = [m for m in config.modalities if m not in preprocessors]
        if missing:
            raise ValueError(
                f"the data config needs modalities {missing} but preprocessors were given only "
                f"for {sorted(preprocessors)}"
            )
        self.config = config
        self.decoder = SampleDecoder(
            {m: preprocessors[m] for m in config.modalities}, file_extensions, train=train
        )
        self.train = train
        self.shards = {d.name: expand_shards(d.urls, dataset=d.name) for d in config.datasets}
        detected_rank, detected_world, _, _ = pytorch_worker_info()
        self.rank = detected_rank if rank is None else rank
        self.world_size = detected_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not within world_size {self.world_size}")
        self.epoch = 0
        self.resume_from = 0

    # ---- epoch bookkeeping (set in the main process before workers start) ---------------------

    @property
    def resampled(self) -> bool:
        return self.config.epoch_samples is not None

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches one rank yields per epoch with resampling; ``None`` for a single pass."""
        if self.config.epoch_samples is None:
            return None
        weights = [d.weight for d in self.config.datasets]
        sizes = [self.config.batch_size_of(d) for d in self.config.datasets]
        # Datasets are picked per batch with odds weight/batch_size, so samples follow weights.
        mean_batch = sum(weights) / sum(w / b for w, b in zip(weights, sizes))
        return max(1, math.ceil(self.config.epoch_samples / (self.world_size * mean_batch) - 1e-9))

    def set_epoch(self, epoch: int, *, resume_from: int = 0) -> None:
        """Select the epoch to produce; ``resume_from > 0`` starts a reseeded rest of the epoch
        (``resume="reseed"``) that yields only the batches not yet consumed."""
        if epoch < 0 or resume_from < 0:
            raise ValueError(f"epoch ({epoch}) and resume_from ({resume_from}) must be >= 0")
        if resume_from and not self.resampled:
            raise ValueError("resume_from needs resampled data (epoch_samples); replay instead")
        self.epoch = epoch
        self.resume_from = resume_from

    def _seed(self, *parts: object) -> int:
        return derive_seed(self.config.seed, self.epoch, self.resume_from, self.rank, *parts)

    # ---- iteration (runs inside each DataLoader worker) ----------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:  # a worker process: own the global RNGs preprocessors may use
            seed = self._seed(worker, "global rngs")
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        counter = _Counter(self.config)
        streams = [self._dataset_batches(d, worker, workers, counter) for d in self.config.datasets]
        quota = None
        if self.batches_per_epoch is not None:
            quota = share_of(max(0, self.batches_per_epoch - self.resume_from), worker, workers)
        try:
            yield from self._mix(streams, quota, counter, worker)
        finally:
            for stream in streams:
                stream.close()

    def _mix(
        self, streams: list[Iterator[Batch]], quota: int | None, counter: _Counter, worker: int
    ) -> Iterator[Batch]:
        odds = [d.weight / self.config.batch_size_of(d) for d in self.config.datasets]
        # Not seeded by rank: every rank picks the same dataset for the same step, so a DDP step
        # holds one modality set everywhere (the aligning contrast gathers across ranks). With
        # resampled data this holds for the whole epoch; a single pass may diverge at its end.
        rng = random.Random(
            derive_seed(self.config.seed, self.epoch, self.resume_from, worker, "mix")
        )
        active = list(range(len(streams)))
        produced = 0
        while active and (quota is None or produced < quota):
            index = rng.choices(active, weights=[odds[i] for i in active])[0]
            try:
                record = next(streams[index])
            except StopIteration:
                active.remove(index)
                continue
            record["stats"] = counter.pending.drain()
            produced += 1
            yield record
        remainder = counter.pending.drain()
        if not remainder.empty:
            yield {"stats": remainder}  # counts of samples that ended in no batch

    def _shard_urls(self, dataset: DatasetConfig, worker: int, workers: int) -> Iterator[dict]:
        shards = self.shards[dataset.name]
        if self.resampled:
            # Every (rank, worker) draws its own stream: no split needed, any shard count works.
            rng = random.Random(self._seed(worker, dataset.name, "shards"))
            while True:
                yield {"url": rng.choice(shards)}
        order = list(shards)
        if self.train and self.config.shuffle_buffer_of(dataset) > 0:
            # Same order on every rank and worker, so the split below is a partition.
            random.Random(derive_seed(self.config.seed, self.epoch, dataset.name)).shuffle(order)
        mine = islice(islice(order, self.rank, None, self.world_size), worker, None, workers)
        for url in mine:
            yield {"url": url}

    def _dataset_batches(
        self, dataset: DatasetConfig, worker: int, workers: int, counter: _Counter
    ) -> Iterator[Batch]:
        name = dataset.name
        shards_without_samples = 0
        visits = 0  # shards opened so far; tar reading opens one at a time
        failed_visit = -1

        def watched_urls() -> Iterator[dict]:
            nonlocal shards_without_samples, visits
            for url in self._shard_urls(dataset, worker, workers):
                visits += 1
                shards_without_samples += 1
                if shards_without_samples > _EMPTY_SHARDS_LIMIT:
                    raise PeaceError(
                        f"dataset {name!r}: {_EMPTY_SHARDS_LIMIT} shards in a row yielded no "
                        f"sample (last: {url['url']}); are the shards empty?"
                    )
                yield url

        def unreadable(exc: Exception) -> bool:
            nonlocal failed_visit
            if failed_visit != visits:  # a broken tar raises more than once: count it once
                failed_visit = visits
                counter.bad(name, "unreadable shard", _short(exc))
            return True  # skip it and go on with the next file or shard

        def counted(samples: Iterator[dict]) -> Iterator[dict]:
            nonlocal shards_without_samples
            for sample in samples:
                shards_without_samples = 0
                yield sample

        raw = counted(tarfile_samples(watched_urls(), handler=unreadable))
        buffer = self.config.shuffle_buffer_of(dataset) if self.train else 0
        rng = random.Random(self._seed(worker, name, "shuffle"))
        batch: list[DecodedSample] = []
        size = self.config.batch_size_of(dataset)
        for sample in _shuffled(raw, buffer, rng):
            try:
                batch.append(self.decoder(sample, dataset.modalities))
            except BadSampleError as bad:
                counter.bad(name, bad.reason, bad.detail)
                continue
            counter.ok(name)
            if len(batch) == size:
                record = self._collate(dataset, batch, counter)
                batch = []
                if record is not None:
                    yield record
        if batch:  # only a single pass ends: its last batch may be short
            record = self._collate(dataset, batch, counter)
            if record is not None:
                yield record

    def _collate(
        self, dataset: DatasetConfig, samples: list[DecodedSample], counter: _Counter
    ) -> Batch | None:
        collated = {}
        for modality in dataset.modalities:
            preprocessor = self.decoder.preprocessors[modality]
            try:
                collated[modality] = preprocessor.collate([s.inputs[modality] for s in samples])
            except Exception as exc:
                # The samples were counted as good when decoded; move them to the bad side.
                counter.ok(dataset.name, -len(samples))
                for _ in samples:
                    counter.bad(dataset.name, f"{modality} collate failed", _short(exc))
                return None
        return {
            "dataset": dataset.name,
            "modalities": collated,
            "meta": [sample.meta for sample in samples],
        }


def raw_samples(config: DataConfig, modality: str) -> Iterator[dict[str, Any]]:
    """Raw samples (webdataset dicts) of every dataset holding ``modality``, shards in the order
    they are listed, read lazily; unreadable shards are skipped (training reports them)."""
    for dataset in config.datasets:
        if modality not in dataset.modalities:
            continue
        urls = ({"url": url} for url in expand_shards(dataset.urls, dataset=dataset.name))
        yield from tarfile_samples(urls, handler=lambda exc: True)


def _shuffled(items: Iterator[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``buffer`` items (0: keep the order)."""
    if buffer <= 1:
        yield from items
        return
    held: list[Any] = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        index = rng.randrange(buffer)
        yield held[index]
        held[index] = item
    rng.shuffle(held)
    yield from held


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class WebDataLoader:
    """What a trainer iterates: one epoch of batches per ``iter()``, with stats and position.

    Each ``iter()`` starts a DataLoader over the current epoch (resuming mid-epoch when
    :meth:`load_state_dict` says so) and moves to the next epoch once the epoch is exhausted.
    Batches are ``{"dataset", "modalities", "meta"}``; :attr:`stats` holds the totals over all
    workers and raises :class:`~peace_core.data.stats.TooManyBadSamplesError` past the limit.
    """

    def __init__(
        self,
        config: DataConfig,
        preprocessors: Mapping[str, Preprocessor],
        file_extensions: Mapping[str, Sequence[str]],
        *,
        train: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.config = config
        self.pipeline = WebDataPipeline(
            config, preprocessors, file_extensions, train=train, rank=rank, world_size=world_size
        )
        self.pin_memory = pin_memory
        self.stats = DataStats()
        self.epoch = 0
        self.batches_consumed = 0

    def __len__(self) -> int:
        batches = self.pipeline.batches_per_epoch
        if batches is None:
            raise TypeError("a single pass over shards has no known length; set epoch_samples")
        return batches

    @property
    def position(self) -> DataPosition:
        return DataPosition(self.config.seed, self.epoch, self.batches_consumed)

    def state_dict(self) -> dict[str, int]:
        position = self.position
        return {
            "seed": position.seed,
            "epoch": position.epoch,
            "batches_consumed": position.batches_consumed,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a saved position; the seed must match the config's."""
        missing = {"seed", "epoch", "batches_consumed"} - set(state)
        if missing:
            raise ValueError(f"data position is missing {sorted(missing)}")
        if int(state["seed"]) != self.config.seed:
            raise ValueError(
                f"data position was saved with seed {state['seed']} but the data config has seed "
                f"{self.config.seed}; resuming would not continue the same stream"
            )
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])

    def __iter__(self) -> Iterator[Batch]:
        total = self.pipeline.batches_per_epoch
        if total is not None and self.batches_consumed >= total:  # saved at the end of an epoch
            self.epoch += 1
            self.batches_consumed = 0
        reseed = self.config.resume == "reseed" and self.pipeline.resampled
        skip = 0 if reseed else self.batches_consumed
        self.pipeline.set_epoch(self.epoch, resume_from=self.batches_consumed if reseed else 0)
        loader = DataLoader(
            self.pipeline,
            batch_size=None,
            num_workers=self.config.workers,
            pin_memory=self.pin_memory,
        )
        for record in loader:
            delta = record.pop("stats", None)
            if delta is not None:
                self.stats.merge(delta)
                self.stats.check(self.config.max_bad_fraction, self.config.min_samples_for_limit)
            if "modalities" not in record:
                continue
            if skip:
                skip -= 1
                continue
            self.batches_consumed += 1
            yield record
        self.epoch += 1
        self.batches_consumed = 0


def sequential_loader(
    urls: str | list[str],
    modalities: Sequence[str],
    preprocessors: Mapping[str, Preprocessor],
    file_extensions: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 32,
    workers: int = 0,
    name: str = "eval",
    max_bad_fraction: float = 0.1,
    rank: int | None = None,
    world_size: int | None = None,
) -> WebDataLoader:
    """For evaluation: every sample of the shards exactly once (across ranks and workers), in
    shard order, no resampling, no shuffling, no training augmentation."""
    config = DataConfig(
        datasets=[DatasetConfig(name=name, urls=urls, modalities=list(modalities))],
        batch_size=batch_size,
        shuffle_buffer=0,
        workers=workers,
        max_bad_fraction=max_bad_fraction,
    )
    return WebDataLoader(
        config, preprocessors, file_extensions, train=False, rank=rank, world_size=world_size
    )
