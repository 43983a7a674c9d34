"""Synthetic image scenes: one coloured shape on a cluttered, noisy background, with captions.

A scene is (shape, colour, position, size). The class for zero-shot classification is the shape.
Captions always name the shape and name the other attributes with a given probability, with
varied wording, so that retrieval needs more than the class.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

#: Shapes are the classes; their order fixes the class labels.
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 210, 35),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
}
#: Shape centres as fractions of the image side (x, y); y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "centre": (0.5, 0.5),
}
#: Shape radius as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.12, "large": 0.21}

#: The words captions may use for each attribute value; tests check captions against these.
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("circle", "disc", "round dot"),
        "square": ("square", "box", "block"),
        "triangle": ("triangle", "triangular shape"),
        "star": ("star", "five-pointed star"),
        "cross": ("cross", "plus sign"),
        "diamond": ("diamond", "rhombus"),
    },
    "colour": {
        "red": ("red", "crimson", "scarlet"),
        "green": ("green", "emerald", "grass-green"),
        "blue": ("blue", "azure", "cobalt"),
        "yellow": ("yellow", "golden", "lemon"),
        "purple": ("purple", "violet", "lilac"),
        "orange": ("orange", "tangerine", "amber"),
    },
    "position": {
        "left": ("on the left", "at the left side", "to the left"),
        "right": ("on the right", "at the right side", "to the right"),
        "top": ("at the top", "near the top", "in the upper part"),
        "bottom": ("at the bottom", "near the bottom", "in the lower part"),
        "centre": ("in the centre", "in the middle", "at the center"),
    },
    "size": {
        "small": ("small", "tiny", "little"),
        "large": ("large", "big", "huge"),
    },
}

#: Caption frames around a noun phrase ``{thing}`` ("a small red circle") and an optional place
#: ``{where}`` (" on the left" or nothing).
CAPTION_FRAMES = (
    "a {thing}{where}.",
    "there is a {thing}{where}.",
    "a picture of a {thing}{where}.",
    "you can see a {thing}{where} among some blobs.",
    "a {thing}{where} on a cluttered background.",
    "{thing}{where}",
    "the image shows a {thing}{where}.",
)
#: Frames naming the colour and/or size after the shape ("the star is red and small").
PREDICATE_FRAMES = (
    "the {shape}{where} is {details}.",
    "a {shape}{where}; it is {details}.",
    "{shape}{where}, {details}.",
)

#: Zero-shot prompt templates (ONE-PEACE / CLIP style).
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a picture of a {} shape.",
    "an image showing a {}.",
    "a {} on a noisy background.",
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    size: str

    @property
    def label(self) -> int:
        return SHAPES.index(self.shape)

    def metadata(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "position": self.position,
            "size": self.size,
            "class": self.shape,
            "label": self.label,
        }


def random_scene(rng: np.random.Generator, shape: str | None = None) -> Scene:
    return Scene(
        shape=shape if shape is not None else str(rng.choice(SHAPES)),
        colour=str(rng.choice(list(COLOURS))),
        position=str(rng.choice(list(POSITIONS))),
        size=str(rng.choice(list(SIZES))),
    )


def image_caption(scene: Scene, rng: np.random.Generator, detail: float = 1.0) -> str:
    """A caption that always names the shape, and each other attribute (colour, size, position)
    with probability ``detail``, in a random frame with random synonyms.

    Partial captions are what make the shape worth learning: when every caption names colour,
    size and position, those alone tell a batch's captions apart and a contrastive model has
    little reason to look at shapes.
    """
    words = {
        attribute: str(rng.choice(SYNONYMS[attribute][getattr(scene, attribute)]))
        for attribute in SYNONYMS
    }
    named = {attribute: bool(rng.random() < detail) for attribute in ("size", "colour", "position")}
    where = f" {words['position']}" if named["position"] else ""
    details = [words[attribute] for attribute in ("colour", "size") if named[attribute]]
    if details and rng.random() < 0.3:
        frame = str(rng.choice(PREDICATE_FRAMES))
        text = frame.format(shape=words["shape"], where=where, details=" and ".join(details))
    else:
        thing = " ".join([words[a] for a in ("size", "colour") if named[a]] + [words["shape"]])
        text = str(rng.choice(CAPTION_FRAMES)).format(thing=thing, where=where)
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"
    return text[0].upper() + text[1:]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in units of the radius, centred at 0 (v grows downwards)."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.05
    if shape == "triangle":  # apex up, flat base
        return (v <= 0.55) & (v >= -1.0 + np.sqrt(3.0) * np.abs(u))
    if shape == "cross":
        arm = 0.32
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    if shape == "star":  # five points, one up: radius follows a triangle wave in the angle
        angle = np.arctan2(v, u) + np.pi / 2
        phase = (angle * 5 / (2 * np.pi)) % 1.0
        return np.hypot(u, v) <= 0.45 + 0.6 * np.abs(2 * phase - 1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Muted, smoothly varying texture: a coarse random grid upsampled, plus a gradient."""
    base = rng.uniform(80, 170) + rng.uniform(-20, 20, size=3)
    coarse = rng.normal(0, 18, size=(6, 6, 3)) + base
    texture = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize(
        (side, side), Image.BICUBIC
    )
    ramp = np.linspace(-1, 1, side)
    gradient = (
        rng.uniform(-15, 15) * ramp[None, :, None] + rng.uniform(-15, 15) * ramp[:, None, None]
    )
    return np.asarray(texture, dtype=np.float32) + gradient


def render_scene(scene: Scene, rng: np.random.Generator, side: int = 64) -> np.ndarray:
    """``[side, side, 3]`` uint8: background, distractor blobs, the shape, pixel noise."""
    image = _background(rng, side)
    supersample = 2  # draw at twice the size and average: smooth edges
    grid = (np.arange(side * supersample) + 0.5) / supersample
    ys, xs = np.meshgrid(grid, grid, indexing="ij")

    def coverage(mask: np.ndarray) -> np.ndarray:
        return mask.reshape(side, supersample, side, supersample).mean(axis=(1, 3))[..., None]

    pixel = np.arange(side) + 0.5
    for _ in range(int(rng.integers(2, 6))):  # small dull blobs, drawn under the shape
        cx, cy = rng.uniform(0, side, size=2)
        radius = rng.uniform(0.03, 0.06) * side
        dull = rng.uniform(60, 190) + rng.uniform(-25, 25, size=3)
        distance = np.hypot(pixel[None, :] - cx, pixel[:, None] - cy)
        alpha = np.clip(radius + 0.5 - distance, 0.0, 1.0)[..., None]  # anti-aliased edge
        image = image * (1 - alpha) + dull * alpha

    fx, fy = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-0.05, 0.05)) * side
    cy = (fy + rng.uniform(-0.05, 0.05)) * side
    radius = SIZES[scene.size] * rng.uniform(0.9, 1.1) * side
    turn = rng.uniform(-0.25, 0.25)  # a slight rotation (radians)
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    u = dx * np.cos(turn) + dy * np.sin(turn)
    v = -dx * np.sin(turn) + dy * np.cos(turn)
    colour = np.asarray(COLOURS[scene.colour], dtype=np.float32) + rng.uniform(-18, 18, size=3)
    alpha = coverage(_shape_mask(scene.shape, u, v))
    image = image * (1 - alpha) + colour * alpha

    image = image + rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    """``jpg`` (quality 90) or ``png`` bytes; both encoders are deterministic."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    elif image_format == "png":
        Image.fromarray(pixels).save(buffer, format="PNG")
    else:
        raise ValueError(f"image format {image_format!r}: expected 'jpg' or 'png'")
    return buffer.getvalue()
