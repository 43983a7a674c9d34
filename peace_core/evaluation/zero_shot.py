"""Zero-shot evaluation of a model on webdataset shards: read, embed, score.

Any webdataset following the usual conventions works: a sample's non-text file goes to the model
modality whose ``ModalitySpec.file_extensions`` name its extension (``jpg|png|webp`` -> vision,
``flac|wav|mp3`` -> audio, a third-party plugin's own), decoded by that plugin's preprocessor
``decoders``. Its captions are, in this order and without repeats:

* the ``txt`` file (one caption);
* the sample json's ``"captions"``, ``"caption"`` and ``"text"`` fields (a string or a list of
  strings: several captions per item are supported, as in COCO).

Its class label, for zero-shot classification, is read from the json as described in
:mod:`peace_core.evaluation.classification` (``"class"``, else ``"label"``).

A sample that cannot be used (undecodable file, invalid json, unreadable shard...) is skipped and
counted by reason, never a crash; the counts are part of the result.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from webdataset.tariterators import tarfile_samples

from peace_core.config import ANCHOR_MODALITY
from peace_core.data.config import expand_shards
from peace_core.data.samples import (
    CAPTION_EXTENSION,
    BadSampleError,
    SampleDecoder,
)
from peace_core.evaluation.classification import (
    ClassificationResult,
    LabelError,
    PromptSet,
    zero_shot_classification,
)
from peace_core.evaluation.retrieval import DEFAULT_KS, RetrievalResult, retrieval_metrics
from peace_core.model import PeaceModel
from peace_registry.errors import PeaceError

#: json fields that may hold captions (a string or a list of strings), after the ``txt`` file.
CAPTION_FIELDS: tuple[str, ...] = ("captions", "caption", "text")
#: Examples kept per skip reason, for the report.
_EXAMPLES_PER_REASON = 3


class EvaluationError(PeaceError, ValueError):
    """Shards, prompts or a model that cannot be evaluated together."""


@dataclass
class ModalityEmbeddings:
    """Everything read and embedded for one modality of the shards."""

    modality: str
    embeddings: torch.Tensor  # [N, D] L2-normalised
    keys: list[str]
    metadata: list[dict[str, Any]]
    captions: list[str]
    caption_owner: torch.Tensor  # [M] long: the item each caption belongs to
    caption_embeddings: torch.Tensor | None = None  # [M, D], filled by embed_captions

    @property
    def count(self) -> int:
        return len(self.keys)


@dataclass
class SkipCounts:
    """Samples (or shards) that were not used, by reason, with a few examples each."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < _EXAMPLES_PER_REASON:
            kept.append(detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}


@dataclass
class EvaluationResult:
    """Retrieval and classification per modality, what was read, and what was skipped."""

    retrieval: dict[str, RetrievalResult]
    classification: dict[str, ClassificationResult]
    samples: dict[str, int]
    skipped: SkipCounts
    data: dict[str, ModalityEmbeddings] = field(repr=False)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "skipped": self.skipped.to_dict(),
            "notes": self.notes,
            "retrieval": {m: r.to_dict() for m, r in self.retrieval.items()},
            "classification": {m: c.to_dict() for m, c in self.classification.items()},
        }


def sample_captions(
    raw: Mapping[str, Any],
    metadata: Mapping[str, Any],
    decode_txt: Callable[[bytes], Any] | None = None,
) -> list[str]:
    """Every caption of a raw sample (see the module docstring), in order, without repeats."""
    found: list[str] = []
    if CAPTION_EXTENSION in raw:
        payload = raw[CAPTION_EXTENSION]
        text = decode_txt(payload) if decode_txt else bytes(payload).decode("utf-8")
        found.append(str(text))
    for name in CAPTION_FIELDS:
        value = metadata.get(name)
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, str))
    return list(dict.fromkeys(text for text in found if text.strip()))


class _Batcher:
    """Collates and embeds one modality's samples a batch at a time."""

    def __init__(self, model: PeaceModel, modality: str, batch_size: int) -> None:
        self.modality = modality
        self.branch = model.branch(modality)
        self.preprocessor = model.preprocessor(modality)
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.pending: list[dict[str, torch.Tensor]] = []
        self.chunks: list[torch.Tensor] = []

    def add(self, sample: dict[str, torch.Tensor]) -> None:
        self.pending.append(sample)
        if len(self.pending) >= self.batch_size:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        if not self.pending:
            return
        collated = self.preprocessor.collate(self.pending)
        collated = {key: value.to(self.device) for key, value in collated.items()}
        output = self.branch({self.modality: collated})[self.modality]
        self.chunks.append(output.embedding.float().cpu())
        self.pending = []

    def result(self, width: int) -> torch.Tensor:
        self.flush()
        return torch.cat(self.chunks) if self.chunks else torch.empty(0, width)


def _modality_files(model: PeaceModel) -> dict[str, tuple[str, ...]]:
    """The non-text modalities of the model and the file extensions each reads."""
    files = {}
    for modality in model.modalities:
        if modality == ANCHOR_MODALITY:
            continue
        extensions = model.spec(modality).file_extensions
        files[modality] = tuple(ext.lower().lstrip(".") for ext in extensions)
    return files


def _raw_samples(urls: Sequence[str], skipped: SkipCounts) -> Iterator[dict[str, Any]]:
    def unreadable(exc: Exception) -> bool:
        skipped.add("unreadable shard or file", f"{type(exc).__name__}: {exc}"[:300])
        return True

    return tarfile_samples(({"url": url} for url in urls), handler=unreadable)


def embed_shards(
    model: PeaceModel,
    urls: str | Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[dict[str, ModalityEmbeddings], SkipCounts]:
    """Read every sample of ``urls`` once and embed its items; captions are collected, not
    embedded (see :func:`embed_captions`). Returns per-modality data and the skip counts."""
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be at least 1, got {batch_size}")
    if ANCHOR_MODALITY not in model.modalities:
        raise EvaluationError(
            "zero-shot evaluation compares items with text, but the model has no "
            f"{ANCHOR_MODALITY!r} modality (it has {list(model.modalities)})"
        )
    files = _modality_files(model)
    if not files:
        raise EvaluationError("the model has only the text modality: nothing to evaluate against")
    shards = expand_shards(list(urls) if not isinstance(urls, str) else urls, dataset="eval")
    decoder = SampleDecoder(
        {m: model.preprocessor(m) for m in files}, {m: files[m] for m in files}, train=False
    )
    decode_txt = model.preprocessor(ANCHOR_MODALITY).decoders.get(CAPTION_EXTENSION)
    batchers = {m: _Batcher(model, m, batch_size) for m in files}
    collected: dict[str, dict[str, list[Any]]] = {
        m: {"keys": [], "metadata": [], "captions": [], "owner": []} for m in files
    }
    skipped = SkipCounts()
    width = model.config.encoder.dim
    data = {}
    was_training = model.training
    model.eval()
    try:
        samples = _raw_samples(shards, skipped)
        for raw in tqdm(samples, desc="eval samples", unit="sample", disable=not progress):
            _take_sample(raw, files, decoder, decode_txt, batchers, collected, skipped)
        for modality, got in collected.items():
            if not got["keys"]:
                continue
            data[modality] = ModalityEmbeddings(
                modality=modality,
                embeddings=batchers[modality].result(width),  # the last, partial batch
                keys=got["keys"],
                metadata=got["metadata"],
                captions=got["captions"],
                caption_owner=torch.tensor(got["owner"], dtype=torch.long),
            )
    finally:
        model.train(was_training)
    if not data:
        wanted = "; ".join(f"{m}: {', '.join(exts)}" for m, exts in files.items())
        raise EvaluationError(
            f"no usable sample in {len(shards)} shard(s) ({skipped.total} skipped: "
            f"{dict(skipped.counts)}); the model reads these files: {wanted}"
        )
    return data, skipped


def _take_sample(
    raw: dict[str, Any],
    files: Mapping[str, tuple[str, ...]],
    decoder: SampleDecoder,
    decode_txt: Callable[[bytes], Any] | None,
    batchers: Mapping[str, _Batcher],
    collected: dict[str, dict[str, list[Any]]],
    skipped: SkipCounts,
) -> None:
    where = f"{raw.get('__key__', '?')} in {raw.get('__url__', '?')}"
    present = [m for m, extensions in files.items() if any(ext in raw for ext in extensions)]
    if not present:
        skipped.add("no item of a model modality", f"{where} has {sorted(_files_of(raw))}")
        return
    for modality in present:
        try:
            decoded = decoder(raw, [modality])
            captions = sample_captions(raw, decoded.meta["json"], decode_txt)
        except BadSampleError as bad:
            skipped.add(bad.reason, bad.detail)
            continue
        except Exception as exc:  # a caption file that is not text, for instance
            skipped.add("undecodable caption", f"{where}: {type(exc).__name__}: {exc}")
            continue
        got = collected[modality]
        index = len(got["keys"])
        got["keys"].append(str(raw.get("__key__", "?")))
        got["metadata"].append(decoded.meta["json"])
        got["captions"].extend(captions)
        got["owner"].extend([index] * len(captions))
        batchers[modality].add(decoded.inputs[modality])


def _files_of(raw: Mapping[str, Any]) -> list[str]:
    return [key for key in raw if not key.startswith("__")]


def embed_captions(
    model: PeaceModel, data: Mapping[str, ModalityEmbeddings], *, batch_size: int = 32
) -> None:
    """Fill ``caption_embeddings`` of every modality (all captions in one pass)."""
    everything = [caption for item in data.values() for caption in item.captions]
    if not everything:
        return
    inputs = {ANCHOR_MODALITY: everything}
    embedded = model.encode(batch_size=batch_size, progress=False, **inputs)[ANCHOR_MODALITY]
    start = 0
    for item in data.values():
        item.caption_embeddings = embedded[start : start + len(item.captions)]
        start += len(item.captions)


def _encode_texts(model: PeaceModel, batch_size: int) -> Callable[[list[str]], torch.Tensor]:
    return lambda texts: model.encode(
        batch_size=batch_size, progress=False, **{ANCHOR_MODALITY: texts}
    )[ANCHOR_MODALITY]


def _retrieval(item: ModalityEmbeddings, ks: Sequence[int]) -> RetrievalResult | None:
    """Retrieval over the items that have captions (the others cannot be scored)."""
    if item.caption_embeddings is None or not item.captions:
        return None
    owned = torch.unique(item.caption_owner)
    renumber = torch.full((item.count,), -1, dtype=torch.long)
    renumber[owned] = torch.arange(len(owned))
    return retrieval_metrics(
        item.embeddings[owned], item.caption_embeddings, renumber[item.caption_owner], ks
    )


def _classification(
    model: PeaceModel,
    task: str,
    item: ModalityEmbeddings,
    prompts: PromptSet,
    skipped: SkipCounts,
    batch_size: int,
) -> ClassificationResult | None:
    rows, labels = [], []
    for row, (key, metadata) in enumerate(zip(item.keys, item.metadata)):
        try:
            label = prompts.label_of(metadata)
        except LabelError as err:
            skipped.add(f"{task} label not in prompt classes", f"{key}: {err}")
            continue
        if label is not None:
            rows.append(row)
            labels.append(label)
    if not rows:
        return None
    return zero_shot_classification(
        item.embeddings[rows], labels, prompts, _encode_texts(model, batch_size)
    )


def task_modality(task: str) -> str:
    """The modality a classification task name is about: ``"vision"`` or ``"vision:colour"``
    (several prompt lists per modality, told apart by the part after the colon)."""
    modality, colon, name = task.partition(":")
    if not modality or (colon and not name) or ":" in name:
        raise EvaluationError(
            f"classification task {task!r}: expected MODALITY or MODALITY:NAME, e.g. 'vision' "
            "or 'vision:colour'"
        )
    return modality


def evaluate(
    model: PeaceModel,
    urls: str | Sequence[str],
    prompts: Mapping[str, PromptSet | str | os.PathLike[str]] | None = None,
    *,
    batch_size: int = 32,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = False,
) -> EvaluationResult:
    """Zero-shot retrieval (every modality-text pair present) and zero-shot classification of
    the labelled samples for every prompt list given (a :class:`PromptSet` or a JSON file).

    ``prompts`` is keyed by task: a modality name (``"vision"``), or ``"vision:colour"`` for a
    further prompt list about the same modality; results are keyed the same way.
    """
    prompt_sets = {
        task: value if isinstance(value, PromptSet) else PromptSet.from_file(value)
        for task, value in (prompts or {}).items()
    }
    modality_of = {task: task_modality(task) for task in prompt_sets}
    unknown = sorted({m for m in modality_of.values() if m not in model.modalities})
    if unknown:
        raise EvaluationError(
            f"prompts given for {unknown}, which the model does not have; it has "
            f"{list(model.modalities)}"
        )
    if ANCHOR_MODALITY in modality_of.values():
        raise EvaluationError("prompt lists classify non-text items; none is needed for 'text'")
    data, skipped = embed_shards(model, urls, batch_size=batch_size, progress=progress)
    missing = sorted({m for m in modality_of.values() if m not in data})
    if missing:
        raise EvaluationError(
            f"prompts were given for {missing} but the shards hold no such sample (found "
            f"{sorted(data)})"
        )
    embed_captions(model, data, batch_size=batch_size)
    retrieval = {}
    for modality, item in data.items():
        scored = _retrieval(item, ks)
        if scored is not None:
            retrieval[modality] = scored
    classification = {}
    notes = []
    for task, prompt_set in prompt_sets.items():
        item = data[modality_of[task]]
        result = _classification(model, task, item, prompt_set, skipped, batch_size)
        if result is None:
            fields = prompt_set.label_field or "'class' or 'label'"
            notes.append(f"{task}: no classification, as no sample's json has a usable {fields}")
        else:
            classification[task] = result
    return EvaluationResult(
        retrieval=retrieval,
        classification=classification,
        samples={m: item.count for m, item in data.items()},
        skipped=skipped,
        data=data,
        notes=notes,
    )


__all__ = [
    "CAPTION_FIELDS",
    "EvaluationError",
    "EvaluationResult",
    "ModalityEmbeddings",
    "SkipCounts",
    "embed_captions",
    "embed_shards",
    "evaluate",
    "sample_captions",
    "task_modality",
]
