"""Options of the text modality; every default is the official ONE-PEACE value (spec §1.3, §3.4).

The ``tokenizer`` field says which tokenizer produces the ids, so a model config's text options
fully determine how text becomes tokens: the official GPT-2 BPE (files, or embedded), a BPE trained
by this library (embedded as JSON), or raw UTF-8 bytes. No torch or tokenizers imports here.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The four special tokens every peace text tokenizer puts at ids 0..3 (the fairseq convention).
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

#: Byte tokenizer: id = BYTE_OFFSET + byte value, after the four specials.
BYTE_OFFSET = len(SPECIAL_TOKENS)
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256

#: Vocabulary of the official model: 4 specials + the 50260 lines of ONE-PEACE's dict.txt.
OFFICIAL_VOCAB_SIZE = 50264

#: The ``tokenizers`` pre-tokenizer a trained tokenizer must use (byte-level, like GPT-2).
_BYTE_LEVEL = "ByteLevel"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class OfficialTokenizerOptions(_Strict):
    """ONE-PEACE's tokenizer: GPT-2 byte-level BPE mapped through the fairseq ``dict.txt``.

    The files are found, in this order: ``serialized`` (embedded, travels with the checkpoint),
    ``bpe_dir``, then the directory named by the ``PEACE_GPT2_BPE_DIR`` environment variable
    (whose files must be the official ones: their sha256 is always checked).
    """

    kind: Literal["official"] = "official"
    bpe_dir: str | None = Field(
        None, description="folder holding encoder.json, vocab.bpe and dict.txt (ONE-PEACE's BPE)"
    )
    serialized: str | None = Field(
        None,
        repr=False,
        description="the tokenizer embedded as JSON (OfficialTokenizer.to_options(embed=True))",
    )
    verify_sha256: bool = Field(
        True,
        description=(
            "check that the files in bpe_dir are ONE-PEACE's (known sha256); turn off to use "
            "other GPT-2-style BPE files"
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> OfficialTokenizerOptions:
        if self.bpe_dir is not None and self.serialized is not None:
            raise ValueError(
                "official tokenizer: give either bpe_dir or serialized, not both (serialized "
                "already holds everything the files hold)"
            )
        return self


class TrainedTokenizerOptions(_Strict):
    """A byte-level BPE trained by this library (``peace_text.train_tokenizer``), embedded as the
    ``tokenizers`` library's JSON so that it is saved with the model."""

    kind: Literal["trained"] = "trained"
    serialized: str = Field(
        repr=False, description="the tokenizer's JSON (TrainedTokenizer.to_options())"
    )


class ByteTokenizerOptions(_Strict):
    """UTF-8 bytes as tokens: id = 4 + byte value (vocabulary 260). Needs no files."""

    kind: Literal["bytes"] = "bytes"


class FitTokenizerOptions(_Strict):
    """A byte-level BPE to be trained on the run's training captions before the model is built.

    ``peace pretrain`` fits it (and in Python, :func:`peace_text.fit_text_options`): the result is
    a ``trained`` tokenizer embedded in the options, so the checkpoint carries it. A vocabulary
    made for the captions at hand gives a small model far shorter, more meaningful token sequences
    than raw bytes, and it needs no files.
    """

    kind: Literal["fit"] = "fit"
    vocab_size: int = Field(
        1024,
        ge=BYTE_VOCAB_SIZE,
        description="most ids to learn (4 specials + 256 bytes + merges); fewer when the "
        "captions have fewer frequent pairs",
    )
    min_frequency: int = Field(2, ge=1, description="a merge needs at least this many uses")
    max_texts: int = Field(
        50_000, ge=1, description="captions read from the training data to train on"
    )


TokenizerOptions = Annotated[
    OfficialTokenizerOptions | TrainedTokenizerOptions | ByteTokenizerOptions | FitTokenizerOptions,
    Field(discriminator="kind"),
]


def trained_vocab_size(serialized: str) -> int:
    """Vocabulary size of a trained tokenizer's JSON, after checking it is one peace can use:
    a byte-level BPE with the four specials at ids 0..3 and no added tokens (an added token would
    be matched inside plain text, so ``"<pad>"`` typed by a user would become the pad id)."""
    try:
        data = json.loads(serialized)
    except (TypeError, ValueError) as err:
        raise ValueError(f"trained tokenizer: serialized is not valid JSON ({err})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError(
            "trained tokenizer: serialized must be a `tokenizers` BPE tokenizer "
            "(peace_text.train_tokenizer(...).to_options())"
        )
    pre_tokenizer = data.get("pre_tokenizer") or {}
    if pre_tokenizer.get("type") != _BYTE_LEVEL:
        raise ValueError(
            f"trained tokenizer: expected a ByteLevel pre-tokenizer, found {pre_tokenizer!r:.80}"
        )
    if data.get("added_tokens") or data.get("normalizer") or data.get("post_processor"):
        raise ValueError(
            "trained tokenizer: added tokens, normalizers and post-processors are not supported "
            "(peace lower-cases, adds EOS and truncates from the text options)"
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError("trained tokenizer: the BPE model has no vocabulary")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if vocab.get(token) != expected_id:
            raise ValueError(
                f"trained tokenizer: {token!r} must have id {expected_id}, found "
                f"{vocab.get(token)!r}"
            )
    return max(vocab.values()) + 1


class TextOptions(_Strict):
    """Tokenizer, adapter shape and denoising-mask settings of the ``text`` modality."""

    vocab_size: int = Field(
        OFFICIAL_VOCAB_SIZE,
        gt=BYTE_OFFSET,
        description="rows of the token embedding; must equal the tokenizer's vocabulary size",
    )
    bos_id: int = Field(BOS_ID, ge=0, description="id of <s> (unused by the official model)")
    pad_id: int = Field(PAD_ID, ge=0, description="id of <pad>; padded positions are masked")
    eos_id: int = Field(EOS_ID, ge=0, description="id of </s>, appended to every text")
    unk_id: int = Field(UNK_ID, ge=0, description="id of <unk>, for pieces the vocabulary lacks")
    max_positions: int = Field(
        514,
        ge=2,
        description=(
            "rows of the learned absolute position table; position 0 is CLS, so a text holds at "
            "most max_positions - 1 tokens including EOS"
        ),
    )
    bucket_size: int = Field(
        256, ge=2, le=1024, description="1-D relative-position bucket size (spec §2.3)"
    )
    max_tokens: int = Field(
        70, ge=1, description="tokens kept from the start of a text, before EOS is appended"
    )
    lowercase: bool = Field(True, description="lower-case text before tokenizing")
    tokenizer: TokenizerOptions = Field(
        default_factory=OfficialTokenizerOptions,
        description="which tokenizer turns text into ids: official, trained, bytes, or fit "
        "(trained on the training captions when a run starts)",
    )
    mask_ratio: float = Field(
        0.15, ge=0, le=1, description="fraction of words hidden in the text-only denoising view"
    )
    joint_mask_ratio: float = Field(
        0.4,
        ge=0,
        le=1,
        description=(
            "joint views: fraction of tokens hidden among those the text-only view showed (vision-"
            "text), or of words when there is no text-only view (audio-text)"
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> TextOptions:
        specials = {"bos_id": self.bos_id, "pad_id": self.pad_id, "eos_id": self.eos_id}
        specials["unk_id"] = self.unk_id
        expected = dict(zip(specials, (BOS_ID, PAD_ID, EOS_ID, UNK_ID)))
        if specials != expected:
            raise ValueError(
                f"special ids {specials} differ from the tokenizers' {expected}: every peace text "
                "tokenizer puts <s>, <pad>, </s>, <unk> at ids 0, 1, 2, 3"
            )
        if self.max_tokens + 2 > self.max_positions:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) + EOS + CLS needs {self.max_tokens + 2} "
                f"positions, but max_positions is {self.max_positions}"
            )
        expected_vocab = self._known_tokenizer_vocab()
        if expected_vocab is not None and expected_vocab != self.vocab_size:
            raise ValueError(
                f"vocab_size {self.vocab_size} does not match the {self.tokenizer.kind} "
                f"tokenizer's vocabulary of {expected_vocab}; set vocab_size={expected_vocab}"
            )
        return self

    @property
    def needs_fit(self) -> bool:
        """Whether the tokenizer is still to be trained on data (``kind = "fit"``)."""
        return isinstance(self.tokenizer, FitTokenizerOptions)

    def _known_tokenizer_vocab(self) -> int | None:
        """The tokenizer's vocabulary size when it is known without reading files (the official
        tokenizer's is checked when it is loaded: its files may live elsewhere)."""
        if isinstance(self.tokenizer, ByteTokenizerOptions):
            return BYTE_VOCAB_SIZE
        if isinstance(self.tokenizer, TrainedTokenizerOptions):
            return trained_vocab_size(self.tokenizer.serialized)
        return None
