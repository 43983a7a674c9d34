"""The synthetic IMU dataset: layout, determinism, disjoint subjects, balance, overwrite safety,
option checks, physical sanity, and activities told apart by their dynamics across people."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest

from peace_imu import synth

SMALL = synth.ImuSynthOptions(
    seed=5,
    train_windows=30,
    test_windows=14,
    train_subjects=4,
    test_subjects=2,
    min_seconds=2.0,
    max_seconds=4.0,
    shard_size=8,
)


def read_samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: payload}} of one tar shard, in file order."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, _, extension = member.name.partition(".")
            payload = tar.extractfile(member)
            assert payload is not None
            samples[key][extension] = payload.read()
    return dict(samples)


def split_samples(root: Path, manifest: dict[str, Any], split: str) -> dict[str, dict[str, Any]]:
    """{key: {"data", "caption", "meta"}} of one split, decoded."""
    out = {}
    for shard in manifest["datasets"][f"{split}/imu_text"]["shards"]:
        for key, parts in read_samples(root / shard).items():
            out[key] = {
                "data": np.load(io.BytesIO(parts["npy"]), allow_pickle=False),
                "caption": parts["txt"].decode("utf-8"),
                "meta": json.loads(parts["json"]),
                "extensions": set(parts),
            }
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("imu")
    return root, synth.generate(root, SMALL)


def test_layout_manifest_and_samples(small: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = small
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["format"] == synth.MANIFEST_FORMAT
    assert manifest["seed"] == 5 and manifest["rate"] == 50.0
    assert synth.ImuSynthOptions(**manifest["options"]) == SMALL
    assert manifest["prompts"] == {"imu": "prompts/imu.json"}
    words = ["walking", "running", "cycling", "climbing stairs", "jumping", "sitting still"]
    assert manifest["classes"] == {"imu": words}
    assert manifest["subjects"] == {"train": [0, 1, 2, 3], "test": [4, 5]}
    train, test = manifest["datasets"]["train/imu_text"], manifest["datasets"]["test/imu_text"]
    assert (train["count"], test["count"]) == (30, 14)
    assert train["shards"] == [f"train/imu_text-{i:06d}.tar" for i in range(4)]
    assert train["urls"] == "train/imu_text-{000000..000003}.tar"
    assert test["urls"] == "test/imu_text-{000000..000001}.tar"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(
        [*train["shards"], *test["shards"], "prompts/imu.json", "manifest.json"]
    )
    prompts = json.loads((root / "prompts" / "imu.json").read_text())
    assert prompts["classes"] == words
    assert prompts["templates"] and all(t.count("{}") == 1 for t in prompts["templates"])

    for split, count in (("train", 30), ("test", 14)):
        samples = split_samples(root, manifest, split)
        assert list(samples) == [f"{split}_imu_{i:07d}" for i in range(count)]
        for index, sample in enumerate(samples.values()):
            data, meta = sample["data"], sample["meta"]
            assert sample["extensions"] == {"npy", "txt", "json"}
            assert data.dtype == np.float32 and data.ndim == 2 and data.shape[1] == 6
            assert np.isfinite(data).all()
            assert data.shape[0] == meta["samples"] == round(meta["seconds"] * 50)
            assert 2.0 * 50 - 1 <= data.shape[0] <= 4.0 * 50 + 1
            assert meta["label"] == index % 6 and meta["class"] == words[meta["label"]]
            assert meta["rate"] == 50.0 and meta["split"] == split
            assert meta["channels"] == ["ax", "ay", "az", "gx", "gy", "gz"]
            assert {"cadence_scale", "amplitude_scale", "mount_degrees"} <= set(
                meta["subject_params"]
            )
            assert sample["caption"] and sample["caption"][0].isupper()


def test_same_seed_same_bytes_and_samples_do_not_depend_on_counts(
    small: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, manifest = small
    again = synth.generate(tmp_path / "again", SMALL)
    assert again == manifest
    for path in root.rglob("*"):
        if path.is_file():
            assert (tmp_path / "again" / path.relative_to(root)).read_bytes() == path.read_bytes()

    more = SMALL.model_copy(update={"train_windows": 200, "test_windows": 3, "shard_size": 50})
    for split, index in (("train", 3), ("train", 29), ("test", 2)):
        assert synth.sample(more, split, index) == synth.sample(SMALL, split, index)
    stored = read_samples(root / "train" / "imu_text-000000.tar")["train_imu_0000003"]
    assert stored == {k: v for k, v in synth.sample(more, "train", 3).items() if k != "__key__"}

    other = synth.sample(SMALL.model_copy(update={"seed": 6}), "train", 3)
    assert other["npy"] != synth.sample(SMALL, "train", 3)["npy"]


def test_subjects_are_disjoint_and_every_subject_does_every_activity() -> None:
    options = synth.ImuSynthOptions(train_subjects=5, test_subjects=3)
    seen: dict[str, Counter[tuple[int, int]]] = {}
    for split, count in (("train", 60), ("test", 36)):
        seen[split] = Counter(
            (synth.window_subject(options, split, i), i % len(options.activities))
            for i in range(count)
        )
    train_ids = {subject for subject, _ in seen["train"]}
    test_ids = {subject for subject, _ in seen["test"]}
    assert train_ids == set(range(5)) and test_ids == {5, 6, 7}
    assert not train_ids & test_ids
    assert set(seen["train"].values()) == {2} and set(seen["test"].values()) == {2}
    # The subjects recorded in the shards are those, and they are different people.
    metas = [synth.make_window(options, "test", i).metadata for i in range(0, 36, 6)]
    assert {m["subject"] for m in metas} == {5, 6, 7}
    profiles = {s: synth.subject_profile(0, s) for s in range(8)}
    assert len({p.cadence_scale for p in profiles.values()}) == 8
    assert len({p.mount_axis for p in profiles.values()}) == 8


def test_classes_are_balanced(small: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = small
    labels = [s["meta"]["label"] for s in split_samples(root, manifest, "train").values()]
    assert sorted(Counter(labels).values()) == [5] * 6
    options = synth.ImuSynthOptions(activities=["jumping", "sitting", "lying"])
    counts = Counter(synth.make_window(options, "test", i).metadata["class"] for i in range(9))
    assert counts == {"jumping": 3, "sitting still": 3, "lying down": 3}


def test_refuses_to_overwrite_and_cleans_only_its_own_files(tmp_path: Path) -> None:
    options = SMALL.model_copy(update={"train_windows": 20, "test_windows": 6, "shard_size": 5})
    synth.generate(tmp_path, options)
    foreign = [
        tmp_path / "notes.txt",
        tmp_path / "train" / "image_text-000000.tar",
        tmp_path / "prompts" / "vision.json",
        tmp_path / "train" / "imu_text-extra.tar",
    ]
    for path in foreign:
        path.write_text("not ours")
    with pytest.raises(FileExistsError, match="IMU dataset"):
        synth.generate(tmp_path, options)
    assert len(list((tmp_path / "train").glob("imu_text-0*.tar"))) == 4

    fewer = options.model_copy(update={"train_windows": 6})
    manifest = synth.generate(tmp_path, fewer, overwrite=True)
    assert manifest["datasets"]["train/imu_text"]["shards"] == [
        "train/imu_text-000000.tar",
        "train/imu_text-000001.tar",
    ]
    assert sorted(p.name for p in (tmp_path / "train").glob("imu_text-0*.tar")) == [
        "imu_text-000000.tar",
        "imu_text-000001.tar",
    ]
    assert all(path.read_text() == "not ours" for path in foreign)

    # Another generator's manifest is never replaced, overwrite or not.
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text(json.dumps({"format": "peace-synth/1"}))
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="another dataset"):
            synth.generate(elsewhere, options, overwrite=overwrite)
    assert not (elsewhere / "train").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        synth.generate(tmp_path / "file", options)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"activities": ["walking", "swimming"]}, "unknown"),
        ({"activities": ["walking"]}, "at least two"),
        ({"activities": ["walking", "running", "walking"]}, "at least two distinct"),
        ({"activities": ["stairs", "climbing stairs"]}, "at least two distinct"),
        ({"min_seconds": 8.0, "max_seconds": 5.0}, "max_seconds"),
        ({"rate": 5.0}, "rate"),
        ({"train_windows": -1}, "train_windows"),
        ({"test_subjects": 0}, "test_subjects"),
        ({"shard_size": 0}, "shard_size"),
        ({"caption_detail": 1.5}, "caption_detail"),
        ({"windows": 10}, "windows"),
    ],
)
def test_options_are_validated(update: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        synth.ImuSynthOptions(**update)


def test_options_defaults_and_activity_words() -> None:
    options = synth.ImuSynthOptions()
    assert (options.train_windows, options.test_windows, options.rate) == (3000, 600, 50.0)
    assert options.activities == list(synth.DEFAULT_ACTIVITIES)
    words = synth.ImuSynthOptions(activities=["climbing stairs", "lying down", "walking"])
    assert words.activities == ["stairs", "lying", "walking"]
    assert words.class_words() == ["climbing stairs", "lying down", "walking"]


def test_captions_name_the_activity_and_prompts_read_well() -> None:
    options = synth.ImuSynthOptions(activities=list(synth.ACTIVITIES), caption_detail=1.0)
    captions = defaultdict(set)
    for index in range(80):
        window = synth.make_window(options, "train", index)
        activity, text = window.metadata["activity"], window.caption.lower()
        names = synth.PHRASES[activity] + synth.AGENTS.get(activity, ())
        assert any(name in text for name in names), (activity, text)
        assert text.endswith(".") and "  " not in text and not re.search(r"\ba [aeiou]", text)
        captions[activity].add(text)
    assert all(len(texts) >= 8 for texts in captions.values())  # varied wording
    for word in options.class_words():
        for template in synth.PROMPT_TEMPLATES:
            assert template.format(word).count(word) == 1


@pytest.mark.parametrize(("rate", "seconds"), [(10.0, 1.0), (200.0, 1.5), (25.0, 12.0)])
def test_every_activity_at_odd_rates_and_lengths(rate: float, seconds: float) -> None:
    options = synth.ImuSynthOptions(
        activities=list(synth.ACTIVITIES), rate=rate, min_seconds=seconds, max_seconds=seconds
    )
    for index in range(len(synth.ACTIVITIES)):
        window = synth.make_window(options, "train", index)
        assert window.data.shape == (round(seconds * rate), 6)
        assert window.data.dtype == np.float32 and np.isfinite(window.data).all()
        if window.metadata["activity"] == "jumping":
            assert window.metadata["jumps"] >= 1


def dominant_frequency(signal: np.ndarray, rate: float) -> float:
    spectrum = np.abs(np.fft.rfft((signal - signal.mean()) * np.hanning(len(signal))))
    freqs = np.fft.rfftfreq(len(signal), 1.0 / rate)
    band = (freqs >= 0.3) & (freqs <= 8.0)
    return float(freqs[band][np.argmax(spectrum[band])])


def test_physics_gravity_cadence_and_orientation() -> None:
    options = synth.ImuSynthOptions(min_seconds=8.0, max_seconds=10.0)
    sitting_up = []
    for index in range(36):
        window = synth.make_window(options, "train", index)
        accel, gyro = window.data[:, :3].astype(np.float64), window.data[:, 3:]
        meta = window.metadata
        # The mean specific force is gravity: the body goes nowhere up or down on average.
        assert abs(np.linalg.norm(accel.mean(axis=0)) - synth.GRAVITY) < 0.6, meta["activity"]
        if meta["activity"] in ("walking", "running", "stairs"):
            # The vertical trace repeats at the step rate.
            vertical = accel @ (accel.mean(axis=0) / np.linalg.norm(accel.mean(axis=0)))
            found = dominant_frequency(vertical, options.rate)
            assert abs(found - meta["cadence_hz"]) < 0.15 * meta["cadence_hz"], meta
        if meta["activity"] == "sitting":
            assert np.abs(np.linalg.norm(accel, axis=1) - synth.GRAVITY).max() < 1.0
            assert np.sqrt((gyro.astype(np.float64) ** 2).mean()) < 0.1
            sitting_up.append(accel.mean(axis=0) / np.linalg.norm(accel.mean(axis=0)))
        if meta["activity"] == "running":
            assert np.linalg.norm(accel, axis=1).max() > 2 * synth.GRAVITY  # foot strikes
            assert np.linalg.norm(accel, axis=1).min() < 0.5 * synth.GRAVITY  # flight
    # Gravity points a different way for each subject: the sensor sits differently.
    angles = [np.degrees(np.arccos(np.clip(a @ b, -1, 1))) for a in sitting_up for b in sitting_up]
    assert max(angles) > 15.0


def features(data: np.ndarray, rate: float) -> np.ndarray:
    """Hand features that do not need the sensor's orientation, and a few that do."""
    accel, gyro = data[:, :3].astype(np.float64), data[:, 3:].astype(np.float64)
    magnitude = np.linalg.norm(accel, axis=1)
    up = accel.mean(axis=0) / np.linalg.norm(accel.mean(axis=0))
    vertical = accel @ up
    horizontal = accel - np.outer(vertical, up)
    return np.array(
        [
            np.log(magnitude.std() + 1e-3),
            dominant_frequency(magnitude, rate),
            np.mean(magnitude < 0.4 * synth.GRAVITY),
            np.log(magnitude.max() / synth.GRAVITY),
            np.log(np.linalg.norm(gyro, axis=1).mean() + 1e-3),
            np.log(vertical.std() + 1e-3),
            np.log(np.linalg.norm(horizontal - horizontal.mean(axis=0), axis=1).std() + 1e-3),
            *np.log(accel.std(axis=0) + 1e-3),
            *np.log(gyro.std(axis=0) + 1e-3),
        ]
    )


def nearest_centroid(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> tuple[float, float]:
    """(train accuracy, test accuracy) of a nearest-centroid classifier on standardised
    features fitted on the training windows."""
    mean, sd = train_x.mean(axis=0), train_x.std(axis=0) + 1e-9
    train_z, test_z = (train_x - mean) / sd, (test_x - mean) / sd
    classes = np.unique(train_y)
    centroids = np.stack([train_z[train_y == c].mean(axis=0) for c in classes])

    def accuracy(z: np.ndarray, y: np.ndarray) -> float:
        distances = ((z[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
        return float((classes[distances.argmin(axis=1)] == y).mean())

    return accuracy(train_z, train_y), accuracy(test_z, test_y)


def test_activities_separate_by_dynamics_across_subjects() -> None:
    options = synth.ImuSynthOptions(
        seed=11, train_subjects=12, test_subjects=6, min_seconds=4.0, max_seconds=8.0
    )
    train = [synth.make_window(options, "train", i) for i in range(216)]
    test = [synth.make_window(options, "test", i) for i in range(108)]
    train_y = np.array([w.metadata["label"] for w in train])
    test_y = np.array([w.metadata["label"] for w in test])
    assert not {w.metadata["subject"] for w in train} & {w.metadata["subject"] for w in test}

    train_x = np.stack([features(w.data, options.rate) for w in train])
    test_x = np.stack([features(w.data, options.rate) for w in test])
    fit, unseen = nearest_centroid(train_x, train_y, test_x, test_y)
    print(f"hand features, nearest centroid: train {fit:.3f}, unseen subjects {unseen:.3f}")
    assert unseen > 0.7 and fit > 0.7

    # No constant gives it away: the mean of any single raw channel (gravity seen through the
    # posture and the subject's sensor mounting, or a gyroscope bias) is a poor classifier.
    for channel, name in enumerate(synth.CHANNELS):
        means_train = np.array([[w.data[:, channel].mean()] for w in train])
        means_test = np.array([[w.data[:, channel].mean()] for w in test])
        fit, unseen = nearest_centroid(means_train, train_y, means_test, test_y)
        print(f"mean of {name} alone: train {fit:.3f}, unseen subjects {unseen:.3f}")
        assert unseen < 0.6, name
