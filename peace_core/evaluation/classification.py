"""Zero-shot classification from prompt lists (CLIP / ONE-PEACE style, spec §5.2).

A prompt file is JSON ``{"classes": ["dog", ...], "templates": ["a photo of a {}.", ...]}``
(``templates`` optional: ``["{}"]``). Every class is written into every template; the texts'
embeddings are averaged per class and renormalised, giving one class embedding each. An item is
predicted as the class whose embedding is most similar to its own.

Labels come from a sample's ``json``. The convention, in order of preference:

* ``"class"``: the class *name*, as listed in the prompt file (e.g. ``"dog"``);
* ``"label"``: the class name, or an integer index into the prompt file's ``classes``.

A prompt file may instead name the json field to read with ``"label_field"`` (e.g.
``"colour"``), to classify items along any attribute their json records. Names match exactly,
else ignoring case and surrounding spaces. A sample without the field is simply not classified;
one whose label names no class of the prompt file is skipped and counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

#: Fields of a sample's json holding its class, in order of preference.
LABEL_FIELDS: tuple[str, ...] = ("class", "label")
PLACEHOLDER = "{}"


class PromptFileError(ValueError):
    """A prompt list that cannot be used."""


class LabelError(ValueError):
    """A sample's label that names no class of the prompt list."""


@dataclass(frozen=True)
class PromptSet:
    """Class names and the templates their prompts are written from."""

    classes: tuple[str, ...]
    templates: tuple[str, ...] = (PLACEHOLDER,)
    #: The json field holding the label; ``None``: ``"class"``, else ``"label"``.
    label_field: str | None = None

    def __post_init__(self) -> None:
        if self.label_field is not None and (
            not isinstance(self.label_field, str) or not self.label_field
        ):
            raise PromptFileError(
                f"label_field must be a non-empty string, got {self.label_field!r}"
            )
        if not self.classes:
            raise PromptFileError("a prompt list needs at least one class")
        if any(not isinstance(c, str) or not c.strip() for c in self.classes):
            raise PromptFileError(f"class names must be non-empty strings, got {self.classes!r}")
        repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if repeated:
            raise PromptFileError(f"classes are listed more than once: {repeated}")
        if not self.templates:
            raise PromptFileError("a prompt list needs at least one template")
        for template in self.templates:
            if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
                raise PromptFileError(
                    f"template {template!r} must contain the placeholder {PLACEHOLDER!r} once"
                )

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "prompt list") -> PromptSet:
        """From ``{"classes": [...], "templates": [...], "label_field": ...}`` (templates and
        label_field optional) or a bare list of class names."""
        if isinstance(data, list):
            data = {"classes": data}
        if not isinstance(data, Mapping):
            raise PromptFileError(
                f"{source}: expected an object with 'classes' (and 'templates') or a list of "
                f"class names, got {type(data).__name__}"
            )
        unknown = sorted(set(data) - {"classes", "templates", "label_field"})
        if unknown:
            raise PromptFileError(
                f"{source}: unknown field(s) {unknown}; valid: classes, templates, label_field"
            )
        classes = data.get("classes")
        templates = data.get("templates", [PLACEHOLDER])
        for name, value in (("classes", classes), ("templates", templates)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PromptFileError(f"{source}: '{name}' must be a list of strings")
        try:
            return cls(tuple(classes), tuple(templates), data.get("label_field"))
        except PromptFileError as err:
            raise PromptFileError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PromptSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise PromptFileError(f"prompt file {path} is not valid JSON: {err}") from None
        return cls.from_mapping(data, source=f"prompt file {path}")

    def prompts(self, class_name: str) -> list[str]:
        return [template.replace(PLACEHOLDER, class_name) for template in self.templates]

    def label_of(self, metadata: Mapping[str, Any]) -> int | None:
        """The class index a sample's json names (see the module docstring), ``None`` if none.

        Raises :class:`LabelError` when a label is present but names no class.
        """
        for name in (self.label_field,) if self.label_field else LABEL_FIELDS:
            if name not in metadata or metadata[name] is None:
                continue
            return self._resolve(name, metadata[name])
        return None

    def _resolve(self, field: str, value: Any) -> int:
        if isinstance(value, str):
            if value in self.classes:
                return self.classes.index(value)
            folded = [c.strip().casefold() for c in self.classes]
            if value.strip().casefold() in folded:
                return folded.index(value.strip().casefold())
            raise LabelError(f"json {field} {value!r} is not one of the prompt classes")
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(self.classes):
                return value
            raise LabelError(
                f"json {field} {value} is outside the {len(self.classes)} prompt classes"
            )
        raise LabelError(f"json {field} must be a class name or index, got {type(value).__name__}")


def class_embeddings(
    prompts: PromptSet, encode_texts: Callable[[list[str]], torch.Tensor]
) -> torch.Tensor:
    """One L2-normalised embedding per class: the mean of its normalised prompt embeddings.

    ``encode_texts`` maps a list of strings to ``[len, D]`` embeddings (e.g.
    ``lambda t: model.encode(text=t)["text"]``). All prompts are encoded in one call.
    """
    texts = [prompt for name in prompts.classes for prompt in prompts.prompts(name)]
    embedded = encode_texts(texts)
    if embedded.ndim != 2 or embedded.shape[0] != len(texts):
        raise ValueError(
            f"encode_texts returned {tuple(embedded.shape)} for {len(texts)} prompts; "
            "expected [prompts, D]"
        )
    per_class = F.normalize(embedded.float(), dim=-1).view(
        len(prompts.classes), len(prompts.templates), -1
    )
    return F.normalize(per_class.mean(dim=1), dim=-1)


def confusion_matrix(
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``[C, C]`` counts: row = true class, column = predicted class."""
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must both "
            "be [N]"
        )
    for name, values in (("labels", labels), ("predictions", predictions)):
        if len(values) and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass
class ClassificationResult:
    """Accuracy, top-5 (5 or more classes), per-class accuracy and the confusion matrix."""

    classes: tuple[str, ...]
    num_samples: int
    accuracy: float
    top5: float | None
    per_class: dict[str, float | None]  # None: the class has no sample
    confusion: torch.Tensor  # [C, C] long, row = true class

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)

    @property
    def chance_top5(self) -> float | None:
        return None if self.top5 is None else min(5, len(self.classes)) / len(self.classes)

    def to_dict(self) -> dict[str, object]:
        return {
            "classes": list(self.classes),
            "samples": self.num_samples,
            "accuracy": self.accuracy,
            "top5": self.top5,
            "chance": self.chance,
            "chance_top5": self.chance_top5,
            "per_class_accuracy": self.per_class,
            "confusion_matrix": self.confusion.tolist(),
        }


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor | Sequence[int], classes: Sequence[str]
) -> ClassificationResult:
    """Score ``[N, C]`` class logits (or similarities) against true ``labels`` ``[N]``.

    Top-1 ties resolve to the lower class index (``argmax``); top-5 counts a hit when at most
    four other classes score at least as high as the true one (ties count against it).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    classes = tuple(classes)
    if logits.ndim != 2 or logits.shape[1] != len(classes):
        raise ValueError(f"logits must be [N, {len(classes)} classes], got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be [{logits.shape[0]}], got {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no labelled samples to classify")
    predictions = logits.argmax(dim=1)
    confusion = confusion_matrix(predictions, labels, len(classes))
    own = logits.gather(1, labels[:, None])
    better = (logits >= own).sum(dim=1) - 1  # the true class itself is not counted
    top5 = float((better < 5).float().mean()) if len(classes) >= 5 else None
    per_class: dict[str, float | None] = {}
    for index, name in enumerate(classes):
        count = int(confusion[index].sum())
        per_class[name] = float(confusion[index, index]) / count if count else None
    return ClassificationResult(
        classes=classes,
        num_samples=int(labels.shape[0]),
        accuracy=float((predictions == labels).float().mean()),
        top5=top5,
        per_class=per_class,
        confusion=confusion,
    )


def zero_shot_classification(
    item_embeddings: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    prompts: PromptSet,
    encode_texts: Callable[[list[str]], torch.Tensor],
) -> ClassificationResult:
    """Classify L2-normalised ``item_embeddings`` against the prompt set's class embeddings."""
    classes = class_embeddings(prompts, encode_texts)
    if item_embeddings.ndim != 2 or item_embeddings.shape[1] != classes.shape[1]:
        raise ValueError(
            f"item embeddings {tuple(item_embeddings.shape)} do not match the class embeddings' "
            f"width {classes.shape[1]}"
        )
    return classification_metrics(item_embeddings.float() @ classes.T, labels, prompts.classes)
