"""peace: ONE-PEACE-style multimodal representation models where every modality is a plugin.

Importing ``peace_core`` is cheap: torch, the plugins and plugin discovery load on first use.
"""

from __future__ import annotations

from peace_registry.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "peace_core.factory",
    "from_pretrained": "peace_core.factory",
    "save_pretrained": "peace_core.factory",
    "convert_checkpoint": "peace_core.factory",
    "list_models": "peace_core.factory",
    "list_modalities": "peace_core.factory",
    "resolve_config": "peace_core.factory",
    "PeaceModel": "peace_core.model",
    "Branch": "peace_core.model",
    "ModalityOutput": "peace_core.model",
    "compose": "peace_core.model",
    "ModelConfig": "peace_core.config",
    "EncoderConfig": "peace_core.config",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
