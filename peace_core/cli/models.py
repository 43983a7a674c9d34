"""``peace models``: the architecture presets, with their parameter counts."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the architecture presets with parameter counts",
        description="List the registered architecture presets. Counts are exact: each preset is "
        "built on the meta device (no memory) with every installed modality it names.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run)


def preset_rows() -> list[dict[str, Any]]:
    from peace_core.factory import create_model, list_models
    from peace_registry import get_registry

    registry = get_registry()
    rows = []
    for name in list_models(registry):
        model = create_model(name, device="meta", registry=registry)
        encoder = model.config.encoder
        rows.append(
            {
                "name": name,
                "description": registry.architecture(name).description,
                "dim": encoder.dim,
                "depth": encoder.depth,
                "heads": encoder.heads,
                "modalities": list(model.modalities),
                "parameters": sum(p.numel() for p in model.parameters()),
                "branch_parameters": {
                    m: sum(p.numel() for p in model.branch(m).parameters())
                    for m in model.modalities
                },
            }
        )
    return sorted(rows, key=lambda row: row["parameters"])


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3f} {unit}"
    return str(count)


def run(args: argparse.Namespace) -> int:
    rows = preset_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="peace architecture presets")
    for column in ("Preset", "D × layers × heads", "Parameters", "Per branch", "Description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        branches = ", ".join(f"{m} {_human(n)}" for m, n in row["branch_parameters"].items())
        table.add_row(
            row["name"],
            f"{row['dim']} × {row['depth']} × {row['heads']}",
            _human(row["parameters"]),
            branches,
            row["description"],
        )
    Console().print(table)
    return 0
