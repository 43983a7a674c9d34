"""pytest fixtures for peace plugins (registered through the ``pytest11`` entry point).

Loaded at every pytest start, so it stays cheap: nothing is discovered and torch is not imported
until a fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from peace_registry.registry import Registry, get_registry, swap_registry


@pytest.fixture
def peace_registry_fresh() -> Iterator[Registry]:
    """A freshly discovered registry (installed plugins, current environment) that is the
    process-wide one during the test; the previous one is restored afterwards."""
    previous = swap_registry(None)
    try:
        yield get_registry()
    finally:
        swap_registry(previous)


@pytest.fixture
def peace_temporary_plugin() -> Iterator[Callable[..., Registry]]:
    """``install(plugin, name="temporary", *, installed=False) -> Registry``: make a registry
    holding ``plugin`` (plus the installed plugins when ``installed``) the process-wide one until
    the test ends."""
    from peace_registry.testing import temporary_plugins

    with ExitStack() as stack:

        def install(
            plugin: object, name: str = "temporary", *, installed: bool = False
        ) -> Registry:
            return stack.enter_context(temporary_plugins({name: plugin}, installed=installed))

        yield install
