"""``peace convert IN OUT``: any supported checkpoint (e.g. official ONE-PEACE) -> native file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (official ONE-PEACE, ...) into a native one",
        description="Read a checkpoint safely, convert it through the installed converters, "
        "check it loads into a model, and write a native checkpoint (.safetensors recommended) "
        "plus OUT.report.json listing mapped, ignored and missing keys.",
    )
    parser.add_argument("source", type=Path, help="checkpoint to convert")
    parser.add_argument("output", type=Path, help="native checkpoint to write (.safetensors/.pt)")
    parser.add_argument(
        "--modalities", nargs="+", metavar="NAME", help="keep only these modalities (branches)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from peace_core.factory import convert_checkpoint, model_from_converted, save_pretrained

    converted = convert_checkpoint(args.source)
    model = model_from_converted(converted, args.modalities, source=str(args.source))
    save_pretrained(model, args.output)
    kept = set(model.state_dict())
    report = {
        "source": str(args.source),
        "source_format": converted.source_format,
        "output": str(args.output),
        "modalities": list(model.modalities),
        "mapped": converted.mapped,
        "ignored": converted.ignored,
        "dropped_modalities": sorted(set(converted.state_dict) - kept),
        "missing": sorted(kept - set(converted.state_dict)),
    }
    report_path = args.output.with_name(args.output.name + ".report.json")
    report_path.write_text(json.dumps(report, indent=2))
    print(
        f"wrote {args.output} ({', '.join(model.modalities)}): {len(report['mapped'])} keys "
        f"mapped, {len(report['ignored'])} ignored, {len(report['dropped_modalities'])} dropped "
        f"with unselected modalities, {len(report['missing'])} missing; report: {report_path}"
    )
    return 0
