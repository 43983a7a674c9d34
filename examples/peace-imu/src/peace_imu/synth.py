"""Synthetic inertial activity data: accelerometer + gyroscope windows with captions, as
webdataset shards.

Layout under ``OUT``::

    train/imu_text-000000.tar ...   npy window [T, 6] float32 + txt caption + json (class, label,
    test/imu_text-000000.tar ...    subject, rate, seconds, subject and window parameters)
    prompts/imu.json                {"classes": [...], "templates": [...]} for zero-shot
    manifest.json                   format, seed, options, counts, shard lists, brace patterns

A window is ``T = seconds * rate`` samples of six channels ``ax, ay, az`` (specific force in m/s²,
gravity included: a sensor at rest reads +9.81 m/s² pointing up) and ``gx, gy, gz`` (angular
velocity in rad/s), from a sensor worn at the hip. Each activity is a model of how the hip moves:
linear acceleration in a level frame (forward, left, up), body angles (roll, pitch, yaw) about a
posture, gravity turned into the body frame by those angles, the gyroscope as the body rates of
the same angles, then a per-subject mounting rotation, bias and noise.

Subjects differ in cadence, amplitude, gait style, posture, sensor mounting (a rotation of up to
``max_mount_degrees``), noise and bias; windows differ in pace, phase, cadence drift and length.
Train and test windows come from disjoint subjects: ids ``0..train_subjects-1`` train,
``train_subjects..train_subjects+test_subjects-1`` test.

Every window is drawn from its own generator seeded by (seed, split, index) and every subject
from one seeded by (seed, subject), so the same options give byte-identical files and a window
does not depend on how many others are made. Classes cycle with the index (balanced splits);
subjects cycle with ``index // len(activities)`` (each subject does every activity).

Standalone: imports numpy, pydantic, webdataset and the standard library only.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from webdataset import ShardWriter

MANIFEST_FORMAT = "peace-imu-synth/1"
KIND = "imu_text"
MODALITY = "imu"
SPLITS = ("train", "test")
CHANNELS = ("ax", "ay", "az", "gx", "gy", "gz")
UNITS = {"ax": "m/s^2", "ay": "m/s^2", "az": "m/s^2", "gx": "rad/s", "gy": "rad/s", "gz": "rad/s"}
GRAVITY = 9.80665
#: Sensor ranges (±16 g, ±2000 °/s): readings are clipped there, like a real IMU's.
ACCEL_RANGE = 16 * GRAVITY
GYRO_RANGE = math.radians(2000.0)

#: Activity names (option values) and the words that name them in captions and prompts; the
#: order fixes the labels. Options accept either the name or the word.
ACTIVITIES: dict[str, str] = {
    "walking": "walking",
    "running": "running",
    "cycling": "cycling",
    "stairs": "climbing stairs",
    "jumping": "jumping",
    "sitting": "sitting still",
    "standing": "standing",
    "lying": "lying down",
}
#: The default classes: the six told apart by their dynamics. Standing and lying down differ
#: from sitting mainly by posture, which the sensor's mounting blurs; they are opt-in.
DEFAULT_ACTIVITIES = ("walking", "running", "cycling", "stairs", "jumping", "sitting")

#: Base cadence ranges in Hz (slow pace to fast pace), scaled per subject: steps for the gaits,
#: pedal revolutions for cycling, jumps for jumping, breaths for the resting postures.
CADENCES: dict[str, tuple[float, float]] = {
    "walking": (1.5, 2.2),
    "running": (2.5, 3.3),
    "cycling": (1.0, 1.6),
    "stairs": (1.2, 1.7),
    "jumping": (0.45, 1.0),
    "sitting": (0.2, 0.33),
    "standing": (0.2, 0.33),
    "lying": (0.2, 0.33),
}

_STREAMS = {"train": 0, "test": 1, "subject": 2}
#: Subject style draws, each uniform in [0, 1), mapped to ranges by the activity models; drawn
#: in this order whatever the options, so a subject is the same person in every dataset.
_STYLE = (
    "harmonic",  # weight of the second harmonic of the gait (double-hump vertical trace)
    "asymmetry",  # left/right step difference (stride-frequency content)
    "stride",  # forward/vertical amplitude ratio
    "sway",  # lateral sway and pelvic roll
    "lean",  # forward trunk lean while moving
    "duty",  # running: share of a step on the ground
    "impact",  # running: heel-strike transient
    "bike_lean",  # cycling: forward lean on the bike
    "jump_height",  # jumping: flight time
    "recline",  # sitting: backward pelvic tilt
    "restless",  # resting postures: how often the person fidgets
    "side",  # lying: on the back, a side or the front
)

#: Participle phrases for the activity, read after "a person" or "someone is".
PHRASES: dict[str, tuple[str, ...]] = {
    "walking": (
        "walking",
        "walking along",
        "out for a walk",
        "walking on level ground",
        "going for a walk",
    ),
    "running": ("running", "going for a run", "out for a run", "running along", "on a run"),
    "cycling": (
        "cycling",
        "riding a bike",
        "riding a bicycle",
        "pedalling a bicycle",
        "on a bike ride",
    ),
    "stairs": (
        "climbing stairs",
        "going up the stairs",
        "climbing a staircase",
        "taking the stairs up",
        "heading upstairs",
        "stepping up a flight of stairs",
    ),
    "jumping": (
        "jumping",
        "jumping up and down",
        "jumping in place",
        "doing vertical jumps",
        "hopping on the spot",
    ),
    "sitting": (
        "sitting still",
        "sitting down",
        "sitting quietly",
        "seated on a chair",
        "sitting at a desk",
    ),
    "standing": ("standing", "standing in place", "standing upright", "standing around"),
    "lying": ("lying down", "lying on a bed", "lying flat", "lying on the floor"),
}
#: Nouns for someone doing the activity ("sensor data of a runner"), where English has them.
AGENTS: dict[str, tuple[str, ...]] = {
    "walking": ("a walker", "a pedestrian"),
    "running": ("a runner", "a jogger"),
    "cycling": ("a cyclist", "a bike rider"),
    "stairs": ("a stair climber",),
}
#: How the activity is done, by pace ("slow", "steady", "fast"; "rest" for resting postures).
MANNERS: dict[str, dict[str, tuple[str, ...]]] = {
    "gait": {
        "slow": ("slowly", "at a slow pace", "at a leisurely pace", "at an easy pace"),
        "steady": ("at a steady pace", "at a normal pace", "at a moderate pace"),
        "fast": ("quickly", "at a brisk pace", "at a fast pace", "at a quick pace"),
    },
    "cycling": {
        "slow": ("slowly", "at a low cadence", "at an easy pace", "gently"),
        "steady": ("at a steady cadence", "at a moderate pace"),
        "fast": ("fast", "at a high cadence", "hard", "at a brisk pace"),
    },
    "jumping": {
        "slow": ("with pauses between jumps", "slowly", "at a relaxed rhythm"),
        "steady": ("at a steady rhythm", "repeatedly"),
        "fast": ("in quick succession", "rapidly", "at a fast rhythm"),
    },
    "rest": {"rest": ("without moving much", ", barely moving", ", hardly moving at all")},
}
WHO = ("a person", "someone", "a subject", "an adult", "the wearer", "a participant")
CAPTION_FRAMES = (
    "{who} {doing}{manner}{extra}.",
    "{who} is {doing}{manner}{extra}.",
    "sensor data of {who} {doing}{manner}{extra}.",
    "accelerometer and gyroscope readings of {who} {doing}{manner}{extra}.",
    "an imu recording of {who} {doing}{manner}{extra}.",
    "motion sensor data: {who} is {doing}{manner}{extra}.",
    "a wearable sensor on {who} {doing}{manner}{extra}.",
)
AGENT_FRAMES = (
    "sensor data of {agent}{manner}{extra}.",
    "the motion of {agent}{manner}{extra}.",
    "imu signals from {agent}{manner}{extra}.",
)
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip

#: Zero-shot prompt templates; every class word reads well in each.
PROMPT_TEMPLATES = (
    "a person {}.",
    "someone is {}.",
    "sensor data of a person {}.",
    "an imu recording of someone {}.",
    "accelerometer and gyroscope readings of someone {}.",
    "a wearable sensor on a person {}.",
)


def _activity_names(names: list[str]) -> list[str]:
    by_word = {word: name for name, word in ACTIVITIES.items()}
    normal = [by_word.get(name, name) for name in names]
    unknown = [name for name, n in zip(names, normal) if n not in ACTIVITIES]
    if unknown:
        raise ValueError(
            f"activities: unknown {unknown}; expected names from {list(ACTIVITIES)} "
            f"(or the words {list(ACTIVITIES.values())})"
        )
    if len(set(normal)) != len(normal) or len(normal) < 2:
        raise ValueError(f"activities: expected at least two distinct activities, got {names}")
    return normal


class ImuSynthOptions(BaseModel):
    """How much synthetic IMU data to make, and how."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = Field(0, ge=0)
    train_windows: int = Field(3000, ge=0)
    test_windows: int = Field(600, ge=0)
    train_subjects: int = Field(24, ge=1, description="people in the training split")
    test_subjects: int = Field(8, ge=1, description="other people, in the test split only")
    rate: float = Field(50.0, ge=10.0, le=1000.0, description="sampling rate, Hz")
    min_seconds: float = Field(4.0, ge=1.0, le=600.0, description="shortest window, seconds")
    max_seconds: float = Field(10.0, ge=1.0, le=600.0, description="longest window, seconds")
    activities: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ACTIVITIES),
        description=f"the activity classes, at least two of {list(ACTIVITIES)}",
    )
    shard_size: int = Field(1000, gt=0, description="windows per shard")
    caption_detail: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="probability that a caption names each detail (pace, duration, jump count)",
    )
    max_mount_degrees: float = Field(
        30.0, ge=0.0, le=90.0, description="largest rotation of a subject's sensor mounting"
    )

    @field_validator("activities")
    @classmethod
    def _known_activities(cls, names: list[str]) -> list[str]:
        return _activity_names(names)

    @model_validator(mode="after")
    def _window_lengths(self) -> ImuSynthOptions:
        if self.max_seconds < self.min_seconds:
            raise ValueError(
                f"max_seconds ({self.max_seconds}) is less than min_seconds ({self.min_seconds})"
            )
        return self

    def count(self, split: str) -> int:
        return {"train": self.train_windows, "test": self.test_windows}[split]

    def subject_ids(self, split: str) -> list[int]:
        if split == "train":
            return list(range(self.train_subjects))
        return list(range(self.train_subjects, self.train_subjects + self.test_subjects))

    def class_words(self) -> list[str]:
        return [ACTIVITIES[name] for name in self.activities]


# --------------------------------------------------------------------------------------------
# Subjects


@dataclass(frozen=True)
class Subject:
    """One person: how they move and how their sensor sits."""

    id: int
    cadence_scale: float
    amplitude_scale: float
    mount_axis: tuple[float, float, float]
    mount_fraction: float  # of max_mount_degrees
    accel_noise: float  # m/s², white noise sd
    gyro_noise: float  # rad/s
    accel_bias: tuple[float, float, float]
    gyro_bias: tuple[float, float, float]
    style: dict[str, float]
    gait_phases: tuple[float, ...]  # rad, the subject's harmonic phases (shape of the gait)

    def metadata(self, max_mount_degrees: float) -> dict[str, Any]:
        return {
            "cadence_scale": _round(self.cadence_scale),
            "amplitude_scale": _round(self.amplitude_scale),
            "mount_axis": [_round(v) for v in self.mount_axis],
            "mount_degrees": _round(self.mount_fraction * max_mount_degrees),
            "accel_noise": _round(self.accel_noise),
            "gyro_noise": _round(self.gyro_noise),
            "accel_bias": [_round(v) for v in self.accel_bias],
            "gyro_bias": [_round(v) for v in self.gyro_bias],
            "style": {k: _round(v) for k, v in self.style.items()},
            "gait_phases": [_round(v) for v in self.gait_phases],
        }


def subject_profile(seed: int, subject: int) -> Subject:
    """The subject's parameters, from a generator seeded by (seed, subject) alone."""
    rng = np.random.default_rng([seed, _STREAMS["subject"], subject])
    axis = rng.normal(size=3)
    axis /= max(float(np.linalg.norm(axis)), 1e-12)
    return Subject(
        id=subject,
        cadence_scale=float(rng.uniform(0.9, 1.1)),
        amplitude_scale=float(rng.uniform(0.75, 1.3)),
        mount_axis=(float(axis[0]), float(axis[1]), float(axis[2])),
        mount_fraction=float(rng.uniform(0.0, 1.0)),
        accel_noise=float(rng.uniform(0.02, 0.08)),
        gyro_noise=float(rng.uniform(0.003, 0.015)),
        accel_bias=tuple(float(v) for v in np.clip(rng.normal(0.0, 0.08, 3), -0.25, 0.25)),
        gyro_bias=tuple(float(v) for v in np.clip(rng.normal(0.0, 0.01, 3), -0.03, 0.03)),
        style={name: float(rng.uniform()) for name in _STYLE},
        gait_phases=tuple(float(v) for v in rng.uniform(-0.6, 0.6, 6)),
    )


# --------------------------------------------------------------------------------------------
# Motion models


@dataclass
class _Context:
    rng: np.random.Generator
    subject: Subject
    rate: float
    t: np.ndarray  # seconds, [T]
    pace: float  # 0 slow .. 1 fast within the activity's range
    amplitude: float  # subject scale x pace x window jitter

    @property
    def n(self) -> int:
        return len(self.t)

    def style(self, name: str, low: float, high: float) -> float:
        return low + (high - low) * self.subject.style[name]

    def cadence(self, activity: str) -> float:
        low, high = CADENCES[activity]
        return (low + (high - low) * self.pace) * self.subject.cadence_scale


@dataclass
class _Motion:
    linear: np.ndarray  # [T, 3] acceleration in a level frame (forward, left, up), m/s²
    angles: np.ndarray  # [T, 3] roll, pitch, yaw about the posture, rad
    posture: tuple[float, float]  # constant roll, pitch, rad (pitch > 0 leans forward)
    info: dict[str, Any]


def _phase(ctx: _Context, freq: float) -> tuple[np.ndarray, dict[str, float]]:
    """Phase (rad) of a rhythm at ``freq`` Hz with a random start, a slow drift over the window
    and a gentle wobble: ``2π ∫ f``."""
    rng = ctx.rng
    duration = ctx.n / ctx.rate
    drift = rng.uniform(-0.06, 0.06)
    wobble = rng.uniform(0.0, 0.03)
    period = rng.uniform(3.0, 12.0)
    offset = rng.uniform(0.0, 2 * np.pi)
    start = rng.uniform(0.0, 2 * np.pi)
    f = freq * (
        1.0
        + drift * (ctx.t / duration - 0.5)
        + wobble * np.sin(2 * np.pi * ctx.t / period + offset)
    )
    phase = start + 2 * np.pi * np.cumsum(f) / ctx.rate
    return phase, {"cadence_hz": _round(freq), "cadence_drift": _round(drift)}


def _band_noise(
    rng: np.random.Generator, n: int, rate: float, low: float, high: float
) -> np.ndarray:
    """[n, 3] noise with unit sd per column, its spectrum limited to [low, high] Hz."""
    white = rng.normal(size=(n, 3))
    spectrum = np.fft.rfft(white, axis=0)
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    spectrum[(freqs < low) | (freqs > min(high, 0.45 * rate))] = 0.0
    noise = np.fft.irfft(spectrum, n=n, axis=0)
    return noise / np.maximum(noise.std(axis=0), 1e-9)


def _pulse(t: np.ndarray, start: float, width: float) -> np.ndarray:
    """A raised-cosine bump of ``width`` seconds from ``start``, peak 1."""
    u = (t - start) / max(width, 1e-6)
    return np.where((u >= 0) & (u <= 1), 0.5 - 0.5 * np.cos(2 * np.pi * u), 0.0)


def _ramp(t: np.ndarray, start: float, width: float) -> np.ndarray:
    """A smooth step from 0 to 1 over ``width`` seconds from ``start``."""
    u = np.clip((t - start) / max(width, 1e-6), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * u)


def _gait(ctx: _Context, activity: str) -> _Motion:
    """Walking and stair climbing: a vertical trace at the step rate with harmonics, forward
    acceleration a quarter cycle ahead, lateral sway and pelvic roll/yaw at the stride rate
    (half the step rate), pitch at the step rate. Stairs: slower, stronger vertical push, more
    sway and hip pitch, a forward lean, less forward acceleration."""
    rng, amp = ctx.rng, ctx.amplitude
    stairs = activity == "stairs"
    freq = ctx.cadence(activity)
    phase, info = _phase(ctx, freq)
    half = phase / 2
    h2 = ctx.style("harmonic", 0.1, 0.3) if stairs else ctx.style("harmonic", 0.3, 0.7)
    asym = ctx.style("asymmetry", 0.0, 0.15)
    jitter = rng.uniform(-0.3, 0.3, size=8)
    base = ctx.subject.gait_phases
    vertical = (3.0 if stairs else 2.4) * amp
    forward = (1.2 if stairs else 1.7) * amp * ctx.style("stride", 0.8, 1.2)
    lateral = (1.2 if stairs else 0.9) * amp * ctx.style("sway", 0.8, 1.2)
    linear = np.stack(
        [
            forward
            * (np.sin(phase + np.pi / 2 + jitter[0]) + 0.4 * h2 * np.sin(2 * phase + base[1])),
            lateral * (np.sin(half + jitter[1]) + 0.25 * np.sin(1.5 * phase + base[2])),
            vertical
            * (
                np.sin(phase)
                + h2 * np.sin(2 * phase + base[0] + jitter[2])
                + 0.15 * np.sin(3 * phase + base[3])
                + asym * np.sin(half + base[4])
            ),
        ],
        axis=1,
    )
    deg = math.radians
    roll = deg(6.0 if stairs else 4.5) * ctx.style("sway", 0.7, 1.3) * np.sin(half + jitter[3])
    pitch = (
        deg(5.0 if stairs else 2.0)
        * amp
        * (np.sin(phase + jitter[4]) + 0.3 * np.sin(2 * phase + base[5]))
    )
    yaw = deg(4.0 if stairs else 6.0) * amp * np.sin(half + jitter[5])
    lean = ctx.style("lean", 8.0, 18.0) if stairs else ctx.style("lean", 0.0, 8.0)
    posture = (deg(rng.uniform(-3.0, 3.0)), deg(lean + rng.uniform(-2.0, 2.0)))
    info |= {"steps": _round(float((phase[-1] - phase[0]) / (2 * np.pi)), 1)}
    return _Motion(linear, np.stack([roll, pitch, yaw], axis=1), posture, info)


def _running(ctx: _Context) -> _Motion:
    """Running: each step a stance phase (a half-sine push with a heel-strike transient) and a
    flight phase in free fall (specific force near 0); the vertical trace averages to gravity.
    Braking then propulsion forward during stance; larger pelvic roll/yaw at the stride rate."""
    rng = ctx.rng
    freq = ctx.cadence("running")
    phase, info = _phase(ctx, freq)
    duty = ctx.style("duty", 0.36, 0.5) - 0.05 * ctx.pace + rng.uniform(-0.02, 0.02)
    impact = ctx.style("impact", 0.2, 0.8)
    u = np.mod(phase, 2 * np.pi) / (2 * np.pi)
    stance = u < duty
    shape = np.where(stance, np.sin(np.pi * u / duty), 0.0) + impact * np.exp(
        -(((u - 0.06 * duty) / 0.025) ** 2)
    )
    grid = np.linspace(0.0, 1.0, 2000, endpoint=False)
    mean = float(
        np.mean(
            np.where(grid < duty, np.sin(np.pi * grid / duty), 0.0)
            + impact * np.exp(-(((grid - 0.06 * duty) / 0.025) ** 2))
        )
    )
    # The hip is close to the centre of mass: full swing is free fall in flight; soft tissue
    # and a smaller person's bounce damp it.
    damping = min(1.0, ctx.subject.amplitude_scale * rng.uniform(0.75, 0.95))
    vertical = damping * GRAVITY * (shape / mean - 1.0)
    forward = (
        ctx.amplitude * rng.uniform(3.0, 5.0) * np.where(stance, -np.sin(2 * np.pi * u / duty), 0)
    )
    half = phase / 2
    jitter = rng.uniform(-0.3, 0.3, size=4)
    lateral = 1.5 * ctx.amplitude * ctx.style("sway", 0.8, 1.2) * np.sin(half + jitter[0])
    linear = np.stack([forward, lateral, vertical], axis=1)
    deg = math.radians
    roll = deg(6.0) * ctx.style("sway", 0.7, 1.3) * np.sin(half + jitter[1])
    pitch = deg(3.5) * ctx.amplitude * np.sin(phase + 0.5 + jitter[2])
    yaw = deg(9.0) * ctx.amplitude * np.sin(half + jitter[3])
    posture = (deg(rng.uniform(-3.0, 3.0)), deg(ctx.style("lean", 5.0, 15.0) + rng.uniform(-2, 2)))
    info |= {"duty_factor": _round(duty), "steps": _round((phase[-1] - phase[0]) / (2 * np.pi), 1)}
    return _Motion(linear, np.stack([roll, pitch, yaw], axis=1), posture, info)


def _cycling(ctx: _Context) -> _Motion:
    """Cycling, hip sensor on a seated rider leaning forward: small vertical and forward surges
    twice per pedal revolution (one per downstroke), lateral rocking once per revolution, road
    vibration (4-15 Hz) and a few bumps, slow lean in gentle turns."""
    rng, amp = ctx.rng, ctx.amplitude
    freq = ctx.cadence("cycling")
    phase, info = _phase(ctx, freq)
    jitter = rng.uniform(0.0, 2 * np.pi, size=6)
    road = rng.uniform(0.2, 1.4)
    vibration = _band_noise(rng, ctx.n, ctx.rate, 4.0, 15.0) * road * np.array([0.5, 0.4, 1.0])
    bumps = np.zeros(ctx.n)
    count = int(rng.poisson(0.15 * ctx.n / ctx.rate))
    for _ in range(count):
        start = rng.uniform(0.0, ctx.t[-1])
        height = rng.uniform(2.0, 5.0)
        bumps += height * _pulse(ctx.t, start, 0.06) - 0.4 * height * _pulse(
            ctx.t, start + 0.06, 0.1
        )
    linear = (
        np.stack(
            [
                0.35 * amp * np.sin(2 * phase + jitter[0]),
                0.5 * amp * np.sin(phase + jitter[1]),
                0.55 * amp * np.sin(2 * phase + jitter[2]) + bumps,
            ],
            axis=1,
        )
        + vibration
    )
    deg = math.radians
    turn = deg(rng.uniform(0.0, 4.0)) * np.sin(
        2 * np.pi * rng.uniform(0.05, 0.25) * ctx.t + jitter[3]
    )
    roll = deg(2.5) * amp * np.sin(phase + jitter[4]) + turn
    pitch = deg(1.0) * amp * np.sin(2 * phase + jitter[5])
    yaw = deg(1.8) * amp * np.sin(phase + jitter[4] + 1.2) + 0.3 * turn
    posture = (
        deg(rng.uniform(-3.0, 3.0)),
        deg(ctx.style("bike_lean", 15.0, 35.0) + rng.uniform(-3, 3)),
    )
    info |= {"road_roughness": _round(road), "bumps": count}
    return _Motion(linear, np.stack([roll, pitch, yaw], axis=1), posture, info)


def _jumping(ctx: _Context) -> _Motion:
    """Vertical jumps in place at irregular intervals: a countermovement dip, a push-off, a
    flight in free fall, a landing spike, then standing until the next jump. The impulses balance
    (take-off speed ``g·flight/2`` gained in the push, lost in the landing), and the trunk pitches
    forward in each crouch."""
    rng, t = ctx.rng, ctx.t
    rate_hz = ctx.cadence("jumping")
    flight_mean = ctx.style("jump_height", 0.28, 0.48) * (0.85 + 0.3 * ctx.pace)
    vertical = np.zeros(ctx.n)
    pitch = np.zeros(ctx.n)
    jumps = 0
    start = rng.uniform(0.0, min(0.8, max(0.0, t[-1] - 1.6)))  # the first jump fits if it can
    while True:
        dip, push = rng.uniform(0.2, 0.35), rng.uniform(0.15, 0.25)
        flight = flight_mean * rng.uniform(0.9, 1.1)
        landing = rng.uniform(0.08, 0.14)
        takeoff = start + dip + push
        if jumps and takeoff + flight + landing + 0.3 > t[-1]:
            break  # there is always one jump, cut short only in the shortest windows
        speed = GRAVITY * flight / 2
        depth = rng.uniform(0.3, 0.6) * GRAVITY  # dip below 1 g
        vertical -= depth * _pulse(t, start, dip)
        gain = speed + depth * dip / 2  # the push also stops the dip's downward speed
        vertical += gain / (push / 2) * _pulse(t, start + dip, push)
        airborne = (t >= takeoff) & (t < takeoff + flight)
        vertical[airborne] = -GRAVITY  # free fall
        land = takeoff + flight
        vertical += speed / (landing / 2) * _pulse(t, land, landing)
        vertical += -0.25 * GRAVITY * _pulse(t, land + landing, 0.15)
        vertical += 0.25 * GRAVITY * _pulse(t, land + landing + 0.15, 0.15)
        bend = math.radians(rng.uniform(5.0, 18.0))
        pitch += bend * _pulse(t, start - 0.05, dip + push + 0.1)
        pitch += 0.6 * bend * _pulse(t, land, landing + 0.35)
        jumps += 1
        gap = rng.exponential(1.0 / rate_hz) * 0.6 + 0.4 / rate_hz
        start = land + landing + 0.3 + gap
    sway = _band_noise(rng, ctx.n, ctx.rate, 0.1, 2.0) * 0.15 * ctx.amplitude
    linear = np.stack([sway[:, 0], sway[:, 1], vertical], axis=1)
    deg = math.radians
    drift = _band_noise(rng, ctx.n, ctx.rate, 0.1, 1.5) * deg(1.5)
    angles = np.stack([drift[:, 0], pitch + 0.3 * drift[:, 1], drift[:, 2]], axis=1)
    posture = (deg(rng.uniform(-3.0, 3.0)), deg(rng.uniform(-2.0, 6.0)))
    info = {
        "cadence_hz": _round(rate_hz),
        "jumps": jumps,
        "flight_seconds": _round(flight_mean),
    }
    return _Motion(linear, angles, posture, info)


def _resting(ctx: _Context, activity: str) -> _Motion:
    """Sitting, standing, lying: a fixed posture with breathing, postural sway (standing) and a
    few fidgets (a smooth shift of a few degrees with a small jolt)."""
    rng, t = ctx.rng, ctx.t
    deg = math.radians
    breath = ctx.cadence(activity)
    phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * breath * t
    depth = deg(rng.uniform(0.2, 0.6) if activity != "lying" else rng.uniform(0.5, 1.5))
    angles = np.zeros((ctx.n, 3))
    angles[:, 1] = depth * np.sin(phase)
    linear = np.zeros((ctx.n, 3))
    linear[:, 2] = 0.03 * np.sin(phase + 0.8)
    if activity == "standing":  # postural sway: an inverted pendulum about the ankles
        sway = _band_noise(rng, ctx.n, ctx.rate, 0.1, 0.5) * deg(rng.uniform(0.2, 0.6))
        angles += sway
        pendulum = rng.uniform(0.9, 1.1)
        ddot = np.gradient(np.gradient(sway, axis=0), axis=0) * ctx.rate**2
        linear[:, 0] += pendulum * ddot[:, 1]
        linear[:, 1] -= pendulum * ddot[:, 0]
    restless = ctx.subject.style["restless"]
    fidgets = int(
        rng.poisson((0.3 if activity == "lying" else 1.0) * restless * ctx.n / ctx.rate / 5)
    )
    for _ in range(fidgets):
        start, width = rng.uniform(0.0, t[-1]), rng.uniform(0.5, 1.5)
        shift = np.array([deg(v) for v in rng.uniform(-6.0, 6.0, 3)])
        angles += _ramp(t, start, width)[:, None] * shift
        linear += _pulse(t, start, width)[:, None] * rng.uniform(-0.5, 0.5, 3)
    if activity == "sitting":
        posture = (
            deg(rng.uniform(-5, 5)),
            -deg(ctx.style("recline", 5.0, 25.0) + rng.uniform(-3, 3)),
        )
    elif activity == "standing":
        posture = (deg(rng.uniform(-4, 4)), deg(rng.uniform(-3.0, 6.0)))
    else:  # lying on the back, a side, or the front
        side = ctx.subject.style["side"]
        tilt = deg(rng.uniform(75.0, 95.0))
        if side < 0.6:
            posture = (deg(rng.uniform(-10, 10)), -tilt)
        elif side < 0.9:
            posture = (tilt if rng.random() < 0.5 else -tilt, deg(rng.uniform(-10, 10)))
        else:
            posture = (deg(rng.uniform(-10, 10)), tilt)
    info = {"breathing_hz": _round(breath), "fidgets": fidgets}
    return _Motion(linear, angles, posture, info)


_MODELS: dict[str, Callable[[_Context], _Motion]] = {
    "walking": lambda ctx: _gait(ctx, "walking"),
    "stairs": lambda ctx: _gait(ctx, "stairs"),
    "running": _running,
    "cycling": _cycling,
    "jumping": _jumping,
    "sitting": lambda ctx: _resting(ctx, "sitting"),
    "standing": lambda ctx: _resting(ctx, "standing"),
    "lying": lambda ctx: _resting(ctx, "lying"),
}


# --------------------------------------------------------------------------------------------
# Rotations and the sensor


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: the rotation by ``angle`` rad about the unit ``axis``."""
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=np.float64)
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _euler(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """[..., 3, 3] rotations ``Rz(yaw) Ry(pitch) Rx(roll)`` (body to level frame)."""
    cr, sr, cp, sp, cy, sy = (np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch),
                              np.cos(yaw), np.sin(yaw))  # fmt: skip
    return np.stack(
        [
            np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], axis=-1),
            np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], axis=-1),
            np.stack([-sp, cp * sr, cp * cr], axis=-1),
        ],
        axis=-2,
    )


def _sense(motion: _Motion, ctx: _Context, mount: np.ndarray) -> np.ndarray:
    """The [T, 6] readings of a sensor turned by ``mount`` (sensor to body) on a body moving as
    ``motion``: specific force (acceleration minus gravity's pull, i.e. +g up at rest) and body
    angular velocity, both in sensor axes, plus bias and noise, clipped to the sensor's range."""
    roll, pitch, yaw = motion.angles.T
    # The oscillation angles act on top of the posture: body orientation = posture x oscillation.
    posture = _euler(np.float64(motion.posture[0]), np.float64(motion.posture[1]), np.float64(0))
    body = posture @ _euler(roll, pitch, yaw)  # [T, 3, 3] body to level frame
    force = motion.linear + np.array([0.0, 0.0, GRAVITY])
    force_body = np.einsum("tji,tj->ti", body, force)  # body^T @ force
    # Body rates of Z-Y-X Euler angles.
    droll, dpitch, dyaw = (np.gradient(a) * ctx.rate for a in (roll, pitch, yaw))
    gyro_body = np.stack(
        [
            droll - dyaw * np.sin(pitch),
            dpitch * np.cos(roll) + dyaw * np.cos(pitch) * np.sin(roll),
            -dpitch * np.sin(roll) + dyaw * np.cos(pitch) * np.cos(roll),
        ],
        axis=1,
    )
    subject, rng = ctx.subject, ctx.rng
    accel = force_body @ mount + np.asarray(subject.accel_bias)  # mount^T @ v, row-wise
    gyro = gyro_body @ mount + np.asarray(subject.gyro_bias)
    accel += rng.normal(0.0, subject.accel_noise, accel.shape)
    gyro += rng.normal(0.0, subject.gyro_noise, gyro.shape)
    accel = np.clip(accel, -ACCEL_RANGE, ACCEL_RANGE)
    gyro = np.clip(gyro, -GYRO_RANGE, GYRO_RANGE)
    return np.concatenate([accel, gyro], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Windows and captions


@dataclass(frozen=True)
class Window:
    """One generated window: the readings, its metadata and its caption."""

    data: np.ndarray  # [T, 6] float32
    metadata: dict[str, Any]
    caption: str


def window_subject(options: ImuSynthOptions, split: str, index: int) -> int:
    """The subject of window ``index``: subjects cycle every ``len(activities)`` windows, so each
    does every activity; test subjects follow the training ones."""
    ids = options.subject_ids(split)
    return ids[(index // len(options.activities)) % len(ids)]


def _pace_word(activity: str, pace: float) -> str:
    if activity in ("sitting", "standing", "lying"):
        return "rest"
    return "slow" if pace < 0.3 else "fast" if pace > 0.7 else "steady"


def _number(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def caption(
    activity: str, metadata: dict[str, Any], rng: np.random.Generator, detail: float
) -> str:
    """A caption that always names the activity (with varied wording) and each detail (pace or
    manner, duration, jump count) with probability ``detail``."""
    pace = metadata["pace"]
    manners = MANNERS[
        "rest" if pace == "rest" else "cycling" if activity == "cycling" else
        "jumping" if activity == "jumping" else "gait"
    ][pace]  # fmt: skip
    named = {key: bool(rng.random() < detail) for key in ("manner", "duration", "count")}
    manner = str(rng.choice(manners)) if named["manner"] else ""
    manner = manner if manner.startswith(",") or not manner else f" {manner}"
    extra = ""
    if activity == "jumping" and named["count"] and metadata["jumps"] > 0:
        jumps = metadata["jumps"]
        extra = f", {_number(jumps)} jump{'s' if jumps != 1 else ''} in all"
    elif named["duration"]:
        seconds = round(metadata["seconds"])
        extra = str(rng.choice((" for about {} seconds", " for {} seconds", " over {} seconds")))
        extra = extra.format(_number(seconds))
    if activity in AGENTS and rng.random() < 0.25:
        agent = str(rng.choice(AGENTS[activity]))
        text = str(rng.choice(AGENT_FRAMES)).format(agent=agent, manner=manner, extra=extra)
    else:
        text = str(rng.choice(CAPTION_FRAMES)).format(
            who=rng.choice(WHO), doing=rng.choice(PHRASES[activity]), manner=manner, extra=extra
        )
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a imu" -> "an imu"
    return text[0].upper() + text[1:]


def make_window(options: ImuSynthOptions, split: str, index: int) -> Window:
    """Window ``index`` of ``split``, from its own generator seeded by (seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = np.random.default_rng([options.seed, _STREAMS[split], index])
    label = index % len(options.activities)
    activity = options.activities[label]
    subject = subject_profile(options.seed, window_subject(options, split, index))
    seconds = rng.uniform(options.min_seconds, options.max_seconds)
    n = max(2, round(seconds * options.rate))
    pace = float(rng.uniform())
    amplitude = subject.amplitude_scale * (0.8 + 0.4 * pace) * rng.uniform(0.85, 1.15)
    ctx = _Context(rng, subject, options.rate, np.arange(n) / options.rate, pace, amplitude)
    motion = _MODELS[activity](ctx)
    # The subject's mounting, and a small shift of the sensor for this window.
    wobble_axis = rng.normal(size=3)
    wobble_axis /= max(float(np.linalg.norm(wobble_axis)), 1e-12)
    wobble = math.radians(rng.uniform(0.0, 5.0))
    mount_angle = math.radians(subject.mount_fraction * options.max_mount_degrees)
    mount = _rotation(np.asarray(subject.mount_axis), mount_angle) @ _rotation(wobble_axis, wobble)
    data = _sense(motion, ctx, mount)
    metadata: dict[str, Any] = {
        "activity": activity,
        "class": ACTIVITIES[activity],
        "label": label,
        "subject": subject.id,
        "split": split,
        "rate": options.rate,
        "seconds": _round(n / options.rate, 3),
        "samples": n,
        "channels": list(CHANNELS),
        "pace": _pace_word(activity, pace),
        "pace_value": _round(pace),
        "amplitude": _round(amplitude),
        "posture_degrees": [_round(math.degrees(a), 2) for a in motion.posture],
        "wobble_degrees": _round(math.degrees(wobble), 2),
        **motion.info,
        "subject_params": subject.metadata(options.max_mount_degrees),
    }
    text = caption(activity, metadata, rng, options.caption_detail)
    return Window(data, metadata, text)


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def sample(options: ImuSynthOptions, split: str, index: int) -> dict[str, Any]:
    """One webdataset sample: ``{"__key__", "npy", "txt", "json"}`` (bytes)."""
    window = make_window(options, split, index)
    return {
        "__key__": f"{split}_imu_{index:07d}",
        "npy": _npy(window.data),
        "txt": window.caption.encode("utf-8"),
        "json": _json(window.metadata),
    }


def _round(value: float, digits: int = 4) -> float:
    return round(float(value), digits)


# --------------------------------------------------------------------------------------------
# The dataset


def prompts(options: ImuSynthOptions) -> dict[str, list[str]]:
    """The zero-shot prompts: class words and templates."""
    return {"classes": options.class_words(), "templates": list(PROMPT_TEMPLATES)}


def _manifest_is_ours(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _our_files(out: Path) -> Iterator[Path]:
    """Files a previous run of this generator wrote here (and only those)."""
    for split in SPLITS:
        yield from sorted((out / split).glob(f"{KIND}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if (out / "prompts" / f"{MODALITY}.json").is_file():
        yield out / "prompts" / f"{MODALITY}.json"
    if (out / "manifest.json").is_file() and _manifest_is_ours(out / "manifest.json"):
        yield out / "manifest.json"


def _write_shards(out: Path, options: ImuSynthOptions, split: str) -> list[str]:
    count = options.count(split)
    if count == 0:
        return []
    written: list[str] = []
    with ShardWriter(
        str(out / split / f"{KIND}-%06d.tar"),
        maxcount=options.shard_size,
        verbose=0,
        encoder=False,  # every value is bytes already
        mtime=0,  # reproducible tar headers
        post=lambda name: written.append(Path(name).relative_to(out).as_posix()),
    ) as writer:
        for index in range(count):
            writer.write(sample(options, split, index))
    return written


def brace_pattern(shards: list[str]) -> str:
    """``train/imu_text-{000000..000003}.tar`` for consecutive shards (a plain path for one)."""
    if len(shards) <= 1:
        return shards[0] if shards else ""
    stem, first = shards[0][: -len("000000.tar")], shards[0][-len("000000.tar") : -len(".tar")]
    last = shards[-1][-len("000000.tar") : -len(".tar")]
    return f"{stem}{{{first}..{last}}}.tar"


def generate(
    out: str | os.PathLike[str],
    options: ImuSynthOptions,
    *,
    overwrite: bool = False,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Write ``train/imu_text-%06d.tar``, ``test/imu_text-%06d.tar``, ``prompts/imu.json`` and
    ``manifest.json`` under ``out``; return the manifest. One process whatever ``jobs`` says
    (the peace dataset contract's argument): a few thousand windows take seconds.

    Refuses (``FileExistsError``) to write over a previous IMU dataset there unless
    ``overwrite``, which removes that dataset's shards, prompts and manifest first (nothing
    else), and always refuses to replace a ``manifest.json`` that some other generator wrote.
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a directory")
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and not _manifest_is_ours(manifest_path):
        raise FileExistsError(
            f"{manifest_path} belongs to another dataset (not {MANIFEST_FORMAT}); "
            "write the IMU dataset to another directory"
        )
    previous = list(_our_files(root))
    if previous and not overwrite:
        raise FileExistsError(
            f"{root} already holds a synthetic IMU dataset ({len(previous)} files, e.g. "
            f"{previous[0]}); remove it or pass overwrite"
        )
    for path in previous:
        path.unlink()
    datasets: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
        shards = _write_shards(root, options, split)
        datasets[f"{split}/{KIND}"] = {
            "count": options.count(split),
            "shards": shards,
            "urls": brace_pattern(shards),
        }
    prompt_path = root / "prompts" / f"{MODALITY}.json"
    prompt_path.parent.mkdir(parents=True, exist_ok=True)
    prompt_path.write_text(json.dumps(prompts(options), indent=2) + "\n", encoding="utf-8")
    manifest = {
        "format": MANIFEST_FORMAT,
        "seed": options.seed,
        "options": options.model_dump(mode="json"),
        "rate": options.rate,
        "channels": list(CHANNELS),
        "units": dict(UNITS),
        "datasets": datasets,
        "prompts": {MODALITY: prompt_path.relative_to(root).as_posix()},
        "classes": {MODALITY: options.class_words()},
        "subjects": {split: options.subject_ids(split) for split in SPLITS},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
