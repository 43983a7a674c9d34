"""Errors and warnings of the plugin registry.

Every error a user can cause derives from :class:`PeaceError`, so that front ends (the ``peace``
CLI) can print its one-line message instead of a traceback. Lookup errors also derive from
``LookupError`` so that ``except LookupError`` keeps working for callers that do not know ours.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

DISABLE_ENV = "PEACE_DISABLE_PLUGINS"
STRICT_ENV = "PEACE_STRICT_PLUGINS"


class PeaceError(Exception):
    """Base of every error peace raises about user input, plugins or checkpoints."""


class PeaceWarning(UserWarning):
    """Base of every warning peace emits."""


class PluginLoadWarning(PeaceWarning):
    """A plugin could not be loaded; the other plugins keep working."""


class PluginApiWarning(PeaceWarning):
    """A plugin targets a newer minor version of the plugin API than this library provides."""


def describe_plugin(plugin: str, dist: str, version: str) -> str:
    """``plugin 'vision' (peace-vision 0.1.0)``: how every message names a plugin."""
    origin = f"{dist} {version}".strip()
    return f"plugin {plugin!r} ({origin})" if origin else f"plugin {plugin!r}"


class PluginLoadError(PeaceError):
    """A plugin failed to import, declare its API version, or register its components."""

    def __init__(self, plugin: str, dist: str, version: str, reason: str) -> None:
        self.plugin = plugin
        self.dist = dist
        self.version = version
        self.reason = reason
        super().__init__(f"{describe_plugin(plugin, dist, version)} failed to load: {reason}")


class PluginApiVersionError(PluginLoadError):
    """A plugin was written against an incompatible major version of the plugin API."""


class InvalidRegistrationError(PeaceError, TypeError):
    """A plugin passed ``register`` something that is not what the hook expects."""


class PluginUnavailableError(PeaceError, LookupError):
    """A component was asked for whose plugin is not usable."""

    def __init__(self, message: str, *, plugin: str, status: str, reason: str | None) -> None:
        self.plugin = plugin
        self.status = status
        self.reason = reason
        super().__init__(message)


class PluginFailedError(PluginUnavailableError):
    """The plugin providing the requested component failed to load or was skipped."""


class PluginDisabledError(PluginUnavailableError):
    """The plugin providing the requested component is disabled by ``PEACE_DISABLE_PLUGINS``."""


def _plural(noun: str) -> str:
    return noun[:-1] + "ies" if noun.endswith("y") else noun + "s"


class UnknownComponentError(PeaceError, LookupError):
    """No plugin registers the requested component; the message lists what exists."""

    def __init__(
        self,
        kind: str,
        name: str,
        available: Sequence[str],
        *,
        hint: str = "",
    ) -> None:
        self.kind = kind
        self.name = name
        self.available = sorted(available)
        matches = difflib.get_close_matches(name, self.available, n=1, cutoff=0.6)
        self.suggestion = matches[0] if matches else None
        listing = ", ".join(repr(a) for a in self.available) if self.available else "none"
        message = f"unknown {kind} {name!r}"
        message += f"; did you mean {self.suggestion!r}?" if self.suggestion else "."
        message += f" Available {_plural(kind)}: {listing}."
        if hint:
            message += f" {hint}"
        super().__init__(message)

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a KeyError
        return str(self.args[0])


class ComponentConflictError(PeaceError):
    """Two plugins (usually two distributions) registered different objects under one key."""

    def __init__(self, kind: str, name: str, providers: Sequence[tuple[str, str, str]]) -> None:
        self.kind = kind
        self.name = name
        self.providers = list(providers)
        named = " and ".join(describe_plugin(*p) for p in self.providers)
        disable = ",".join(p[0] for p in self.providers[1:]) or self.providers[0][0]
        super().__init__(
            f"{kind} {name!r} is registered by more than one plugin: {named}. Neither is used; "
            f"uninstall one of the distributions or disable one plugin with "
            f"{DISABLE_ENV}={disable}"
        )


class ComponentBuildError(PeaceError, ValueError):
    """A plugin's factory raised, or returned the wrong kind of object, while a model was being
    built. The message names the component, its plugin and distribution, and the cause (chained).
    """


class ComponentOutputError(PeaceError, ValueError):
    """A built component returned something the host cannot use: an adapter's tokens of the
    wrong type, shape, dtype or device, or (in eval mode) values that are not finite. The message
    names the component, its plugin and distribution, and what was expected."""


class CheckpointFormatError(PeaceError, ValueError):
    """No installed plugin converts the given checkpoint."""
