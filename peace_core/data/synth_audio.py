"""Synthetic sounds: tones, chirps, beeps, bursts of static, clicks and sirens over background
noise.

A sound is (kind, pitch, count, length, loudness, and a direction for chirps). The class for
zero-shot classification is the kind; captions always name it, and the other attributes with a
given probability, with varied wording.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile

SAMPLE_RATE = 16_000

#: Sound kinds are the classes; their order fixes the class labels.
KINDS = ("tone", "chirp", "beeps", "static", "clicks", "siren")
#: Kinds made of separate events, with the event counts they may have.
COUNTED_KINDS: dict[str, tuple[int, ...]] = {
    "beeps": (1, 2, 3, 4),
    "static": (1, 2, 3),
    "clicks": (2, 3, 4, 5),
}
#: Base frequency ranges in Hz.
PITCHES: dict[str, tuple[float, float]] = {
    "low": (150.0, 300.0),
    "mid": (450.0, 800.0),
    "high": (1300.0, 2400.0),
}
#: Peak amplitude ranges.
LOUDNESS: dict[str, tuple[float, float]] = {"quiet": (0.12, 0.22), "loud": (0.55, 0.8)}
#: Event durations in seconds: (for continuous kinds, for one event of a counted kind).
LENGTHS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "short": ((0.35, 0.6), (0.06, 0.12)),
    "long": ((0.9, 1.4), (0.18, 0.28)),
}
DIRECTIONS = ("rising", "falling")

#: (singular, plural) nouns per kind.
NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "tone": (("tone", "tones"), ("pure tone", "pure tones"), ("steady tone", "steady tones")),
    "chirp": (("chirp", "chirps"), ("sweep", "sweeps"), ("glide", "glides")),
    "beeps": (("beep", "beeps"), ("bleep", "bleeps")),
    # Not "noise": every caption may mention the background noise, so the word names no kind.
    "static": (("burst of static", "bursts of static"), ("static burst", "static bursts")),
    "clicks": (("click", "clicks"), ("tick", "ticks"), ("knock", "knocks")),
    "siren": (("siren", "sirens"), ("wailing siren", "wailing sirens")),
}
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "pitch": {
        "low": ("low", "low-pitched", "deep"),
        "mid": ("medium-pitched", "mid-range", "middle-pitched"),
        "high": ("high", "high-pitched", "shrill"),
    },
    "loudness": {"quiet": ("quiet", "soft", "faint"), "loud": ("loud", "strong", "powerful")},
    "length": {"short": ("short", "brief", "quick"), "long": ("long", "sustained", "drawn-out")},
    "direction": {"rising": ("rising", "upward"), "falling": ("falling", "downward")},
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

#: Caption frames around a noun phrase ``{sound}`` ("a short loud tone", "three beeps").
CAPTION_FRAMES = (
    "{sound}.",
    "the sound of {sound}.",
    "you can hear {sound}.",
    "a recording of {sound}.",
    "{sound} over background noise.",
    "{sound} can be heard.",
)
#: Frames naming the pitch, loudness and/or length after the noun ("a tone, loud and short").
PREDICATE_FRAMES = (
    "{sound}, {details}.",
    "the sound of {sound} that {verb} {details}.",
    "{sound}: {details}.",
)

PROMPT_TEMPLATES = (
    "this is a sound of {}.",
    "the sound of {}.",
    "a recording of {}.",
    "{} can be heard.",
    "an audio clip of {}.",
)


@dataclass(frozen=True)
class Sound:
    kind: str
    pitch: str
    count: int
    length: str
    loudness: str
    direction: str | None = None  # chirps only

    @property
    def label(self) -> int:
        return KINDS.index(self.kind)

    def metadata(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "pitch": self.pitch,
            "count": self.count,
            "length": self.length,
            "loudness": self.loudness,
            "direction": self.direction,
            "class": self.kind,
            "label": self.label,
        }


def random_sound(rng: np.random.Generator, kind: str | None = None) -> Sound:
    kind = kind if kind is not None else str(rng.choice(KINDS))
    if kind not in KINDS:
        raise ValueError(f"unknown sound kind {kind!r}; expected one of {KINDS}")
    return Sound(
        kind=kind,
        pitch=str(rng.choice(list(PITCHES))),
        count=int(rng.choice(COUNTED_KINDS[kind])) if kind in COUNTED_KINDS else 1,
        length=str(rng.choice(list(LENGTHS))),
        loudness=str(rng.choice(list(LOUDNESS))),
        direction=str(rng.choice(DIRECTIONS)) if kind == "chirp" else None,
    )


def sound_caption(sound: Sound, rng: np.random.Generator, detail: float = 1.0) -> str:
    """A caption that always names the kind of sound, and each other attribute (pitch, loudness,
    length, event count, chirp direction) with probability ``detail``, in a random frame with
    random synonyms (see :func:`peace_core.data.synth_image.image_caption` for why partial)."""
    words = {
        attribute: str(rng.choice(SYNONYMS[attribute][getattr(sound, attribute)]))
        for attribute in ("pitch", "loudness", "length")
    }
    named = {a: bool(rng.random() < detail) for a in ("length", "loudness", "pitch", "more")}
    singular, plural = NOUNS[sound.kind][int(rng.integers(len(NOUNS[sound.kind])))]
    if sound.direction is not None and named["more"]:
        adjective = str(rng.choice(SYNONYMS["direction"][sound.direction]))
        singular, plural = f"{adjective} {singular}", f"{adjective} {plural}"
    details = [words[a] for a in ("length", "loudness", "pitch") if named[a]]
    predicative = bool(details) and rng.random() < 0.3
    adjectives = "" if predicative else "".join(f"{word} " for word in details)
    if sound.count > 1:
        count = COUNT_WORDS[sound.count] if named["more"] else "some"
        phrase, verb = f"{count} {adjectives}{plural}", "are"
    else:
        single = sound.kind in COUNTED_KINDS and named["more"]
        article = str(rng.choice(("a single", "one"))) if single else "a"
        phrase, verb = f"{article} {adjectives}{singular}", "is"
    if predicative:
        frame = str(rng.choice(PREDICATE_FRAMES))
        text = frame.format(sound=phrase, verb=verb, details=" and ".join(details))
    else:
        text = str(rng.choice(CAPTION_FRAMES)).format(sound=phrase)
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)
    return text[0].upper() + text[1:]


def _envelope(length: int, fade: int) -> np.ndarray:
    """Flat with short linear fades, so events start and stop without clicks."""
    fade = max(1, min(fade, length // 2))
    envelope = np.ones(length, dtype=np.float64)
    ramp = np.linspace(0.0, 1.0, fade)
    envelope[:fade] = ramp
    envelope[length - fade :] = ramp[::-1]
    return envelope


def _event(sound: Sound, rng: np.random.Generator, seconds: float, base: float) -> np.ndarray:
    """One event of ``seconds`` at base frequency ``base``, peak 1."""
    n = max(2, round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    if sound.kind in ("tone", "beeps"):
        wave = np.sin(2 * np.pi * base * t) + 0.25 * np.sin(4 * np.pi * base * t)
    elif sound.kind == "chirp":
        start, end = (base, base * 3) if sound.direction == "rising" else (base * 3, base)
        freq = start * (end / start) ** (t / t[-1])  # exponential sweep
        wave = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)
    elif sound.kind == "siren":
        rate = rng.uniform(2.0, 5.0)
        freq = base * (1 + 0.3 * np.sin(2 * np.pi * rate * t))
        wave = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)
    elif sound.kind == "static":  # white noise ring-modulated around the base frequency
        wave = rng.normal(0, 1, n) * (0.5 + 0.5 * np.sin(2 * np.pi * base * t))
    elif sound.kind == "clicks":  # a struck, quickly decaying partial
        wave = np.sin(2 * np.pi * base * t) * np.exp(-t / 0.015)
    else:
        raise ValueError(f"unknown sound kind {sound.kind!r}")
    wave = wave * _envelope(n, SAMPLE_RATE // 200)
    return wave / max(np.abs(wave).max(), 1e-9)


def render_sound(sound: Sound, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 at 16 kHz, 1–2 s: the events placed at random, over background noise."""
    base = rng.uniform(*PITCHES[sound.pitch])
    peak = rng.uniform(*LOUDNESS[sound.loudness])
    continuous, counted = LENGTHS[sound.length]
    if sound.kind in COUNTED_KINDS:
        seconds = rng.uniform(*counted)
        gap = rng.uniform(0.08, 0.18)
        events = [_event(sound, rng, seconds, base) for _ in range(sound.count)]
        span = sum(len(e) for e in events) + round(gap * SAMPLE_RATE) * (sound.count - 1)
    else:
        events = [_event(sound, rng, rng.uniform(*continuous), base)]
        gap = 0.0
        span = len(events[0])
    # Usually 1-2 s; a few long click trains need a little more room.
    total = max(round(rng.uniform(1.0, 2.0) * SAMPLE_RATE), span + SAMPLE_RATE // 20)
    clip = rng.normal(0, rng.uniform(0.004, 0.02), total)
    start = int(rng.integers(0, max(1, total - span)))
    for event in events:
        clip[start : start + len(event)] += peak * event
        start += len(event) + round(gap * SAMPLE_RATE)
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def encode_flac(wave: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
