"""The ``text`` modality for peace: ONE-PEACE's L-adapter, tokenizers, whole-word masking.

Everything is exposed lazily so that importing the plugin's entry module stays cheap.
"""

from __future__ import annotations

from peace_registry.lazy import lazy_exports

_LAZY = {
    "TextOptions": "peace_text.options",
    "OfficialTokenizerOptions": "peace_text.options",
    "TrainedTokenizerOptions": "peace_text.options",
    "ByteTokenizerOptions": "peace_text.options",
    "FitTokenizerOptions": "peace_text.options",
    "fit_text_options": "peace_text.fit",
    "TokenizerFitError": "peace_text.tokenizer",
    "TextEncoding": "peace_text.tokenizer_base",
    "TextTokenizer": "peace_text.tokenizer_base",
    "OfficialTokenizer": "peace_text.official",
    "OfficialTokenizerError": "peace_text.official",
    "official_tokenizer": "peace_text.official",
    "TrainedTokenizer": "peace_text.trained",
    "train_tokenizer": "peace_text.trained",
    "ByteTokenizer": "peace_text.byte_tokenizer",
    "TokenizerMismatchError": "peace_text.tokenizer",
    "build_tokenizer": "peace_text.tokenizer",
    "text_options_for": "peace_text.tokenizer",
    "TextAdapter": "peace_text.adapter",
    "TextBatchError": "peace_text.adapter",
    "WholeWordMasker": "peace_text.masking",
    "TextMaskingError": "peace_text.masking",
    "TextPreprocessor": "peace_text.preprocess",
    "TextInputError": "peace_text.preprocess",
    "decode_txt": "peace_text.preprocess",
    "decode_json": "peace_text.preprocess",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
