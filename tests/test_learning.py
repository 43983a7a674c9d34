"""Does the library's default model learn? A plain CLIP loop through the public API.

The loop a user writes first: ``create_model("tiny")``, ``preprocess``, the ``vision`` and
``text`` branches' embeddings, a symmetric cross-entropy over ``logit_scale.exp() * v @ t.T``
and AdamW with no warm-up. With the official init at this size the first steps make every
embedding the same and the loss sits at ln(B); the default (``init = "scratch"``) must learn.
The data are noisy colour fields captioned in varied words: easy enough to learn in 50 steps,
so a loss stuck at ln(B) is the model's fault, not the data's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import peace_core as peace
from peace_core.data.synth_image import COLOURS
from peace_core.losses import embedding_spread

TEMPLATES = (
    "a {} picture.",
    "the colour is {}, mostly.",
    "noise, tinted {}.",
    "{}",
    "an image that looks {} to me.",
    "plain {} texture with grain.",
)
BATCH = 32


def _colour_fields(count: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(seed)
    images, captions = [], []
    names = list(COLOURS)
    for _ in range(count):
        name = names[int(rng.integers(len(names)))]
        noise = rng.normal(0.0, 40.0, (64, 64, 3)) + np.asarray(COLOURS[name])
        images.append(Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)))
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        captions.append(template.format(name))
    return images, captions


@pytest.fixture(scope="module")
def colour_data() -> tuple[list[Image.Image], list[str]]:
    return _colour_fields(600, seed=7)


def clip_loop(
    data: tuple[list[Image.Image], list[str]], *, lr: float, steps: int, **overrides: object
) -> dict[int, dict[str, float]]:
    """Loss and embedding spreads at steps 0, 10 and ``steps`` of a plain CLIP loop."""
    torch.manual_seed(0)
    model = peace.create_model("tiny", modalities=["vision", "text"], **overrides)
    images, captions = data
    pixels = model.preprocess(vision=images)["vision"]
    tokens = model.preprocess(text=captions)["text"]
    vision, text = model.branch("vision"), model.branch("text")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(1)
    targets = torch.arange(BATCH)
    seen: dict[int, dict[str, float]] = {}
    for step in range(steps + 1):
        rows = torch.randint(0, len(captions), (BATCH,), generator=order)
        v = vision({"vision": {k: t[rows] for k, t in pixels.items()}})["vision"].embedding
        t = text({"text": {k: x[rows] for k, x in tokens.items()}})["text"].embedding
        logits = model.logit_scale.exp() * v @ t.T
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        if step in (0, 10, steps):
            seen[step] = {
                "loss": float(loss.detach()),
                "spread_vision": float(embedding_spread(v)),
                "spread_text": float(embedding_spread(t)),
            }
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return seen


@pytest.mark.parametrize("lr", [1e-4, 5e-4])
def test_plain_clip_loop_learns_with_the_default_init(colour_data, lr: float) -> None:
    seen = clip_loop(colour_data, lr=lr, steps=50)
    chance = math.log(BATCH)
    assert seen[50]["loss"] < 0.9 * chance, seen
    # No collapse on the way: embeddings keep varying across the batch.
    for step in (10, 50):
        assert seen[step]["spread_vision"] > 0.3, (step, seen)
        assert seen[step]["spread_text"] > 0.3, (step, seen)


def test_official_init_collapses_where_the_default_does_not(colour_data) -> None:
    """The control: the same loop with ONE-PEACE's init makes every embedding alike first."""
    official = clip_loop(colour_data, lr=5e-4, steps=10, init="official")
    default = clip_loop(colour_data, lr=5e-4, steps=10)
    assert official[10]["spread_text"] < 0.15, official
    assert default[10]["spread_text"] > 2 * official[10]["spread_text"], (default, official)
