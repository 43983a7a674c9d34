"""The webdataset pipeline: mixing, epochs, worker splits, determinism, resume, bad samples."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import soundfile
import torch
from PIL import Image
from webdataset import TarWriter

from peace_core.data import (
    DataConfig,
    DatasetConfig,
    DataStats,
    SynthConfig,
    TooManyBadSamplesError,
    WebDataLoader,
    expand_shards,
    sequential_loader,
    synthesize,
)
from peace_core.data.pipeline import derive_seed, share_of

# ---- tiny preprocessors standing in for the modality plugins -----------------------------------


class ImagePre:
    """jpg/png -> [3,16,16] floats."""

    def __init__(self) -> None:
        self.decoders = {"jpg": self._decode, "png": self._decode}

    @staticmethod
    def _decode(data: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        image.load()  # a corrupt file fails here, not later
        return image.convert("RGB")

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        if not isinstance(item, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(item).__name__}")
        pixels = np.asarray(item.resize((16, 16)), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)
        if train:  # an augmentation drawing from torch's global RNG
            tensor = tensor + 0.01 * torch.randn_like(tensor)
        return {"image": tensor}

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"image": torch.stack([s["image"] for s in samples])}

    def examples(self, count: int, seed: int = 0) -> list[Any]:
        return [Image.new("RGB", (8, 8), (seed, i, 0)) for i in range(count)]


class AudioPre:
    """flac/wav -> the first 8000 samples (zero padded) and the true length."""

    def __init__(self) -> None:
        self.decoders = {"flac": self._decode, "wav": self._decode}

    @staticmethod
    def _decode(data: bytes) -> np.ndarray:
        wave, _ = soundfile.read(io.BytesIO(data), dtype="float32")
        return wave

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        wave = torch.as_tensor(np.asarray(item, dtype=np.float32))[:8000]
        padded = torch.zeros(8000)
        padded[: len(wave)] = wave
        return {"audio": padded, "length": torch.tensor(len(wave))}

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([s[k] for s in samples]) for k in ("audio", "length")}

    def examples(self, count: int, seed: int = 0) -> list[Any]:
        return [np.zeros(100 + i, dtype=np.float32) for i in range(count)]


class TextPre:
    """Captions -> byte codes (at most 32); an empty caption is an error."""

    def __init__(self) -> None:
        self.decoders = {"txt": lambda data: data.decode("utf-8")}

    def __call__(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"expected a non-empty caption, got {item!r}")
        codes = torch.tensor(list(item.encode("utf-8")[:32]), dtype=torch.long)
        return {"tokens": codes}

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        tokens = torch.zeros(len(samples), 32, dtype=torch.long)
        for row, sample in enumerate(samples):
            tokens[row, : len(sample["tokens"])] = sample["tokens"]
        return {"tokens": tokens}

    def examples(self, count: int, seed: int = 0) -> list[Any]:
        return [f"caption {seed} {i}" for i in range(count)]


PREPROCESSORS = {"vision": ImagePre(), "audio": AudioPre(), "text": TextPre()}
EXTENSIONS = {"vision": ("jpg", "png"), "audio": ("flac", "wav"), "text": ("txt",)}


# ---- data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    config = SynthConfig(
        seed=3,
        train_images=48,
        train_sounds=24,
        texts=32,
        test_images=30,
        test_sounds=12,
        image_size=32,
        shard_size=8,
    )
    synthesize(root, config, jobs=1)
    return root


def image_dataset(root: Path, **overrides: Any) -> DatasetConfig:
    fields = {"name": "images", "urls": str(root / "train/image_text-*.tar")}
    fields["modalities"] = ["vision", "text"]
    return DatasetConfig(**(fields | overrides))


def text_dataset(root: Path, **overrides: Any) -> DatasetConfig:
    fields = {"name": "texts", "urls": str(root / "train/text-*.tar"), "modalities": ["text"]}
    return DatasetConfig(**(fields | overrides))


def loader(config: DataConfig, **kwargs: Any) -> WebDataLoader:
    return WebDataLoader(config, PREPROCESSORS, EXTENSIONS, **kwargs)


def keys(batches: list[dict[str, Any]]) -> list[list[str]]:
    return [[m["key"] for m in batch["meta"]] for batch in batches]


def _jpg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _flac(seed: int) -> bytes:
    buffer = io.BytesIO()
    wave = np.random.default_rng(seed).uniform(-0.5, 0.5, 4000).astype(np.float32)
    soundfile.write(buffer, wave, 16000, format="FLAC")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict[str, Any]]) -> Path:
    with TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return path


@pytest.fixture()
def planted_shards(tmp_path: Path) -> dict[str, Path]:
    """Good samples plus one of each kind of bad sample, for images and for sounds."""
    good_images = [
        {"__key__": f"img{i:03d}", "jpg": _jpg(i), "txt": f"picture {i}".encode()} for i in range(9)
    ]
    # No txt, but the json holds the caption: a good sample.
    good_images.append({"__key__": "img009", "jpg": _jpg(9), "json": b'{"caption": "from json"}'})
    bad_images = [
        {"__key__": "corrupt", "jpg": b"\xff\xd8 this is not a jpeg", "txt": b"broken"},
        {"__key__": "nocaption", "jpg": _jpg(100)},
        {"__key__": "jsonnocaption", "jpg": _jpg(103), "json": b'{"label": 3}'},
        {"__key__": "badjson", "jpg": _jpg(101), "txt": b"ok", "json": b"{not json"},
        {"__key__": "emptycaption", "jpg": _jpg(102), "txt": b"   "},
    ]
    flac = _flac(0)
    good_sounds = [
        {"__key__": f"snd{i:03d}", "flac": _flac(i), "txt": f"sound {i}".encode()} for i in range(6)
    ]
    bad_sounds = [{"__key__": "truncated", "flac": flac[: len(flac) // 2], "txt": b"cut"}]
    return {
        "images": write_shard(
            tmp_path / "images.tar", good_images[:5] + bad_images + good_images[5:]
        ),
        "sounds": write_shard(
            tmp_path / "sounds.tar", good_sounds[:3] + bad_sounds + good_sounds[3:]
        ),
    }


# ---- batches ---------------------------------------------------------------------------------


def test_batches_hold_one_dataset_with_collated_modalities_and_meta(synth_root: Path) -> None:
    sounds = DatasetConfig(
        name="sounds", urls=str(synth_root / "train/audio_text-*.tar"), modalities=["audio", "text"]
    )
    config = DataConfig(
        datasets=[image_dataset(synth_root), sounds, text_dataset(synth_root)],
        batch_size=4,
        shuffle_buffer=16,
        epoch_samples=96,
        workers=0,
    )
    batches = list(loader(config))
    expected = {"images": {"vision", "text"}, "sounds": {"audio", "text"}, "texts": {"text"}}
    assert {b["dataset"] for b in batches} == set(expected)
    for batch in batches:
        assert set(batch) == {"dataset", "modalities", "meta"}
        assert set(batch["modalities"]) == expected[batch["dataset"]]
        assert len(batch["meta"]) == 4
        assert batch["modalities"]["text"]["tokens"].shape == (4, 32)
        if batch["dataset"] == "images":
            assert batch["modalities"]["vision"]["image"].shape == (4, 3, 16, 16)
            assert all(m["json"]["class"] == m["json"]["shape"] for m in batch["meta"])
        if batch["dataset"] == "sounds":
            assert batch["modalities"]["audio"]["audio"].shape == (4, 8000)
            assert all("_sound_" in m["key"] for m in batch["meta"])


@pytest.mark.parametrize("batch_sizes", [(8, 8), (4, 16)])
def test_mixing_follows_weights_in_samples(synth_root: Path, batch_sizes: tuple[int, int]) -> None:
    config = DataConfig(
        datasets=[
            image_dataset(synth_root, weight=3.0, batch_size=batch_sizes[0]),
            text_dataset(synth_root, weight=1.0, batch_size=batch_sizes[1]),
        ],
        shuffle_buffer=8,
        epoch_samples=1600,
        workers=0,
    )
    samples = Counter()
    for batch in loader(config):
        samples[batch["dataset"]] += len(batch["meta"])
    share = samples["images"] / sum(samples.values())
    assert 0.68 < share < 0.82, samples


def test_every_rank_picks_the_same_dataset_each_step(synth_root: Path) -> None:
    # DDP: the aligning contrast gathers across ranks, so a step must hold one modality set.
    config = DataConfig(
        datasets=[image_dataset(synth_root, weight=1.0), text_dataset(synth_root, weight=1.0)],
        batch_size=4,
        shuffle_buffer=4,
        epoch_samples=160,
        workers=0,
    )
    ranks = [[b["dataset"] for b in loader(config, rank=r, world_size=2)] for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert set(ranks[0]) == {"images", "texts"}
    keys_per_rank = [keys(list(loader(config, rank=r, world_size=2))) for r in (0, 1)]
    assert keys_per_rank[0] != keys_per_rank[1]  # same datasets, different samples


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_length_is_honoured_per_rank(synth_root: Path, workers: int) -> None:
    config = DataConfig(
        datasets=[image_dataset(synth_root)],
        batch_size=8,
        shuffle_buffer=4,
        epoch_samples=50,
        workers=workers,
    )
    data = loader(config, rank=0, world_size=1)
    assert len(data) == 7  # ceil(50 / 8)
    first = list(data)
    assert len(first) == 7 and data.epoch == 1
    assert sum(len(b["meta"]) for b in first) == 56
    second = list(data)
    assert len(second) == 7 and data.epoch == 2
    assert keys(first) != keys(second)  # resampled afresh each epoch

    two_ranks = [loader(config, rank=r, world_size=2) for r in (0, 1)]
    assert [len(d) for d in two_ranks] == [4, 4]  # ceil(50 / (2 * 8))
    assert [len(list(d)) for d in two_ranks] == [4, 4]


def test_share_of_splits_exactly() -> None:
    assert [share_of(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert sum(share_of(13, w, 4) for w in range(4)) == 13


def test_same_seed_same_batches_other_seed_other_batches(synth_root: Path) -> None:
    def run(seed: int, workers: int) -> list[list[str]]:
        config = DataConfig(
            datasets=[image_dataset(synth_root), text_dataset(synth_root)],
            batch_size=4,
            shuffle_buffer=8,
            epoch_samples=40,
            workers=workers,
            seed=seed,
        )
        return keys(list(loader(config)))

    assert run(1, 2) == run(1, 2)
    assert run(1, 0) == run(1, 0)
    assert run(1, 2) != run(2, 2)


def test_augmentation_randomness_repeats_in_workers(synth_root: Path) -> None:
    config = DataConfig(
        datasets=[image_dataset(synth_root)], batch_size=4, epoch_samples=16, workers=2, seed=5
    )
    first = [b["modalities"]["vision"]["image"] for b in loader(config)]
    again = [b["modalities"]["vision"]["image"] for b in loader(config)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    clean = [b["modalities"]["vision"]["image"] for b in loader(config, train=False)]
    assert not torch.equal(first[0], clean[0])


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2)
    assert derive_seed(1, "a", 2) != derive_seed(1, "a", 3)
    assert 0 <= derive_seed("x") < 2**63


# ---- single pass (evaluation) ----------------------------------------------------------------


def test_sequential_reader_yields_every_sample_once_across_workers(synth_root: Path) -> None:
    data = sequential_loader(
        str(synth_root / "test/image_text-{000000..000003}.tar"),
        ["vision", "text"],
        PREPROCESSORS,
        EXTENSIONS,
        batch_size=4,
        workers=2,
    )
    seen = [key for batch in data for key in (m["key"] for m in batch["meta"])]
    assert len(seen) == 30 and len(set(seen)) == 30
    assert data.stats.counts("eval").ok == 30
    with pytest.raises(TypeError, match="no known length"):
        len(data)


def test_sequential_reader_splits_by_node(synth_root: Path) -> None:
    def read(rank: int) -> list[str]:
        data = sequential_loader(
            str(synth_root / "test/image_text-*.tar"),
            ["vision", "text"],
            PREPROCESSORS,
            EXTENSIONS,
            batch_size=5,
            workers=2,
            rank=rank,
            world_size=2,
        )
        return [m["key"] for batch in data for m in batch["meta"]]

    ranks = [read(0), read(1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert len(ranks[0]) + len(ranks[1]) == 30 and ranks[0] and ranks[1]


def test_single_pass_training_epoch_covers_each_sample_once(synth_root: Path) -> None:
    config = DataConfig(
        datasets=[image_dataset(synth_root), text_dataset(synth_root)],
        batch_size=5,
        shuffle_buffer=6,
        workers=2,
    )
    data = loader(config)
    seen = [key for batch in data for key in (m["key"] for m in batch["meta"])]
    assert len(seen) == 48 + 32 and len(set(seen)) == len(seen)
    assert data.epoch == 1


def test_no_sample_is_seen_twice_in_an_epoch_across_two_ranks_and_two_workers(
    synth_root: Path,
) -> None:
    config = DataConfig(
        datasets=[image_dataset(synth_root), text_dataset(synth_root)],
        batch_size=3,
        shuffle_buffer=6,
        workers=2,
    )
    seen = []
    for rank in (0, 1):
        data = loader(config, rank=rank, world_size=2)
        seen += [key for batch in data for key in (m["key"] for m in batch["meta"])]
        assert data.epoch == 1
    assert len(seen) == 48 + 32 and len(set(seen)) == len(seen)


# ---- resume ----------------------------------------------------------------------------------


def test_exact_resume_continues_with_the_same_batches(synth_root: Path) -> None:
    config = DataConfig(
        datasets=[image_dataset(synth_root), text_dataset(synth_root)],
        batch_size=4,
        shuffle_buffer=8,
        epoch_samples=48,
        workers=2,
        seed=11,
    )
    full = keys(list(loader(config)))
    interrupted = loader(config)
    stream = iter(interrupted)
    head = [next(stream) for _ in range(5)]
    state = interrupted.state_dict()
    assert state == {"seed": 11, "epoch": 0, "batches_consumed": 5}
    assert keys(head) == full[:5]

    resumed = loader(config)
    resumed.load_state_dict(state)
    assert keys(list(resumed)) == full[5:]
    assert resumed.position.epoch == 1 and resumed.position.batches_consumed == 0

    at_epoch_end = loader(config)  # saved after the last batch: go straight to the next epoch
    at_epoch_end.load_state_dict({"seed": 11, "epoch": 0, "batches_consumed": len(full)})
    next_epoch = loader(config)
    next_epoch.load_state_dict({"seed": 11, "epoch": 1, "batches_consumed": 0})
    assert keys(list(at_epoch_end)) == keys(list(next_epoch))


def test_reseed_resume_yields_the_rest_of_the_epoch_from_a_new_seed(synth_root: Path) -> None:
    config = DataConfig(
        datasets=[image_dataset(synth_root)],
        batch_size=4,
        shuffle_buffer=8,
        epoch_samples=48,
        workers=0,
        resume="reseed",
    )
    full = keys(list(loader(config)))
    resumed = loader(config)
    resumed.load_state_dict({"seed": 0, "epoch": 0, "batches_consumed": 5})
    rest = keys(list(resumed))
    assert len(rest) == len(full) - 5
    assert rest != full[5:]


def test_load_state_dict_rejects_another_seed(synth_root: Path) -> None:
    data = loader(DataConfig(datasets=[image_dataset(synth_root)], epoch_samples=8, seed=1))
    with pytest.raises(ValueError, match="seed 2 but the data config has seed 1"):
        data.load_state_dict({"seed": 2, "epoch": 0, "batches_consumed": 0})
    with pytest.raises(ValueError, match="missing"):
        data.load_state_dict({"seed": 1})


# ---- bad samples -----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted_per_reason(
    planted_shards: dict[str, Path], workers: int
) -> None:
    config = DataConfig(
        datasets=[
            DatasetConfig(
                name="images", urls=str(planted_shards["images"]), modalities=["vision", "text"]
            ),
            DatasetConfig(
                name="sounds", urls=str(planted_shards["sounds"]), modalities=["audio", "text"]
            ),
        ],
        batch_size=3,
        shuffle_buffer=0,
        workers=workers,
        max_bad_fraction=0.5,
        min_samples_for_limit=100,
    )
    data = loader(config, train=False)
    seen = [m["key"] for batch in data for m in batch["meta"]]
    assert sorted(seen) == sorted(
        [f"img{i:03d}" for i in range(10)] + [f"snd{i:03d}" for i in range(6)]
    )
    images, sounds = data.stats.counts("images"), data.stats.counts("sounds")
    assert images.ok == 10 and sounds.ok == 6
    assert dict(images.bad) == {
        "undecodable jpg": 1,
        "missing text": 2,
        "invalid json": 1,
        "empty txt": 1,
    }
    assert dict(sounds.bad) == {"undecodable flac": 1}
    assert "corrupt" in images.examples["undecodable jpg"][0]
    summary = data.stats.summary()
    assert "data images: 10 ok, 5 skipped" in summary and "missing text ×2" in summary
    assert data.stats.as_dict()["sounds"] == {"ok": 6, "bad": 1, "reasons": {"undecodable flac": 1}}


def test_truncated_shard_is_counted_once(tmp_path: Path, planted_shards: dict[str, Path]) -> None:
    whole = planted_shards["images"].read_bytes()
    with tarfile.open(planted_shards["images"]) as archive:
        fifth = archive.getmembers()[4]  # img002.jpg: cut inside its data
    broken = tmp_path / "broken.tar"
    broken.write_bytes(whole[: fifth.offset_data + 10])
    data = sequential_loader(
        [str(broken), str(planted_shards["sounds"])],
        ["text"],
        PREPROCESSORS,
        EXTENSIONS,
        batch_size=2,
        max_bad_fraction=0.9,
    )
    seen = [m["key"] for batch in data for m in batch["meta"]]
    assert seen[:2] == ["img000", "img001"]  # read up to the damage, then the next shard
    assert len(seen) == 2 + 7  # the next shard is read in full (its captions are fine)
    counts = data.stats.counts("eval")
    assert dict(counts.bad) == {"unreadable shard": 1}
    assert "broken.tar" in counts.examples["unreadable shard"][0]


@pytest.mark.parametrize("workers", [0, 2])
def test_error_rate_limit_aborts_naming_dataset_and_reasons(tmp_path: Path, workers: int) -> None:
    samples = []
    for i in range(40):
        jpg = _jpg(i) if i % 2 else b"not an image"
        samples.append({"__key__": f"s{i:03d}", "jpg": jpg, "txt": b"caption"})
    shard = write_shard(tmp_path / "half_bad.tar", samples)
    config = DataConfig(
        datasets=[DatasetConfig(name="flaky", urls=str(shard), modalities=["vision", "text"])],
        batch_size=2,
        shuffle_buffer=0,
        epoch_samples=400,
        workers=workers,
        max_bad_fraction=0.2,
        min_samples_for_limit=10,
    )
    with pytest.raises(TooManyBadSamplesError) as caught:
        list(loader(config))
    message = str(caught.value)
    assert "dataset 'flaky'" in message
    assert "undecodable jpg" in message and "limit is 20.0%" in message


def test_collate_failure_moves_the_batch_to_the_bad_side(synth_root: Path) -> None:
    class BrokenCollate(TextPre):
        def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            raise RuntimeError("cannot stack")

    data = sequential_loader(
        str(synth_root / "train/text-*.tar"),
        ["text"],
        {"text": BrokenCollate()},
        {"text": ("txt",)},
        batch_size=8,
        max_bad_fraction=0.99,
    )
    assert list(data) == []
    counts = data.stats.counts("eval")
    assert counts.ok == 0 and dict(counts.bad) == {"text collate failed": 32}
    assert "RuntimeError: cannot stack" in counts.examples["text collate failed"][0]


def test_main_process_limit_uses_the_sum_over_workers() -> None:
    stats = DataStats()
    for worker_delta in range(2):  # two workers, each under the minimum on its own
        delta = DataStats()
        for _ in range(6):
            delta.record_ok("d")
        for _ in range(4):
            delta.record_bad("d", "missing text", f"worker {worker_delta}")
        stats.merge(delta)
    with pytest.raises(TooManyBadSamplesError, match=r"8 of 20 samples were bad \(40.0%"):
        stats.check(0.3, 15)
    stats.check(0.5, 15)  # under this limit
    assert stats.counts("d").examples["missing text"] == ["worker 0"] * 3


def test_drain_hands_over_counts_once() -> None:
    stats = DataStats()
    stats.record_ok("a", 3)
    stats.record_bad("a", "r")
    delta = stats.drain()
    assert delta.counts("a").ok == 3 and delta.counts("a").bad["r"] == 1
    assert stats.empty and not delta.empty


# ---- configuration errors --------------------------------------------------------------------


def test_config_rejects_typos_and_duplicates(synth_root: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="shuffle_bufer"):
        DataConfig(datasets=[image_dataset(synth_root)], shuffle_bufer=3)
    with pytest.raises(pydantic.ValidationError, match="repeated"):
        DataConfig(datasets=[image_dataset(synth_root), image_dataset(synth_root)])
    with pytest.raises(pydantic.ValidationError, match="invalid modality name"):
        DatasetConfig(name="x", urls="a.tar", modalities=["Vision"])
    with pytest.raises(pydantic.ValidationError, match="max_bad_fraction"):
        DataConfig(datasets=[image_dataset(synth_root)], max_bad_fraction=1.0)


def test_shards_expand_braces_and_globs_and_name_missing_ones(synth_root: Path) -> None:
    braces = expand_shards(str(synth_root / "train/image_text-{000000..000005}.tar"))
    assert braces == expand_shards(str(synth_root / "train/image_text-*.tar"))
    assert len(braces) == 6
    with pytest.raises(FileNotFoundError, match=r"dataset 'web': shard .*missing-1\.tar"):
        expand_shards([str(synth_root / "missing-{1..2}.tar")], dataset="web")
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_shards(str(synth_root / "nothing-*.tar"), dataset="web")
    assert expand_shards("pipe:curl -s http://x/a.tar") == ["pipe:curl -s http://x/a.tar"]


def test_pipeline_needs_a_preprocessor_for_every_modality(synth_root: Path) -> None:
    config = DataConfig(datasets=[image_dataset(synth_root)])
    with pytest.raises(ValueError, match=r"needs modalities \['vision'\]"):
        WebDataLoader(config, {"text": TextPre()}, EXTENSIONS)


# ---- with the real plugins -------------------------------------------------------------------


def real_preprocessors() -> tuple[dict[str, Any], dict[str, tuple[str, ...]], Any]:
    """The first-party plugins' preprocessors and file extensions, as a model exposes them."""
    from peace_core import create_model

    model = create_model("tiny", ["vision", "audio", "text"], device="meta")
    names = model.modalities
    preprocessors = {name: model.preprocessor(name) for name in names}
    extensions = {name: tuple(model.spec(name).file_extensions) for name in names}
    return preprocessors, extensions, model


def test_real_plugins_read_the_synthetic_dataset(synth_root: Path) -> None:
    preprocessors, extensions, model = real_preprocessors()
    config = DataConfig(
        datasets=[
            image_dataset(synth_root),
            DatasetConfig(
                name="sounds",
                urls=str(synth_root / "train/audio_text-*.tar"),
                modalities=["audio", "text"],
            ),
        ],
        batch_size=4,
        shuffle_buffer=8,
        epoch_samples=24,
        workers=2,
    )
    data = WebDataLoader(config, preprocessors, extensions)
    batches = list(data)
    assert {b["dataset"] for b in batches} == {"images", "sounds"}
    for batch in batches:
        for modality, collated in batch["modalities"].items():
            expected_keys = set(model.spec(modality).input_keys)
            assert expected_keys <= set(collated), (modality, sorted(collated))
            assert all(v.shape[0] == 4 for v in collated.values() if isinstance(v, torch.Tensor))
    assert data.stats.bad_total == 0, data.stats.summary()
    assert json.loads(json.dumps(data.stats.as_dict()))


def test_real_plugins_bad_samples_are_counted(planted_shards: dict[str, Path]) -> None:
    preprocessors, extensions, _ = real_preprocessors()
    config = DataConfig(
        datasets=[
            DatasetConfig(
                name="images", urls=str(planted_shards["images"]), modalities=["vision", "text"]
            ),
            DatasetConfig(
                name="sounds", urls=str(planted_shards["sounds"]), modalities=["audio", "text"]
            ),
        ],
        batch_size=3,
        shuffle_buffer=0,
        workers=0,
        max_bad_fraction=0.5,
    )
    data = WebDataLoader(config, preprocessors, extensions, train=False)
    seen = {m["key"] for batch in data for m in batch["meta"]}
    assert {f"img{i:03d}" for i in range(10)} <= seen
    assert not {"corrupt", "nocaption", "jsonnocaption", "truncated", "badjson"} & seen
    images, sounds = data.stats.counts("images"), data.stats.counts("sounds")
    assert images.bad["undecodable jpg"] == 1 and images.bad["missing text"] == 2
    assert images.bad["invalid json"] == 1
    assert dict(sounds.bad) == {"undecodable flac": 1}


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_kind_of_data_fault_is_skipped_and_counted_exactly(tmp_path: Path) -> None:
    """One run over shards holding each fault the issue lists, through the real plugins."""
    images = [{"__key__": f"img{i}", "jpg": _jpg(i), "txt": b"a picture"} for i in range(4)]
    images += [
        {"__key__": "png_ok", "png": _png(1), "txt": b"a png"},
        {"__key__": "bad_jpg", "jpg": b"\xff\xd8 not a jpeg", "txt": b"x"},
        {"__key__": "bad_png", "png": b"\x89PNG\r\n\x1a\n broken", "txt": b"x"},
        {"__key__": "empty_jpg", "jpg": b"", "txt": b"x"},
        {"__key__": "empty_txt", "jpg": _jpg(50), "txt": b""},
        {"__key__": "json_wrong_type", "jpg": _jpg(51), "json": b'{"caption": 5}'},
        {"__key__": "json_list", "jpg": _jpg(52), "json": b'{"caption": ["a", "b"]}'},
        {"__key__": "no_image", "txt": b"only a caption"},
        {"__key__": "no_caption", "jpg": _jpg(53)},
    ]
    sounds = [{"__key__": f"snd{i}", "flac": _flac(i), "txt": b"a sound"} for i in range(3)]
    flac = _flac(9)
    sounds += [
        {"__key__": "bad_flac", "flac": flac[: len(flac) // 3], "txt": b"x"},
        {"__key__": "empty_flac", "flac": b"", "txt": b"x"},
    ]
    write_shard(tmp_path / "images-0.tar", images)
    write_shard(tmp_path / "sounds-0.tar", sounds)
    # A truncated shard: two good samples, then the archive ends inside the third.
    write_shard(tmp_path / "whole.tar", images[:4])
    with tarfile.open(tmp_path / "whole.tar") as archive:
        cut = archive.getmembers()[4].offset_data + 10
    (tmp_path / "images-1.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:cut])
    # Shards that exist when the run is configured, then vanish or cannot be read.
    write_shard(tmp_path / "images-2.tar", images[:2])
    write_shard(tmp_path / "images-3.tar", images[:2])
    image_urls = [str(tmp_path / f"images-{i}.tar") for i in range(4)]
    config = DataConfig(
        datasets=[
            DatasetConfig(name="images", urls=image_urls, modalities=["vision", "text"]),
            DatasetConfig(
                name="sounds", urls=str(tmp_path / "sounds-0.tar"), modalities=["audio", "text"]
            ),
        ],
        batch_size=2,
        shuffle_buffer=0,
        workers=0,
        max_bad_fraction=0.9,
    )
    preprocessors, extensions, _ = real_preprocessors()
    data = WebDataLoader(config, preprocessors, extensions, train=False)
    (tmp_path / "images-2.tar").unlink()
    (tmp_path / "images-3.tar").unlink()
    (tmp_path / "images-3.tar").mkdir()  # present, but not a readable file

    seen = sorted(m["key"] for batch in data for m in batch["meta"])
    # images-0: 4 jpg + 1 png + a caption list; images-1: the 2 samples before the cut.
    expected = ["img0", "img1", "img2", "img3", "png_ok", "json_list", "img0", "img1"]
    assert seen == sorted([*expected, "snd0", "snd1", "snd2"])
    images, sounds = data.stats.counts("images"), data.stats.counts("sounds")
    assert images.ok == 8 and sounds.ok == 3
    assert dict(images.bad) == {
        "undecodable jpg": 1,
        "undecodable png": 1,
        "empty jpg": 1,
        "empty txt": 1,
        "missing text": 2,  # a caption of the wrong type in the json; no caption at all
        "missing vision": 1,
        "unreadable shard": 3,  # truncated, vanished, a directory
    }
    assert dict(sounds.bad) == {"undecodable flac": 1, "empty flac": 1}
    shards = " ".join(images.examples["unreadable shard"])
    for name, what in (
        ("images-1.tar", "unexpected end of data"),
        ("images-2.tar", "No such file"),
        ("images-3.tar", "Is a directory"),
    ):
        assert name in shards and what in shards
    assert "json_wrong_type" in " ".join(images.examples["missing text"])
    assert "data images: 8 ok, 10 skipped" in data.stats.summary()
