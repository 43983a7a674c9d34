"""From a raw webdataset sample (``{"__key__", "jpg": bytes, "txt": bytes, ...}``) to tensors.

Modality-agnostic: a file goes to the modality whose ``file_extensions`` name its extension and is
decoded by that modality's preprocessor ``decoders``. Two conventions come from webdataset
captioning datasets: ``txt`` is the caption of the ``text`` modality, and ``json`` is per-sample
metadata (it may also carry the caption, as ``"caption"`` or ``"text"``, and a class label).

Every way a sample can be unusable raises :class:`BadSampleError` with a short, stable ``reason``
(used as a counter key) and a ``detail`` saying which sample and what went wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from peace_core.config import ANCHOR_MODALITY
from peace_registry.contract import Preprocessor

#: Where captions (of the anchor modality, ``peace_core.config.ANCHOR_MODALITY``) are found.
CAPTION_EXTENSION = "txt"
CAPTION_JSON_FIELDS = ("caption", "text")
METADATA_EXTENSION = "json"


class BadSampleError(Exception):
    """A sample that cannot be used; ``reason`` is a short counter key, ``detail`` the story."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedSample:
    """One usable sample: per-modality tensors and its metadata (key, url, parsed json)."""

    inputs: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)


def modality_extensions(
    preprocessors: Mapping[str, Preprocessor], file_extensions: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    """Each modality's file extensions, in preference order (lower-case, no dot).

    The text modality also reads ``txt`` captions even when its plugin does not list them.
    """
    missing = sorted(set(preprocessors) - set(file_extensions))
    if missing:
        raise ValueError(f"no file extensions given for modalities {missing}")
    result: dict[str, tuple[str, ...]] = {}
    for modality in preprocessors:
        extensions = [ext.lower().lstrip(".") for ext in file_extensions[modality]]
        if modality == ANCHOR_MODALITY and CAPTION_EXTENSION not in extensions:
            extensions.append(CAPTION_EXTENSION)
        result[modality] = tuple(extensions)
    return result


class SampleDecoder:
    """Turns raw samples into :class:`DecodedSample` for a given set of required modalities."""

    def __init__(
        self,
        preprocessors: Mapping[str, Preprocessor],
        file_extensions: Mapping[str, Sequence[str]],
        *,
        train: bool,
    ) -> None:
        self.preprocessors = dict(preprocessors)
        self.extensions = modality_extensions(self.preprocessors, file_extensions)
        self.train = train

    def __call__(self, raw: Mapping[str, Any], modalities: Sequence[str]) -> DecodedSample:
        key = str(raw.get("__key__", "?"))
        url = str(raw.get("__url__", "?"))
        where = f"{key} in {url}"
        metadata = self._metadata(raw, where)
        inputs = {
            modality: self._tensors(modality, self._item(raw, modality, metadata, where), where)
            for modality in modalities
        }
        return DecodedSample(inputs=inputs, meta={"key": key, "url": url, "json": metadata})

    def _metadata(self, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
        if METADATA_EXTENSION not in raw:
            return {}
        try:
            value = json.loads(raw[METADATA_EXTENSION])
        except (ValueError, TypeError) as exc:
            raise BadSampleError("invalid json", f"{where}: {exc}") from exc
        if not isinstance(value, dict):
            raise BadSampleError(
                "invalid json", f"{where}: expected an object, got {type(value).__name__}"
            )
        return value

    def _item(
        self, raw: Mapping[str, Any], modality: str, metadata: Mapping[str, Any], where: str
    ) -> Any:
        """The modality's raw item, decoded from the first of its extensions the sample holds."""
        for extension in self.extensions[modality]:
            if extension not in raw:
                continue
            try:
                return self._decode(modality, extension, raw[extension], where)
            except BadSampleError as bad:
                if extension != METADATA_EXTENSION:
                    raise
                # The json is metadata first: no usable field in it means the input is missing.
                raise BadSampleError(f"missing {modality}", bad.detail) from bad
        if modality == ANCHOR_MODALITY:
            for name in CAPTION_JSON_FIELDS:
                if isinstance(metadata.get(name), str):
                    return metadata[name]
        wanted = ", ".join(self.extensions[modality])
        raise BadSampleError(f"missing {modality}", f"{where} has no {wanted} file")

    def _decode(self, modality: str, extension: str, payload: Any, where: str) -> Any:
        blank = extension == CAPTION_EXTENSION and not bytes(payload).strip()
        if isinstance(payload, bytes | bytearray) and (len(payload) == 0 or blank):
            # A zero-length member (or a blank caption) would decode to nothing or to noise.
            raise BadSampleError(f"empty {extension}", f"{where}: its {extension} file is empty")
        decoder = self.preprocessors[modality].decoders.get(extension)
        try:
            if decoder is not None:
                return decoder(payload)
            if extension == CAPTION_EXTENSION:
                return bytes(payload).decode("utf-8")
            return payload  # the preprocessor takes bytes itself
        except Exception as exc:
            raise BadSampleError(
                f"undecodable {extension}", f"{where}: {type(exc).__name__}: {exc}"
            ) from exc

    def _tensors(self, modality: str, item: Any, where: str) -> dict[str, torch.Tensor]:
        try:
            return self.preprocessors[modality](item, train=self.train)
        except Exception as exc:
            raise BadSampleError(
                f"{modality} preprocessing failed", f"{where}: {type(exc).__name__}: {exc}"
            ) from exc
