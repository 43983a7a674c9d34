"""``peace plugins list|check``: what the installed plugins provide, and whether it works.

Both work while some plugin is broken (even under ``PEACE_STRICT_PLUGINS=1``): discovery here is
never strict, and a broken plugin is reported rather than raised.
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

from peace_registry.contract import PLUGIN_API_VERSION, component_modality
from peace_registry.discovery import PluginRecord, core_version
from peace_registry.errors import PeaceWarning
from peace_registry.registry import Registry


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list and check the installed plugins",
        description="List the installed peace plugins or check that they load and work.",
    )
    actions = parser.add_subparsers(dest="plugins_action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list", help="plugins with their distribution, status and registrations"
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=run_list)
    check = actions.add_parser(
        "check",
        help="load each plugin and build its components with tiny sizes (exit 1 on any failure)",
    )
    check.add_argument(
        "names", nargs="*", metavar="NAME", help="only these plugins (entry-point names)"
    )
    check.set_defaults(handler=run_check)


def discover() -> Registry:
    """Non-strict discovery; failures are in the records, so the load warnings are not repeated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeaceWarning)
        return Registry.discover(strict=False)


def describe_registrations(record: PluginRecord) -> str:
    """``vision: modality, adapter`` per modality, then ``architectures: tiny, base`` and
    ``datasets: demo``."""
    per_name: dict[str, list[str]] = {}
    named: dict[str, list[str]] = {"architecture": [], "dataset": []}
    for kind, name in record.components:
        if kind in named:
            named[kind].append(name)
        else:
            per_name.setdefault(name, []).append(kind)
    lines = [f"{name}: {', '.join(kinds)}" for name, kinds in per_name.items()]
    lines += [f"{kind}s: {', '.join(names)}" for kind, names in named.items() if names]
    return "\n".join(lines) or "-"


def run_list(args: argparse.Namespace) -> int:
    registry = discover()
    records = registry.plugins()
    if args.json:
        payload = {
            "peace_core": core_version(),
            "plugin_api": PLUGIN_API_VERSION,
            "plugins": [record.to_dict() for record in records],
            "conflicts": [str(conflict) for conflict in registry.conflicts()],
        }
        print(json.dumps(payload, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    colours = {"ok": "green", "failed": "red", "skipped": "yellow", "disabled": "dim"}
    table = Table(title=f"peace plugins (plugin API {PLUGIN_API_VERSION})")
    for column in ("Plugin", "Distribution", "Version", "Status", "Registers", "Notes"):
        table.add_column(column, overflow="fold")
    for record in records:
        notes = [n for n in (record.error, *record.problems, *record.warnings) if n]
        table.add_row(
            record.name,
            record.dist,
            record.version,
            f"[{colours[record.status]}]{record.status}[/]",
            describe_registrations(record),
            "\n".join(notes),
        )
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    if not records:
        console.print("No plugins installed (entry-point group 'peace.plugins').")
    return 0


def check_architecture(registry: Registry, name: str) -> tuple[bool, str]:
    from peace_core.config import ModelConfig

    spec = registry.architecture(name)
    try:
        config = ModelConfig.model_validate({"name": name, **dict(spec.config)})
    except Exception as exc:
        return False, f"invalid config: {' '.join(str(exc).split())}"
    missing = sorted(set(config.modalities) - set(registry.modalities()))
    note = f" (modalities not installed: {', '.join(missing)})" if missing else ""
    return True, f"config valid{note}"


def check_dataset(registry: Registry, name: str) -> tuple[bool, str]:
    """A dataset generator loads and its options build with their defaults."""
    try:
        generator = registry.dataset(name).load()
        generator.options()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if not callable(generator.generate):
        return False, "its generate is not callable"
    return True, f"loads; options {', '.join(generator.options.model_fields)}"


def check_plugin(registry: Registry, record: PluginRecord) -> bool:
    """Print the outcome for one plugin; return whether it passed. Its first line says OK or
    FAIL for the whole plugin (``grep ^FAIL`` lists the broken ones); the details follow."""
    from peace_registry.conformance import run_checks

    title = record.describe()
    if record.status == "disabled":
        print(f"OFF  {title}: disabled by PEACE_DISABLE_PLUGINS")
        return True
    if record.status != "ok":
        print(f"FAIL {title} {record.status}: {record.error}")
        return False
    passed = not record.problems
    lines = [f"  FAIL {problem}" for problem in record.problems]
    lines += [f"  WARN {warning}" for warning in record.warnings]
    # The modalities a plugin registers are checked whole; a variant it adds to any modality is
    # checked in place of that modality's default.
    subjects: dict[str, dict[str, str]] = {}
    for kind, name in record.components:
        if kind in ("architecture", "dataset"):
            continue
        modality = component_modality(name)
        if name == modality:
            subjects.setdefault(modality, {})
        else:
            subjects.setdefault(name, {})[kind] = name[len(modality) + 1 :]
    for subject, variants in sorted(subjects.items()):
        modality = component_modality(subject)
        results = run_checks(registry, modality, variants)
        failures = [r for r in results if r.status == "failed"]
        skipped = [r.name for r in results if r.status == "skipped"]
        ran = len(results) - len(skipped)
        summary = f"{ran - len(failures)}/{ran} checks passed"
        if skipped:
            summary += f", skipped: {', '.join(skipped)} (nothing registered)"
        what = f"modality {modality}" if subject == modality else f"variant {subject}"
        lines.append(f"  {'FAIL' if failures else 'OK  '} {what}: {summary}")
        by_message: dict[str, list[str]] = {}  # one root cause often fails many checks
        for failure in failures:
            by_message.setdefault(failure.message, []).append(failure.name)
        for message, names in by_message.items():
            lines.append(f"    FAIL {', '.join(names)}: {message}")
        passed = passed and not failures
    for kind, name in record.components:
        if kind not in ("architecture", "dataset"):
            continue
        check = check_architecture if kind == "architecture" else check_dataset
        ok, message = check(registry, name)
        lines.append(f"  {'OK  ' if ok else 'FAIL'} {kind} {name}: {message}")
        passed = passed and ok
    state = "registrations valid" if not record.problems else "registrations with problems"
    verdict = "" if passed else ", some checks failed"
    print(f"{'OK  ' if passed else 'FAIL'} {title}: loaded, {state}{verdict}")
    for line in lines:
        print(line)
    return passed


def run_check(args: argparse.Namespace) -> int:
    """Check every plugin (or the named ones, all named before any is checked): a broken one is
    reported and the others are still checked; exit status 1 when any failed."""
    registry = discover()
    names = list(dict.fromkeys(args.names))
    records = [registry.plugin(name) for name in names] if names else registry.plugins()
    if not records:
        print("No plugins installed (entry-point group 'peace.plugins').")
        return 0
    outcomes = [check_plugin(registry, record) for record in records]
    for conflict in registry.conflicts():
        print(f"FAIL {conflict}")
    failed = outcomes.count(False) + len(registry.conflicts())
    print(f"{len(records) - outcomes.count(False)}/{len(records)} plugins passed")
    return 1 if failed else 0
