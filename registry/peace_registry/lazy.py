"""Lazy package exports (PEP 562): a package names what it offers and where each name lives,
and the defining module is imported on first access, so that importing the package stays cheap
(``peace --help`` and plugin discovery import packages without needing torch).

Usage, at the end of a package's ``__init__``::

    __getattr__, __dir__ = lazy_exports(__name__, {"Thing": "package.things"})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package``, which exports each name of
    ``exports`` from the module it maps to."""
    table = dict(exports)

    def get_attribute(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            setattr(sys.modules[package], name, value)  # later lookups skip this hook
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def list_names() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return get_attribute, list_names
