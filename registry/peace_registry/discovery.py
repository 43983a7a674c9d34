"""Loading plugins: entry points (or in-process objects) -> validated, attributed registrations.

Each plugin loads in isolation: import, API version check, pluggy registration, hook validation
and its registration hooks are all attempted inside one ``try``, so a broken plugin is recorded as
failed (with one warning) while the others keep working. Only strict mode re-raises.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pluggy

from peace_registry import hookspecs
from peace_registry.contract import (
    PLUGIN_API_VERSION,
    AdapterSpec,
    ArchitectureSpec,
    ComponentKind,
    DatasetSpec,
    FFNSpec,
    MaskerSpec,
    ModalitySpec,
    PreprocessorSpec,
    check_modality_name,
    component_modality,
    component_name,
)
from peace_registry.errors import (
    DISABLE_ENV,
    ComponentConflictError,
    InvalidRegistrationError,
    PluginApiVersionError,
    PluginApiWarning,
    PluginLoadError,
    PluginLoadWarning,
    describe_plugin,
)

ComponentKey = tuple[ComponentKind, str]
PluginStatus = Literal["ok", "failed", "disabled", "skipped"]

#: Registration hooks in the order they are called (modalities first), with what each accepts.
REGISTRATION_HOOKS: dict[ComponentKind, tuple[str, type]] = {
    "modality": ("peace_register_modalities", ModalitySpec),
    "adapter": ("peace_register_adapters", AdapterSpec),
    "ffn": ("peace_register_ffns", FFNSpec),
    "masker": ("peace_register_maskers", MaskerSpec),
    "preprocessor": ("peace_register_preprocessors", PreprocessorSpec),
    "architecture": ("peace_register_architectures", ArchitectureSpec),
    "dataset": ("peace_register_datasets", DatasetSpec),
}
#: Kinds keyed by a modality name, which must be a modality somebody registers.
MODALITY_COMPONENT_KINDS: tuple[ComponentKind, ...] = ("adapter", "ffn", "masker", "preprocessor")

_API_VERSION_PATTERN = re.compile(r"^(\d+)\.(\d+)$")
IN_PROCESS_DIST = "in-process"


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin comes from: a name, its distribution and how to load its object."""

    name: str
    dist: str
    version: str
    #: What is loaded, for messages (``peace_vision.plugin``).
    target: str
    load: Callable[[], object]
    #: Entry modules must declare ``PEACE_PLUGIN_API``; in-process objects default to ours.
    api_required: bool = True
    #: Module consulted for ``PEACE_PLUGIN_API`` when the loaded object is not the module itself.
    module_name: str | None = None


@dataclass(frozen=True)
class ComponentRecord:
    """One registered component and the plugin it came from."""

    kind: ComponentKind
    name: str
    value: Any
    plugin: str
    dist: str
    version: str


@dataclass(frozen=True)
class PluginRecord:
    """What happened to one plugin: its origin, status, error and what it registers."""

    name: str
    dist: str
    version: str
    status: PluginStatus
    error: str | None = None
    entry: str = ""
    api_version: str | None = None
    components: tuple[ComponentKey, ...] = ()
    warnings: tuple[str, ...] = ()
    #: Problems of an otherwise loaded plugin (a component conflicting with another plugin's).
    problems: tuple[str, ...] = ()
    #: What a failed plugin had registered before failing; lets lookups blame it by name.
    attempted: tuple[ComponentKey, ...] = field(default=(), repr=False)

    def describe(self) -> str:
        return describe_plugin(self.name, self.dist, self.version)

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    def registers(self) -> dict[str, list[str]]:
        """Registered component names grouped by kind (kinds with nothing are left out)."""
        grouped: dict[str, list[str]] = {}
        for kind, name in self.components:
            grouped.setdefault(kind, []).append(name)
        return grouped

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dist": self.dist,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "entry": self.entry,
            "api_version": self.api_version,
            "registers": self.registers(),
            "warnings": list(self.warnings),
            "problems": list(self.problems),
        }


@dataclass
class LoadResult:
    """Everything discovery produced; :class:`peace_registry.registry.Registry` wraps it."""

    records: list[PluginRecord]
    components: dict[ComponentKey, ComponentRecord]
    conflicts: dict[ComponentKey, ComponentConflictError]
    manager: pluggy.PluginManager


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def entry_point_sources(group: str = hookspecs.ENTRY_POINT_GROUP) -> list[PluginSource]:
    """One source per installed entry point of ``group``, sorted by name for a stable order."""
    sources = []
    for ep in importlib.metadata.entry_points(group=group):
        dist = ep.dist
        sources.append(
            PluginSource(
                name=ep.name,
                dist=dist.name if dist is not None else "unknown",
                version=dist.version if dist is not None else "",
                target=ep.value,
                load=ep.load,
                module_name=ep.module,
            )
        )
    return sorted(sources, key=lambda s: (s.name, s.dist))


def object_sources(plugins: Mapping[str, object]) -> list[PluginSource]:
    """Sources for plugin objects (modules or instances with hookimpls) given in Python."""
    sources = []
    for name, plugin in plugins.items():
        target = getattr(plugin, "__name__", None) or type(plugin).__qualname__
        sources.append(
            PluginSource(
                name=name,
                dist=IN_PROCESS_DIST,
                version="",
                target=str(target),
                load=lambda plugin=plugin: plugin,
                api_required=False,
            )
        )
    return sources


# --------------------------------------------------------------------------------------------
# One plugin
# --------------------------------------------------------------------------------------------


def new_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def _parse_api_version(value: object) -> tuple[int, int] | None:
    match = _API_VERSION_PATTERN.match(value) if isinstance(value, str) else None
    return (int(match[1]), int(match[2])) if match else None


def core_version() -> str:
    try:
        return importlib.metadata.version("peace-core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_api_version(source: PluginSource, declared: object) -> str | None:
    """Raise if ``declared`` is malformed or of another major version; return a warning text when
    the plugin is newer in minor version, else ``None``."""
    ours = _parse_api_version(PLUGIN_API_VERSION)
    theirs = _parse_api_version(declared)
    assert ours is not None, "contract.PLUGIN_API_VERSION must be 'MAJOR.MINOR'"
    if theirs is None:
        raise PluginLoadError(
            source.name,
            source.dist,
            source.version,
            f"PEACE_PLUGIN_API in {source.target} must be a 'MAJOR.MINOR' string such as "
            f"{PLUGIN_API_VERSION!r}, got {declared!r}",
        )
    provided = f"peace-core {core_version()} provides plugin API {PLUGIN_API_VERSION}"
    if theirs[0] != ours[0]:
        upgrade = (
            f"upgrade the plugin (pip install -U {source.dist})"
            if theirs[0] < ours[0]
            else "upgrade peace-core (pip install -U peace-core)"
        )
        raise PluginApiVersionError(
            source.name,
            source.dist,
            source.version,
            f"it targets plugin API {declared} but {provided}; the major versions differ, so it "
            f"was skipped: {upgrade}",
        )
    if theirs[1] > ours[1]:
        return (
            f"{describe_plugin(source.name, source.dist, source.version)} targets plugin API "
            f"{declared}, newer than {PLUGIN_API_VERSION} ({provided}); it is loaded, but "
            "features it relies on may be missing: upgrade peace-core (pip install -U peace-core)"
        )
    return None


def _import_plugin(source: PluginSource) -> tuple[object, object]:
    """Load the plugin object; return it with the ``PEACE_PLUGIN_API`` it declares."""
    try:
        plugin = source.load()
    except Exception as exc:
        raise PluginLoadError(
            source.name,
            source.dist,
            source.version,
            f"importing {source.target} raised {type(exc).__name__}: {exc}",
        ) from exc
    # The entry module's declaration wins over the loaded object's (``module:object`` targets).
    module = sys.modules.get(source.module_name) if source.module_name else None
    declared = getattr(module, "PEACE_PLUGIN_API", None)
    if declared is None:
        declared = getattr(plugin, "PEACE_PLUGIN_API", None)
    if declared is None:
        if source.api_required:
            raise PluginLoadError(
                source.name,
                source.dist,
                source.version,
                f"{source.target} does not declare the plugin API it was written for: add "
                f'PEACE_PLUGIN_API = "{PLUGIN_API_VERSION}" to the entry module',
            )
        declared = PLUGIN_API_VERSION
    return plugin, declared


def _validate_spec(kind: ComponentKind, spec: Any) -> str:
    """Check a registered object beyond its type; return its registry name."""
    if kind == "architecture":
        name = spec.name
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise InvalidRegistrationError(
                f"architecture name must be a non-empty string without spaces, got {name!r}"
            )
        if not isinstance(spec.config, Mapping):
            raise InvalidRegistrationError(
                f"architecture {name!r}: config must be a mapping, got {type(spec.config).__name__}"
            )
        return name
    if kind == "modality":
        return _validate_modality_spec(spec)
    if kind == "dataset":
        name = check_modality_name(spec.name, "dataset")  # it names files and a CLI choice
        if not callable(spec.load):
            raise InvalidRegistrationError(f"dataset {name!r}: load must be callable")
        return name
    name = check_modality_name(spec.modality)
    if not callable(spec.build):
        raise InvalidRegistrationError(f"{kind} for modality {name!r}: build must be callable")
    variant = spec.variant
    if variant != "":  # "" is the modality's default component
        check_modality_name(variant, f"{kind} variant")
    return component_name(name, variant)


def _validate_modality_spec(spec: ModalitySpec) -> str:
    from pydantic import BaseModel  # only needed once plugins are actually loaded

    name = check_modality_name(spec.name)
    keys = spec.input_keys
    if not isinstance(keys, tuple) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise InvalidRegistrationError(
            f"modality {name!r}: input_keys must be a non-empty tuple of strings, got {keys!r}"
        )
    exts = spec.file_extensions
    if not isinstance(exts, tuple) or not all(
        isinstance(e, str) and e and not e.startswith(".") for e in exts
    ):
        raise InvalidRegistrationError(
            f"modality {name!r}: file_extensions must be a tuple of extensions without the dot "
            f"(e.g. ('jpg', 'png')), got {exts!r}"
        )
    if not (isinstance(spec.options, type) and issubclass(spec.options, BaseModel)):
        raise InvalidRegistrationError(
            f"modality {name!r}: options must be a pydantic BaseModel class, got {spec.options!r}"
        )
    return name


class _Registrar:
    """Collects one plugin's registrations through ``register`` callbacks bound to it."""

    def __init__(self, source: PluginSource, plugin_name: str) -> None:
        self.source = source
        self.plugin_name = plugin_name
        self.items: dict[ComponentKey, ComponentRecord] = {}
        # Kept even if the plugin swallows the exception raised at it, so it still fails.
        self.error: InvalidRegistrationError | ValueError | None = None

    def callback(self, kind: ComponentKind) -> tuple[Callable[[Any], None], Callable[[], None]]:
        hook_name, expected = REGISTRATION_HOOKS[kind]
        is_open = True

        def register(spec: Any) -> None:
            if not is_open:
                self._fail(
                    InvalidRegistrationError(
                        f"register() of {hook_name} was called after the hook returned"
                    )
                )
            if not isinstance(spec, expected):
                self._fail(
                    InvalidRegistrationError(
                        f"{hook_name} registers {expected.__name__} objects, got "
                        f"{type(spec).__name__}: {spec!r:.100}"
                    )
                )
            try:
                name = _validate_spec(kind, spec)
            except (InvalidRegistrationError, ValueError) as exc:
                self._fail(exc)
            self._add(kind, name, spec)

        def close() -> None:
            nonlocal is_open
            is_open = False

        return register, close

    def _fail(self, exc: InvalidRegistrationError | ValueError) -> None:
        if self.error is None:
            self.error = exc
        raise exc

    def _add(self, kind: ComponentKind, name: str, spec: Any) -> None:
        key = (kind, name)
        existing = self.items.get(key)
        if existing is not None:
            if existing.value is spec or existing.value == spec:
                return  # an identical re-registration is a no-op
            self._fail(
                InvalidRegistrationError(
                    f"{kind} {name!r} was registered twice with different objects"
                )
            )
        src = self.source
        self.items[key] = ComponentRecord(kind, name, spec, self.plugin_name, src.dist, src.version)


def _check_hooks(manager: pluggy.PluginManager, plugin: object, source: PluginSource) -> None:
    """Fail the plugin on unknown ``peace_*`` hooks (typos) or hooks missing the marker."""

    def fail(reason: str) -> PluginLoadError:
        return PluginLoadError(source.name, source.dist, source.version, reason)

    known = [hook for hook, _ in REGISTRATION_HOOKS.values()] + ["peace_convert_checkpoint"]
    for caller in manager.get_hookcallers(plugin) or []:
        if caller.spec is None:
            guess = _closest(caller.name, known)
            hint = f"did you mean {guess!r}?" if guess else f"known hooks: {', '.join(known)}"
            raise fail(f"it implements unknown hook {caller.name!r}; {hint}")
    for name in known:
        attr = getattr(plugin, name, None)
        if callable(attr) and not hasattr(attr, f"{hookspecs.PROJECT_NAME}_impl"):
            raise fail(
                f"it defines {name} without the @hookimpl marker (from peace_registry import "
                "hookimpl), so it would never be called"
            )
    try:  # pluggy's own check, should it learn more than the loop above
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise fail(str(exc)) from exc


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _run_registration_hooks(manager: pluggy.PluginManager, registrar: _Registrar) -> None:
    source, plugin_name = registrar.source, registrar.plugin_name
    for kind, (hook_name, _) in REGISTRATION_HOOKS.items():
        hook = getattr(manager.hook, hook_name)
        for impl in hook.get_hookimpls():
            if impl.plugin_name != plugin_name:
                continue
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                raise InvalidRegistrationError(f"{hook_name} cannot be a hook wrapper")
            register, close = registrar.callback(kind)
            arguments = {"register": register}
            raised: Exception | None = None
            try:
                result = impl.function(*(arguments[a] for a in impl.argnames))
            except Exception as exc:
                raised, result = exc, None
            finally:
                close()
            if registrar.error is not None:  # even if the plugin caught or wrapped it
                raise registrar.error
            if raised is not None:
                raise PluginLoadError(
                    source.name,
                    source.dist,
                    source.version,
                    f"{hook_name} raised {type(raised).__name__}: {raised}",
                ) from raised
            if result is not None:
                raise InvalidRegistrationError(
                    f"{hook_name} returned {type(result).__name__}: call register(...) once per "
                    "component instead of returning them"
                )


def _load_one(
    manager: pluggy.PluginManager, source: PluginSource, registrar: _Registrar
) -> tuple[str, str | None]:
    """Import, check and register one plugin; return (declared API version, API warning)."""
    plugin, declared = _import_plugin(source)
    api_warning = check_api_version(source, declared)
    try:
        manager.register(plugin, name=registrar.plugin_name)
    except (ValueError, pluggy.PluginValidationError) as exc:  # already registered, bad args
        raise PluginLoadError(
            source.name, source.dist, source.version, f"pluggy refused it: {exc}"
        ) from exc
    _check_hooks(manager, plugin, source)
    try:
        _run_registration_hooks(manager, registrar)
    except (InvalidRegistrationError, ValueError) as exc:
        raise PluginLoadError(
            source.name, source.dist, source.version, f"invalid registration: {exc}"
        ) from exc
    return str(declared), api_warning


# --------------------------------------------------------------------------------------------
# All plugins
# --------------------------------------------------------------------------------------------


def failure_warning(record: PluginRecord) -> str:
    verb = "was skipped" if record.status == "skipped" else "failed to load"
    return (
        f"peace {record.describe()} {verb}: {record.error}. The other plugins keep working. "
        f"To silence this, fix or uninstall {record.dist}, or disable the plugin with "
        f"{DISABLE_ENV}={record.name}"
    )


def _unique_name(name: str, dist: str, taken: set[str]) -> str:
    unique = name if name not in taken else f"{name}@{dist}"
    suffix = 2
    while unique in taken:
        unique, suffix = f"{name}@{dist}#{suffix}", suffix + 1
    taken.add(unique)
    return unique


def _failed_record(
    name: str,
    source: PluginSource | PluginRecord,
    error: PluginLoadError,
    attempted: Iterable[ComponentKey],
) -> PluginRecord:
    status: PluginStatus = "skipped" if isinstance(error, PluginApiVersionError) else "failed"
    entry = source.target if isinstance(source, PluginSource) else source.entry
    return PluginRecord(
        name=name,
        dist=source.dist,
        version=source.version,
        status=status,
        error=error.reason,
        entry=entry,
        attempted=tuple(attempted),
    )


def dist_stem(dist: str) -> str:
    """``peace-vision`` -> ``vision``: the modality name a distribution most likely provides."""
    normalized = re.sub(r"[-_.]+", "_", dist).lower()
    return normalized.removeprefix("peace_")


def accounts_for(record: PluginRecord, key: ComponentKey) -> bool:
    """Whether an unusable plugin plausibly provides ``key``: it registered it before failing, or
    (it never got that far) its plugin or distribution is named after the modality."""
    modality = component_modality(key[1])
    if key in record.attempted or ("modality", modality) in record.attempted:
        return True
    return key[0] != "architecture" and modality in (record.name, dist_stem(record.dist))


def load_plugins(
    sources: Iterable[PluginSource], *, strict: bool, disabled: Iterable[str] = ()
) -> LoadResult:
    """Load every source in isolation and resolve conflicts across plugins."""
    blocked = set(disabled)
    manager = new_plugin_manager()
    records: dict[str, PluginRecord] = {}
    registered: dict[str, dict[ComponentKey, ComponentRecord]] = {}
    taken: set[str] = set()

    def fail(record: PluginRecord) -> None:
        records[record.name] = record
        warnings.warn(failure_warning(record), PluginLoadWarning, stacklevel=4)

    for source in sources:
        name = _unique_name(source.name, source.dist, taken)
        if source.name in blocked or name in blocked:
            records[name] = PluginRecord(
                name, source.dist, source.version, "disabled", entry=source.target
            )
            continue
        registrar = _Registrar(source, name)
        try:
            declared, api_warning = _load_one(manager, source, registrar)
        except PluginLoadError as exc:
            if manager.has_plugin(name):
                manager.unregister(name=name)
            if strict:
                raise
            fail(_failed_record(name, source, exc, registrar.items))
            continue
        if api_warning is not None:
            warnings.warn(api_warning, PluginApiWarning, stacklevel=3)
        registered[name] = registrar.items
        records[name] = PluginRecord(
            name,
            source.dist,
            source.version,
            "ok",
            entry=source.target,
            api_version=declared,
            components=tuple(registrar.items),
            warnings=(api_warning,) if api_warning else (),
        )

    _drop_orphans(manager, records, registered, strict=strict, fail=fail)
    components, conflicts = _resolve(registered)
    if conflicts and strict:
        raise next(iter(conflicts.values()))
    for conflict in conflicts.values():
        for plugin_name, _, _ in conflict.providers:
            record = records[plugin_name]
            records[plugin_name] = _with_problem(record, str(conflict))
    return LoadResult(list(records.values()), components, conflicts, manager)


def _with_problem(record: PluginRecord, problem: str) -> PluginRecord:
    return replace(record, problems=(*record.problems, problem))


def _drop_orphans(
    manager: pluggy.PluginManager,
    records: dict[str, PluginRecord],
    registered: dict[str, dict[ComponentKey, ComponentRecord]],
    *,
    strict: bool,
    fail: Callable[[PluginRecord], None],
) -> None:
    """Fail plugins registering adapters/FFNs/... for a modality nobody registers.

    Components whose modality belongs to a failed or disabled plugin are kept: lookups go through
    the modality first and report that plugin's failure instead.
    """
    changed = True
    while changed:
        changed = False
        modalities = {n for items in registered.values() for k, n in items if k == "modality"}
        unusable = [r for r in records.values() if not r.usable]
        for plugin_name, items in list(registered.items()):
            orphan = next(
                (
                    (kind, name)
                    for kind, name in items
                    if kind in MODALITY_COMPONENT_KINDS
                    and component_modality(name) not in modalities
                    and not any(
                        accounts_for(r, ("modality", component_modality(name))) for r in unusable
                    )
                ),
                None,
            )
            if orphan is None:
                continue
            record = records[plugin_name]
            listing = ", ".join(sorted(modalities)) or "none"
            error = PluginLoadError(
                record.name,
                record.dist,
                record.version,
                f"invalid registration: it registers a {orphan[0]} for modality "
                f"{component_modality(orphan[1])!r}, "
                f"but no plugin registers that modality (registered modalities: {listing})",
            )
            if strict:
                raise error
            manager.unregister(name=plugin_name)
            del registered[plugin_name]
            fail(_failed_record(plugin_name, record, error, items))
            changed = True


def _resolve(
    registered: dict[str, dict[ComponentKey, ComponentRecord]],
) -> tuple[dict[ComponentKey, ComponentRecord], dict[ComponentKey, ComponentConflictError]]:
    """Merge all plugins' registrations; one key from two plugins is a conflict (unless it is the
    very same object), and a conflicting key is dropped for everybody."""
    by_key: dict[ComponentKey, list[ComponentRecord]] = {}
    for items in registered.values():
        for key, item in items.items():
            by_key.setdefault(key, []).append(item)
    components: dict[ComponentKey, ComponentRecord] = {}
    conflicts: dict[ComponentKey, ComponentConflictError] = {}
    for key, items in by_key.items():
        if all(item.value is items[0].value for item in items):
            components[key] = items[0]
        else:
            providers = [(item.plugin, item.dist, item.version) for item in items]
            conflicts[key] = ComponentConflictError(key[0], key[1], providers)
    return components, conflicts
