"""The registry: what the installed plugins provide, looked up by kind and name.

``get_registry()`` discovers the installed plugins once per process, on first use (never at
import). ``Registry.from_plugins`` builds one from plugin objects given in Python.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from peace_registry.contract import (
    VARIANT_SEPARATOR,
    AdapterSpec,
    ArchitectureSpec,
    ComponentKind,
    ConvertedCheckpoint,
    DatasetSpec,
    FFNSpec,
    MaskerSpec,
    ModalitySpec,
    PreprocessorSpec,
    component_modality,
    component_name,
)
from peace_registry.discovery import (
    MODALITY_COMPONENT_KINDS,
    ComponentKey,
    ComponentRecord,
    LoadResult,
    PluginRecord,
    accounts_for,
    entry_point_sources,
    load_plugins,
    object_sources,
)
from peace_registry.errors import (
    DISABLE_ENV,
    STRICT_ENV,
    CheckpointFormatError,
    ComponentConflictError,
    PeaceError,
    PluginDisabledError,
    PluginFailedError,
    UnknownComponentError,
)

_TRUE = {"1", "true", "yes", "on"}


def strict_from_env() -> bool:
    """``PEACE_STRICT_PLUGINS=1``: plugin load errors are raised instead of warned about."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in _TRUE


def disabled_from_env() -> frozenset[str]:
    """Plugin (entry point) names listed in ``PEACE_DISABLE_PLUGINS=a,b``."""
    names = os.environ.get(DISABLE_ENV, "").split(",")
    return frozenset(n.strip() for n in names if n.strip())


class Registry:
    """Components registered by plugins, with the outcome of loading every plugin.

    Lookups never say "unknown" about something a broken plugin provides: they raise
    :class:`PluginFailedError` (or :class:`PluginDisabledError`) with the plugin's error instead.
    """

    def __init__(self, result: LoadResult) -> None:
        self._records = {record.name: record for record in result.records}
        self._components = result.components
        self._conflicts = result.conflicts
        self._manager = result.manager

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def discover(
        cls,
        *,
        strict: bool | None = None,
        disabled: Iterable[str] | None = None,
        extra_plugins: Mapping[str, object] | None = None,
    ) -> Registry:
        """Load every installed ``peace.plugins`` entry point (plus ``extra_plugins`` objects).

        ``strict`` and ``disabled`` default to ``PEACE_STRICT_PLUGINS`` and
        ``PEACE_DISABLE_PLUGINS``.
        """
        sources = entry_point_sources() + object_sources(extra_plugins or {})
        return cls(
            load_plugins(
                sources,
                strict=strict_from_env() if strict is None else strict,
                disabled=disabled_from_env() if disabled is None else disabled,
            )
        )

    @classmethod
    def from_plugins(
        cls,
        plugins: Mapping[str, object],
        *,
        strict: bool = True,
        disabled: Iterable[str] = (),
    ) -> Registry:
        """A registry of exactly these plugin objects (modules or objects with hookimpls), keyed
        by plugin name. Strict by default: composing in Python should fail loudly."""
        return cls(load_plugins(object_sources(plugins), strict=strict, disabled=disabled))

    # ---- components ----------------------------------------------------------------------------

    def modality(self, name: str) -> ModalitySpec:
        return self._lookup("modality", name)

    # ``variant`` picks a named variant (``"block"`` looks up ``"vision:block"``); ``""`` or
    # ``None`` the modality's default component.

    def adapter(self, name: str, variant: str | None = None) -> AdapterSpec:
        return self._lookup("adapter", component_name(name, variant or ""))

    def ffn(self, name: str, variant: str | None = None) -> FFNSpec | None:
        """The modality's FFN, or ``None`` when it uses the core default (GeGLU + Sub-LN); a named
        variant is never optional."""
        return self._lookup("ffn", component_name(name, variant or ""), optional=not variant)

    def masker(self, name: str, variant: str | None = None) -> MaskerSpec:
        return self._lookup("masker", component_name(name, variant or ""))

    def preprocessor(self, name: str, variant: str | None = None) -> PreprocessorSpec:
        return self._lookup("preprocessor", component_name(name, variant or ""))

    def variants(self, kind: ComponentKind, modality: str) -> list[str]:
        """Names of the registered variants of ``modality``'s ``kind`` (the default excluded)."""
        prefix = modality + VARIANT_SEPARATOR
        return sorted(
            n[len(prefix) :] for k, n in self._components if k == kind and n.startswith(prefix)
        )

    def architecture(self, name: str) -> ArchitectureSpec:
        return self._lookup("architecture", name)

    def dataset(self, name: str) -> DatasetSpec:
        return self._lookup("dataset", name)

    def datasets(self) -> list[str]:
        """Names of the registered synthetic dataset generators, sorted."""
        return self._names("dataset")

    def modalities(self) -> list[str]:
        """Names of the usable modalities, sorted."""
        return self._names("modality")

    def architectures(self) -> list[str]:
        """Names of the usable architecture presets, sorted."""
        return self._names("architecture")

    def component_record(self, kind: ComponentKind, name: str) -> ComponentRecord:
        """The component with its provenance (plugin, dist, version)."""
        self._lookup(kind, name)
        if (kind, name) not in self._components:  # an optional FFN that is not registered
            raise UnknownComponentError(kind, name, self._names(kind))
        return self._components[(kind, name)]

    # ---- plugins -------------------------------------------------------------------------------

    def plugins(self) -> list[PluginRecord]:
        return list(self._records.values())

    def plugin(self, name: str) -> PluginRecord:
        try:
            return self._records[name]
        except KeyError:
            raise UnknownComponentError("plugin", name, list(self._records)) from None

    def conflicts(self) -> list[ComponentConflictError]:
        return list(self._conflicts.values())

    def problems(self) -> list[str]:
        """One line per failed or skipped plugin and per conflicting component."""
        lines = [
            f"{r.describe()} {r.status}: {r.error}"
            for r in self._records.values()
            if r.status in ("failed", "skipped")
        ]
        lines.extend(str(conflict) for conflict in self._conflicts.values())
        return lines

    # ---- checkpoint conversion -----------------------------------------------------------------

    def convert_checkpoint(self, checkpoint: Mapping[str, Any], source: str) -> ConvertedCheckpoint:
        """Ask the loaded plugins' ``peace_convert_checkpoint`` in pluggy's call order; the first
        non-``None`` answer wins. Raises :class:`CheckpointFormatError` when nobody handles it."""
        impls = self._manager.hook.peace_convert_checkpoint.get_hookimpls()
        arguments = {"checkpoint": checkpoint, "source": source, "registry": self}
        for impl in reversed(impls):  # pluggy calls the last registered implementation first
            record = self._records[impl.plugin_name]
            try:
                result = impl.function(*(arguments[a] for a in impl.argnames))
            except PeaceError:
                raise
            except Exception as exc:
                raise PeaceError(
                    f"the checkpoint converter of {record.describe()} failed on {source}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if result is None:
                continue
            if not isinstance(result, ConvertedCheckpoint):
                raise PeaceError(
                    f"the checkpoint converter of {record.describe()} returned "
                    f"{type(result).__name__}, expected ConvertedCheckpoint or None"
                )
            return result
        providers = ", ".join(self._records[i.plugin_name].describe() for i in impls)
        raise CheckpointFormatError(
            f"no installed plugin recognises the checkpoint {source}"
            + (f" (converters tried: {providers})" if providers else " (no converter installed)")
        )

    # ---- internals -----------------------------------------------------------------------------

    def _names(self, kind: ComponentKind) -> list[str]:
        return sorted(name for k, name in self._components if k == kind)

    def _lookup(self, kind: ComponentKind, name: str, *, optional: bool = False) -> Any:
        per_modality = kind in MODALITY_COMPONENT_KINDS
        if per_modality:
            self.modality(component_modality(name))  # a missing or broken modality comes first
        key: ComponentKey = (kind, name)
        if key in self._conflicts:
            raise self._conflicts[key]
        if key in self._components:
            return self._components[key].value
        self._raise_if_unavailable(key, exact_only=per_modality)
        if not per_modality:
            raise UnknownComponentError(kind, name, self._names(kind), hint=self._unusable_hint())
        if optional:
            return None
        modality = component_modality(name)
        provider = self._components[("modality", modality)]
        what = f"its {kind}" if name == modality else f"the {kind} variant {name!r}"
        raise UnknownComponentError(
            kind,
            name,
            self._names(kind),
            hint=f"Modality {modality!r} is registered (by plugin {provider.plugin!r}) but no "
            f"plugin registers {what}.",
        )

    def _raise_if_unavailable(self, key: ComponentKey, *, exact_only: bool) -> None:
        for record in self._records.values():
            if record.usable:
                continue
            if exact_only and key not in record.attempted:
                continue
            if not accounts_for(record, key):
                continue
            kind, name = key
            if record.status == "disabled":
                raise PluginDisabledError(
                    f"{kind} {name!r} is unavailable: {record.describe()}, which provides it, is "
                    f"disabled by {DISABLE_ENV}",
                    plugin=record.name,
                    status=record.status,
                    reason=None,
                )
            verb = "was skipped" if record.status == "skipped" else "failed to load"
            raise PluginFailedError(
                f"{kind} {name!r} is unavailable: {record.describe()}, which provides it, {verb}: "
                f"{record.error}",
                plugin=record.name,
                status=record.status,
                reason=record.error,
            )

    def _unusable_hint(self) -> str:
        broken = [r for r in self._records.values() if r.status in ("failed", "skipped")]
        disabled = [r.name for r in self._records.values() if r.status == "disabled"]
        parts = []
        if broken:
            listing = "; ".join(f"{r.describe()}: {r.error}" for r in broken)
            parts.append(f"Plugins that failed to load (one may provide it): {listing}.")
        if disabled:
            parts.append(f"Disabled by {DISABLE_ENV}: {', '.join(disabled)}.")
        return " ".join(parts)

    def __repr__(self) -> str:
        return (
            f"Registry(plugins={sorted(self._records)}, modalities={self.modalities()}, "
            f"architectures={self.architectures()})"
        )


# --------------------------------------------------------------------------------------------
# The process-wide registry
# --------------------------------------------------------------------------------------------

_lock = threading.RLock()
_current: Registry | None = None
_discovering = False


def get_registry() -> Registry:
    """The registry of installed plugins, discovered on first call and cached for the process."""
    global _current, _discovering
    with _lock:
        if _current is None:
            if _discovering:
                raise PeaceError(
                    "get_registry() was called while plugins are being discovered (from a "
                    "plugin's import or registration hook); plugins must not look up the registry "
                    "before discovery has finished"
                )
            _discovering = True
            try:
                _current = Registry.discover()
            finally:
                _discovering = False
        return _current


def reset_registry() -> None:
    """Forget the cached registry; the next :func:`get_registry` discovers plugins again."""
    global _current
    with _lock:
        _current = None


def swap_registry(registry: Registry | None) -> Registry | None:
    """Install ``registry`` as the process-wide one (``None``: rediscover on next use); return the
    previous one. For tests and for embedding applications; see ``peace_registry.testing``."""
    global _current
    with _lock:
        previous, _current = _current, registry
        return previous
