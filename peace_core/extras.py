"""Optional dependencies: plotting (matplotlib) and TensorBoard come with ``peace-core[train]``.

``pip install peace-core`` gives the model, the plugin API, checkpoints, embedding and zero-shot
metrics; a feature that needs an extra says which one when it is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from peace_registry.errors import PeaceError

TRAIN_EXTRA = "pip install 'peace-core[train]'"


class MissingExtraError(PeaceError, ImportError):
    """A feature needs an optional dependency that is not installed."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str) -> ModuleType:
    """``module`` imported, or an error saying that ``purpose`` needs the ``train`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{purpose} needs the {module.split('.')[0]} package, which is not installed: "
            f"{TRAIN_EXTRA}"
        ) from err
