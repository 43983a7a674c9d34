"""The synthetic dataset of the demo: images and sounds with captions, as webdataset shards.

Layout under ``OUT``::

    train/image_text-000000.tar ...   jpg|png + txt caption + json (shape, colour, ..., label)
    train/audio_text-000000.tar ...   flac + txt caption + json (kind, pitch, count, ..., label)
    train/text-000000.tar ...         txt captions alone (+ json of what they describe)
    train/image_audio-000000.tar ...  jpg|png + flac of one class pair, no caption (only when
                                      image_sounds > 0: pretraining a pair without text)
    test/image_text-*.tar, test/audio_text-*.tar
    prompts/vision.json, prompts/audio.json   {"classes": [...], "templates": [...]}
    manifest.json                     seed, settings, counts, shard lists and brace patterns

Every sample is drawn from its own generator seeded by (seed, split, kind, index): the same seed
gives byte-identical files, and a sample does not depend on how many others are made. Classes
cycle with the index, so every split is balanced.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator
from webdataset import ShardWriter

from peace_core.config import StrictModel
from peace_core.data import synth_audio, synth_image

MANIFEST_FORMAT = "peace-synth/1"
#: Dataset kinds and the splits that have them.
LAYOUT: dict[str, tuple[str, ...]] = {
    "train": ("image_text", "audio_text", "text", "image_audio"),
    "test": ("image_text", "audio_text"),
}
_SPLIT_CODES = {"train": 0, "test": 1}
_KIND_CODES = {"image_text": 0, "audio_text": 1, "text": 2, "image_audio": 3}

Sample = dict[str, Any]


class SynthConfig(StrictModel):
    """How much synthetic data to make, and how."""

    seed: int = Field(0, ge=0)
    train_images: int = Field(2000, ge=0)
    train_sounds: int = Field(2000, ge=0)
    test_images: int = Field(300, ge=0)
    test_sounds: int = Field(300, ge=0)
    texts: int = Field(2000, ge=0, description="text-only training captions")
    image_sounds: int = Field(
        0,
        ge=0,
        description=(
            "training pairs of an image and a sound without caption, the image's shape and the "
            "sound's kind paired by class index (for pretraining vision with audio)"
        ),
    )
    image_size: int = Field(64, ge=16, le=1024, description="side of the square images, pixels")
    image_format: Literal["jpg", "png"] = "jpg"
    caption_detail: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "probability that a caption names each attribute besides the class (the shape or "
            "the kind of sound); 1 names them all"
        ),
    )
    shard_size: int = Field(1000, gt=0, description="samples per shard")
    image_classes: list[str] = Field(
        default_factory=lambda: list(synth_image.SHAPES),
        description="the shapes to draw (the image classes), at least two",
    )
    sound_classes: list[str] = Field(
        default_factory=lambda: list(synth_audio.KINDS),
        description="the kinds of sound to make (the sound classes), at least two",
    )

    @field_validator("image_classes")
    @classmethod
    def _known_shapes(cls, names: list[str]) -> list[str]:
        return _class_subset("image_classes", names, synth_image.SHAPES)

    @field_validator("sound_classes")
    @classmethod
    def _known_kinds(cls, names: list[str]) -> list[str]:
        return _class_subset("sound_classes", names, synth_audio.KINDS)

    def count(self, split: str, kind: str) -> int:
        counts = {
            ("train", "image_text"): self.train_images,
            ("train", "audio_text"): self.train_sounds,
            ("train", "text"): self.texts,
            ("train", "image_audio"): self.image_sounds,
            ("test", "image_text"): self.test_images,
            ("test", "audio_text"): self.test_sounds,
        }
        return counts[(split, kind)]


def _class_subset(field: str, names: list[str], known: tuple[str, ...]) -> list[str]:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{field}: unknown {unknown}; expected names from {list(known)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"{field}: expected at least two distinct names, got {names}")
    return names


def _rng(config: SynthConfig, split: str, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, _SPLIT_CODES[split], _KIND_CODES[kind], index])


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")


def image_sample(config: SynthConfig, split: str, index: int) -> Sample:
    """One image-text sample: ``{"__key__", "jpg"|"png", "txt", "json"}`` (bytes)."""
    rng = _rng(config, split, "image_text", index)
    scene = synth_image.random_scene(rng, config.image_classes[index % len(config.image_classes)])
    pixels = synth_image.render_scene(scene, rng, config.image_size)
    return {
        "__key__": f"{split}_image_{index:07d}",
        config.image_format: synth_image.encode_image(pixels, config.image_format),
        "txt": synth_image.image_caption(scene, rng, config.caption_detail).encode("utf-8"),
        "json": _json(scene.metadata()),
    }


def sound_sample(config: SynthConfig, split: str, index: int) -> Sample:
    """One audio-text sample: ``{"__key__", "flac", "txt", "json"}`` (bytes)."""
    rng = _rng(config, split, "audio_text", index)
    sound = synth_audio.random_sound(rng, config.sound_classes[index % len(config.sound_classes)])
    wave = synth_audio.render_sound(sound, rng)
    metadata = sound.metadata() | {"seconds": round(len(wave) / synth_audio.SAMPLE_RATE, 3)}
    return {
        "__key__": f"{split}_sound_{index:07d}",
        "flac": synth_audio.encode_flac(wave),
        "txt": synth_audio.sound_caption(sound, rng, config.caption_detail).encode("utf-8"),
        "json": _json(metadata),
    }


def text_sample(config: SynthConfig, split: str, index: int) -> Sample:
    """One text-only sample: a caption of an image scene (even index) or a sound (odd index)."""
    rng = _rng(config, split, "text", index)
    if index % 2 == 0:
        scene = synth_image.random_scene(rng, str(rng.choice(config.image_classes)))
        caption = synth_image.image_caption(scene, rng, config.caption_detail)
        metadata = {"describes": "image"} | scene.metadata()
    else:
        sound = synth_audio.random_sound(rng, str(rng.choice(config.sound_classes)))
        caption = synth_audio.sound_caption(sound, rng, config.caption_detail)
        metadata = {"describes": "sound"} | sound.metadata()
    return {
        "__key__": f"{split}_text_{index:07d}",
        "txt": caption.encode("utf-8"),
        "json": _json(metadata),
    }


def image_sound_sample(config: SynthConfig, split: str, index: int) -> Sample:
    """One image-audio pair: ``{"__key__", "jpg"|"png", "flac", "json"}``; class ``i`` of the
    images goes with class ``i`` of the sounds (cycled when their numbers differ)."""
    rng = _rng(config, split, "image_audio", index)
    shape = config.image_classes[index % len(config.image_classes)]
    kind = config.sound_classes[index % len(config.image_classes) % len(config.sound_classes)]
    scene = synth_image.random_scene(rng, shape)
    sound = synth_audio.random_sound(rng, kind)
    return {
        "__key__": f"{split}_pair_{index:07d}",
        config.image_format: synth_image.encode_image(
            synth_image.render_scene(scene, rng, config.image_size), config.image_format
        ),
        "flac": synth_audio.encode_flac(synth_audio.render_sound(sound, rng)),
        "json": _json({"image": scene.metadata(), "sound": sound.metadata()}),
    }


_MAKERS: dict[str, Callable[[SynthConfig, str, int], Sample]] = {
    "image_text": image_sample,
    "audio_text": sound_sample,
    "text": text_sample,
    "image_audio": image_sound_sample,
}


def _our_files(out: Path) -> Iterator[Path]:
    """Files a previous run wrote here (and only those)."""
    for split, kinds in LAYOUT.items():
        for kind in kinds:
            yield from sorted((out / split).glob(f"{kind}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    for name in ("manifest.json", "prompts/vision.json", "prompts/audio.json"):
        if (out / name).exists():
            yield out / name


def _write_shards(out: Path, config: SynthConfig, split: str, kind: str) -> list[str]:
    count = config.count(split, kind)
    if count == 0:
        return []
    written: list[str] = []
    pattern = str(out / split / f"{kind}-%06d.tar")
    with ShardWriter(
        pattern,
        maxcount=config.shard_size,
        verbose=0,
        encoder=False,  # every value is bytes already
        mtime=0,  # reproducible tar headers
        post=lambda name: written.append(Path(name).relative_to(out).as_posix()),
    ) as writer:
        make = _MAKERS[kind]
        for index in range(count):
            writer.write(make(config, split, index))
    return written


def brace_pattern(shards: list[str]) -> str:
    """``train/x-{000000..000003}.tar`` for consecutive shards (a plain path for one)."""
    if len(shards) <= 1:
        return shards[0] if shards else ""
    stem, first = shards[0][: -len("000000.tar")], shards[0][-len("000000.tar") : -len(".tar")]
    last = shards[-1][-len("000000.tar") : -len(".tar")]
    return f"{stem}{{{first}..{last}}}.tar"


def _prompts(config: SynthConfig) -> dict[str, dict[str, list[str]]]:
    return {
        "vision": {
            "classes": list(config.image_classes),
            "templates": list(synth_image.PROMPT_TEMPLATES),
        },
        "audio": {
            "classes": list(config.sound_classes),
            "templates": list(synth_audio.PROMPT_TEMPLATES),
        },
    }


def synthesize(
    out: str | os.PathLike[str],
    config: SynthConfig | None = None,
    *,
    overwrite: bool = False,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Write the synthetic dataset under ``out`` and return its manifest.

    ``jobs`` processes (default: one per CPU) write the datasets in parallel; the files do not
    depend on it.

    Refuses (``FileExistsError``) to write over a previous synthetic dataset unless
    ``overwrite``, which removes that dataset's shards, prompts and manifest first (and nothing
    else in ``out``).
    """
    config = config or SynthConfig()
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a directory")
    previous = list(_our_files(root))
    if previous and not overwrite:
        raise FileExistsError(
            f"{root} already holds a synthetic dataset ({len(previous)} files, e.g. "
            f"{previous[0]}); remove it or pass overwrite"
        )
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    for path in previous:
        path.unlink()
    tasks = [(split, kind) for split, kinds in LAYOUT.items() for kind in kinds]
    for split in LAYOUT:
        (root / split).mkdir(parents=True, exist_ok=True)
    jobs = min(jobs or os.cpu_count() or 1, len(tasks))
    if jobs == 1:
        written = [_write_shards(root, config, split, kind) for split, kind in tasks]
    else:
        # Workers forked from a fresh server, not from this process: a fork copies any lock
        # another thread holds at that moment (torch, gloo and image codecs keep threads).
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [pool.submit(_write_shards, root, config, s, k) for s, k in tasks]
            written = [future.result() for future in futures]
    datasets: dict[str, dict[str, Any]] = {}
    for (split, kind), shards in zip(tasks, written):
        datasets[f"{split}/{kind}"] = {
            "count": config.count(split, kind),
            "shards": shards,
            "urls": brace_pattern(shards),
        }
    (root / "prompts").mkdir(exist_ok=True)
    prompt_files = {}
    for modality, prompts in _prompts(config).items():
        path = root / "prompts" / f"{modality}.json"
        path.write_text(json.dumps(prompts, indent=2) + "\n", encoding="utf-8")
        prompt_files[modality] = path.relative_to(root).as_posix()
    manifest = {
        "format": MANIFEST_FORMAT,
        "seed": config.seed,
        "config": config.model_dump(),
        "sample_rate": synth_audio.SAMPLE_RATE,
        "datasets": datasets,
        "prompts": prompt_files,
        "classes": {modality: p["classes"] for modality, p in _prompts(config).items()},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
