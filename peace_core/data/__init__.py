"""Data: the webdataset pipeline (mixing, resampling, bad-sample accounting) and the synthetic
dataset of the demo.

Names load on first use, so that importing this package (e.g. for ``peace --help``) is cheap.
"""

from __future__ import annotations

from peace_registry.lazy import lazy_exports

_EXPORTS = {
    "DataConfig": "peace_core.data.config",
    "DatasetConfig": "peace_core.data.config",
    "expand_shards": "peace_core.data.config",
    "DataStats": "peace_core.data.stats",
    "DatasetCounts": "peace_core.data.stats",
    "TooManyBadSamplesError": "peace_core.data.stats",
    "BadSampleError": "peace_core.data.samples",
    "SampleDecoder": "peace_core.data.samples",
    "DataPosition": "peace_core.data.pipeline",
    "WebDataLoader": "peace_core.data.pipeline",
    "WebDataPipeline": "peace_core.data.pipeline",
    "sequential_loader": "peace_core.data.pipeline",
    "SynthConfig": "peace_core.data.synth",
    "synthesize": "peace_core.data.synth",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
