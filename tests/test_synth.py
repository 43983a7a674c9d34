"""The synthetic dataset: determinism, layout, counts, captions that match their metadata."""

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
import soundfile
from PIL import Image

from peace_core.cli import main
from peace_core.data import SynthConfig, synthesize
from peace_core.data import synth_audio as audio
from peace_core.data import synth_image as image
from peace_core.data.synth import brace_pattern, image_sample, sound_sample, text_sample

SMALL = SynthConfig(
    seed=7,
    train_images=30,
    train_sounds=18,
    texts=20,
    test_images=12,
    test_sounds=12,
    image_sounds=10,
    image_size=48,
    shard_size=8,
)


def read_samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: payload}} of one tar shard, in file order."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(shard) as archive:
        for member in archive.getmembers():
            key, extension = member.name.split(".", 1)
            samples[key][extension] = archive.extractfile(member).read()
    return dict(samples)


def read_dataset(root: Path, manifest: dict[str, Any], name: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["datasets"][name]["shards"]:
        samples.update(read_samples(root / shard))
    return samples


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("synth")
    return root, synthesize(root, SMALL, jobs=2)


def test_layout_counts_and_keys(made: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = made
    expected = {
        "train/image_text": (30, {"jpg", "txt", "json"}),
        "train/audio_text": (18, {"flac", "txt", "json"}),
        "train/text": (20, {"txt", "json"}),
        "train/image_audio": (10, {"jpg", "flac", "json"}),
        "test/image_text": (12, {"jpg", "txt", "json"}),
        "test/audio_text": (12, {"flac", "txt", "json"}),
    }
    assert set(manifest["datasets"]) == set(expected)
    for name, (count, extensions) in expected.items():
        entry = manifest["datasets"][name]
        assert entry["count"] == count
        assert len(entry["shards"]) == -(-count // 8)  # shard_size 8
        split, kind = name.split("/")
        assert entry["shards"][0] == f"{split}/{kind}-000000.tar"
        samples = read_dataset(root, manifest, name)
        assert len(samples) == count
        assert all(set(payloads) == extensions for payloads in samples.values())
        assert all("." not in key for key in samples)  # webdataset splits keys at the first dot
    saved = json.loads((root / "manifest.json").read_text())
    assert saved == manifest and saved["seed"] == 7 and saved["config"]["image_size"] == 48


def test_brace_pattern_expands_back_to_the_shards(made: tuple[Path, dict[str, Any]]) -> None:
    from peace_core.data import expand_shards

    root, manifest = made
    entry = manifest["datasets"]["train/image_text"]
    assert entry["urls"] == "train/image_text-{000000..000003}.tar"
    assert expand_shards(str(root / entry["urls"])) == [str(root / s) for s in entry["shards"]]
    assert brace_pattern(["a/x-000000.tar"]) == "a/x-000000.tar"


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    config = SMALL.model_copy(update={"train_images": 10, "train_sounds": 6, "texts": 6})
    first = synthesize(tmp_path / "a", config, jobs=1)
    second = synthesize(tmp_path / "b", config, jobs=2)
    other = synthesize(tmp_path / "c", config.model_copy(update={"seed": 8}), jobs=1)
    for name in first["datasets"]:
        a = read_dataset(tmp_path / "a", first, name)
        b = read_dataset(tmp_path / "b", second, name)
        c = read_dataset(tmp_path / "c", other, name)
        assert a == b, name
        assert a.keys() == c.keys()
        for key in a:  # every media file and caption differs with the seed (json may repeat)
            for extension in set(a[key]) - {"json"}:
                assert a[key][extension] != c[key][extension], (name, key, extension)
        for shard in first["datasets"][name]["shards"]:  # the tar files themselves, too
            assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_a_sample_does_not_depend_on_how_many_are_made() -> None:
    small = SMALL.model_copy(update={"train_images": 3})
    assert image_sample(small, "train", 2) == image_sample(SMALL, "train", 2)
    assert sound_sample(small, "test", 5) == sound_sample(SMALL, "test", 5)
    assert image_sample(SMALL, "train", 2) != image_sample(SMALL, "test", 2)


def _mentions(caption: str, words: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(word)}\b", caption.lower()) for word in words)


def _image_words_check(caption: str, meta: dict[str, Any], *, complete: bool) -> set[str]:
    """Asserts the caption names the shape and no wrong attribute value; returns the attributes
    it names (all of them when ``complete``)."""
    named = set()
    for attribute, synonyms in image.SYNONYMS.items():
        wrong = tuple(w for value, ws in synonyms.items() if value != meta[attribute] for w in ws)
        assert not _mentions(caption, wrong), (attribute, caption)
        if _mentions(caption, synonyms[meta[attribute]]):
            named.add(attribute)
    assert "shape" in named, caption
    if complete:
        assert named == set(image.SYNONYMS), caption
    return named


def test_image_captions_name_the_attributes_in_the_json(made: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = made
    captions = set()
    named: Counter[str] = Counter()
    for name in ("train/image_text", "test/image_text"):
        for sample in read_dataset(root, manifest, name).values():
            meta = json.loads(sample["json"])
            caption = sample["txt"].decode()
            captions.add(caption)
            named.update(_image_words_check(caption, meta, complete=False))
            assert meta["class"] == meta["shape"]
            assert meta["label"] == image.SHAPES.index(meta["shape"])
            pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])))
            assert pixels.shape == (48, 48, 3)
    assert len(captions) > 30  # varied: few captions alike, even for similar scenes
    # caption_detail 0.5: each attribute besides the shape is named in about half the captions
    assert named["shape"] == 42
    assert all(8 <= named[a] <= 34 for a in ("colour", "size", "position")), named


def test_a_class_name_appears_only_in_captions_of_its_class(
    made: tuple[Path, dict[str, Any]],
) -> None:
    # Zero-shot prompts fill in the class names: a name that other captions use too (as "noise"
    # in "over background noise") would tell the classes apart by nothing.
    root, manifest = made
    for name, classes in (("image_text", image.SHAPES), ("audio_text", audio.KINDS)):
        for split in ("train", "test"):
            for sample in read_dataset(root, manifest, f"{split}/{name}").values():
                meta = json.loads(sample["json"])
                others = tuple(c for c in classes if c != meta["class"])
                assert not _mentions(sample["txt"].decode(), others), sample["txt"]


@pytest.mark.parametrize("detail", [0.0, 1.0])
def test_caption_detail_bounds_what_captions_name(detail: float) -> None:
    rng = np.random.default_rng(3)
    for _ in range(40):
        scene = image.random_scene(rng)
        caption = image.image_caption(scene, rng, detail)
        named = _image_words_check(caption, scene.metadata(), complete=detail == 1.0)
        assert detail == 1.0 or named == {"shape"}, caption
        sound = audio.random_sound(rng)
        caption = audio.sound_caption(sound, rng, detail)
        for attribute in ("pitch", "loudness", "length"):
            said = _mentions(caption, audio.SYNONYMS[attribute][getattr(sound, attribute)])
            assert said == (detail == 1.0), (attribute, caption)


def test_caption_detail_is_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="caption_detail"):
        SynthConfig(caption_detail=1.5)


def test_image_shows_the_shape_in_its_colour_at_its_position() -> None:
    scene = image.Scene(shape="square", colour="blue", position="left", size="large")
    pixels = image.render_scene(scene, np.random.default_rng(0), 64).astype(float)
    blue = np.asarray(image.COLOURS["blue"], dtype=float)
    close = np.linalg.norm(pixels - blue, axis=-1) < 60
    ys, xs = np.nonzero(close)
    assert close.sum() > 200  # a large square of ~26 px side
    assert xs.mean() < 26 and 22 < ys.mean() < 42  # left, vertically centred


def test_sound_captions_name_the_attributes_in_the_json(made: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = made
    for name in ("train/audio_text", "test/audio_text"):
        for key, sample in read_dataset(root, manifest, name).items():
            meta = json.loads(sample["json"])
            caption = sample["txt"].decode()
            nouns = tuple(noun for pair in audio.NOUNS[meta["kind"]] for noun in pair)
            assert _mentions(caption, nouns), (key, caption)
            for attribute in ("pitch", "loudness", "length"):
                wrong = tuple(
                    word
                    for value, words in audio.SYNONYMS[attribute].items()
                    if value != meta[attribute]
                    for word in words
                )
                assert not _mentions(caption, wrong), (key, attribute, caption)
            wrong_counts = tuple(w for n, w in audio.COUNT_WORDS.items() if n != meta["count"])
            assert not _mentions(caption, wrong_counts), (key, caption)
            if meta["direction"] is not None:
                other = "falling" if meta["direction"] == "rising" else "rising"
                assert not _mentions(caption, audio.SYNONYMS["direction"][other]), caption
            assert (
                meta["label"] == audio.KINDS.index(meta["kind"]) and meta["class"] == meta["kind"]
            )

            wave, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
            assert rate == 16000 and wave.ndim == 1
            assert 1.0 <= len(wave) / rate <= 2.3
            assert abs(len(wave) / rate - meta["seconds"]) < 1e-3
            assert np.abs(wave).max() > 0.1  # the event is there, above the background noise


def test_loud_sounds_are_louder_and_high_pitches_higher() -> None:
    rng = np.random.default_rng(0)

    def render(**fields: Any) -> np.ndarray:
        sound = audio.Sound(kind="tone", count=1, length="long", **fields)
        return audio.render_sound(sound, rng)

    quiet, loud = render(pitch="mid", loudness="quiet"), render(pitch="mid", loudness="loud")
    assert np.abs(loud).max() > 2 * np.abs(quiet).max()

    def dominant_hz(wave: np.ndarray) -> float:
        spectrum = np.abs(np.fft.rfft(wave))
        return float(np.argmax(spectrum) * audio.SAMPLE_RATE / len(wave))

    low, high = render(pitch="low", loudness="loud"), render(pitch="high", loudness="loud")
    assert dominant_hz(low) < 320 < 1250 < dominant_hz(high)


def test_counted_sounds_have_that_many_events() -> None:
    rng = np.random.default_rng(1)
    for count in (2, 3, 4):
        sound = audio.Sound(kind="beeps", pitch="mid", count=count, length="short", loudness="loud")
        wave = audio.render_sound(sound, rng)
        loud = np.flatnonzero(np.abs(wave) > 0.3)
        # Within a beep, loud samples are a period apart at most; beeps are >= 80 ms apart.
        events = 1 + int((np.diff(loud) > 0.04 * audio.SAMPLE_RATE).sum())
        assert events == count


def test_classes_are_balanced_and_match_the_prompts(made: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = made
    vision = json.loads((root / "prompts/vision.json").read_text())
    sound = json.loads((root / "prompts/audio.json").read_text())
    assert vision["classes"] == list(image.SHAPES) and sound["classes"] == list(audio.KINDS)
    assert all("{}" in t for t in vision["templates"] + sound["templates"])
    assert "this is a sound of {}." in sound["templates"]
    assert manifest["prompts"] == {"vision": "prompts/vision.json", "audio": "prompts/audio.json"}
    for name, prompts in (("test/image_text", vision), ("test/audio_text", sound)):
        labels = Counter(
            json.loads(s["json"])["class"] for s in read_dataset(root, manifest, name).values()
        )
        assert set(labels) == set(prompts["classes"])
        assert max(labels.values()) - min(labels.values()) <= 1


def test_text_only_captions_describe_images_and_sounds(made: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = made
    samples = read_dataset(root, manifest, "train/text")
    kinds = Counter(json.loads(s["json"])["describes"] for s in samples.values())
    assert kinds == {"image": 10, "sound": 10}
    assert all(s["txt"].decode().strip() for s in samples.values())
    assert text_sample(SMALL, "train", 4) == text_sample(SMALL, "train", 4)


def test_png_and_image_size_options(tmp_path: Path) -> None:
    config = SynthConfig(
        train_images=2,
        train_sounds=0,
        texts=0,
        test_images=0,
        test_sounds=0,
        image_size=20,
        image_format="png",
    )
    manifest = synthesize(tmp_path, config, jobs=1)
    (sample,) = list(read_dataset(tmp_path, manifest, "train/image_text").values())[:1]
    assert set(sample) == {"png", "txt", "json"}
    assert Image.open(io.BytesIO(sample["png"])).size == (20, 20)
    assert manifest["datasets"]["train/audio_text"] == {"count": 0, "shards": [], "urls": ""}


def test_refuses_to_overwrite_unless_asked_and_then_removes_stale_shards(tmp_path: Path) -> None:
    config = SMALL.model_copy(
        update={"train_images": 20, "train_sounds": 0, "texts": 0, "image_sounds": 0}
    )
    synthesize(tmp_path, config, jobs=1)
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds a synthetic dataset"):
        synthesize(tmp_path, config, jobs=1)
    fewer = config.model_copy(update={"train_images": 5})
    manifest = synthesize(tmp_path, fewer, overwrite=True, jobs=1)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["image_text-000000.tar"]
    assert manifest["datasets"]["train/image_text"]["count"] == 5
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_config_validation() -> None:
    with pytest.raises(pydantic.ValidationError, match="train_images"):
        SynthConfig(train_images=-1)
    with pytest.raises(pydantic.ValidationError, match="image_fromat"):
        SynthConfig(image_fromat="png")
    with pytest.raises(ValueError, match="unknown sound kind 'bark'"):
        audio.random_sound(np.random.default_rng(0), "bark")


def test_cli_writes_the_dataset_and_reports_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = [
        "data",
        "synth",
        str(out),
        "--seed",
        "2",
        "--train-images",
        "4",
        "--train-sounds",
        "3",
        "--test-images",
        "2",
        "--test-sounds",
        "2",
        "--texts",
        "5",
        "--jobs",
        "1",
    ]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 2 and manifest["datasets"]["train/text"]["count"] == 5
    assert "train/image_text" in capsys.readouterr().out

    assert main(args) == 1  # already there
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["data", "synth", str(out), "--overwrite", "--texts", "-3"]) == 1
    assert "texts" in capsys.readouterr().err


def test_class_subsets_choose_what_is_drawn_and_prompted(tmp_path: Path) -> None:
    config = SynthConfig(
        seed=9,
        train_images=8,
        train_sounds=6,
        test_images=0,
        test_sounds=0,
        texts=6,
        image_classes=["star", "cross"],
        sound_classes=["siren", "tone", "clicks"],
    )
    manifest = synthesize(tmp_path, config, jobs=1)
    assert manifest["classes"] == {
        "vision": ["star", "cross"],
        "audio": ["siren", "tone", "clicks"],
    }

    def metadata(name: str) -> list[dict[str, Any]]:
        return [json.loads(s["json"]) for s in read_dataset(tmp_path, manifest, name).values()]

    prompts = json.loads((tmp_path / "prompts" / "vision.json").read_text())
    assert prompts["classes"] == ["star", "cross"]
    shapes = [meta["shape"] for meta in metadata("train/image_text")]
    assert shapes == ["star", "cross"] * 4
    kinds = [meta["kind"] for meta in metadata("train/audio_text")]
    assert kinds == ["siren", "tone", "clicks"] * 2
    for meta in metadata("train/text"):
        assert meta.get("shape", "star") in ("star", "cross")
        assert meta.get("kind", "tone") in ("siren", "tone", "clicks")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_classes", ["star", "blob"], "unknown"),
        ("sound_classes", ["tone"], "at least two distinct"),
        ("image_classes", ["star", "star"], "at least two distinct"),
    ],
)
def test_class_subsets_are_validated(field: str, value: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(**{field: value})


def test_image_sound_pairs_go_class_with_class(made: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = made
    samples = {}
    for shard in manifest["datasets"]["train/image_audio"]["shards"]:
        samples.update(read_samples(root / shard))
    assert len(samples) == 10
    shapes, kinds = list(SMALL.image_classes), list(SMALL.sound_classes)
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert kinds.index(meta["sound"]["kind"]) == shapes.index(meta["image"]["shape"]), key
