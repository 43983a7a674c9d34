"""``peace eval``: zero-shot retrieval and classification of a checkpoint on webdataset shards."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from peace_core.cli.threads import add_threads_option, check_threads, use_threads


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot retrieval (R@1/5/10 both ways) and classification on webdataset shards",
        description="Embed every sample of SHARDS with CHECKPOINT and report zero-shot "
        "retrieval (R@1/5/10 in both directions for every modality-text pair present; a "
        "sample's txt file and json 'captions'/'caption'/'text' fields are its captions) and, "
        "for each modality given a prompt list, zero-shot classification of the samples whose "
        "json names a class ('class': name, or 'label': name or index into the prompt classes; "
        "or the field named by the prompt list's label_field). A prompt list is JSON "
        '{"classes": [...], "templates": ["a photo of a {}.", ...], "label_field": "..."} '
        "(templates and label_field optional). "
        "Writes OUT/metrics.json, confusion matrix and similarity heatmap PNGs.",
    )
    parser.add_argument("checkpoint", type=Path, help="native or official checkpoint")
    parser.add_argument(
        "shards", nargs="+", help="webdataset shards: paths, globs or brace patterns"
    )
    parser.add_argument(
        "--prompts",
        nargs="+",
        default=[],
        metavar="MODALITY=FILE",
        help="prompt lists for zero-shot classification, e.g. vision=prompts/vision.json; "
        "MODALITY:NAME=FILE adds another task on the same modality (vision:colour=colour.json)",
    )
    parser.add_argument("--out", type=Path, default=Path("eval"), help="output folder (./eval)")
    parser.add_argument("--batch-size", type=int, default=64, help="items per forward (64)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--metrics-log",
        nargs="+",
        default=[],
        metavar="[LABEL=]FILE",
        help="training metrics.jsonl files to plot as loss curves (OUT/loss_curves.png)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_option(parser)
    parser.set_defaults(handler=run)


def parse_assignments(values: list[str], what: str) -> dict[str, str]:
    """``["a=x", "b=y"]`` -> ``{"a": "x", "b": "y"}``; a malformed or repeated entry is an error."""
    parsed: dict[str, str] = {}
    for value in values:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            raise ValueError(f"{what} {value!r}: expected NAME=FILE")
        if name in parsed:
            raise ValueError(f"{what}: {name!r} is given twice")
        parsed[name] = target
    return parsed


def _metrics_logs(values: list[str]) -> dict[str, str]:
    logs: dict[str, str] = {}
    for value in values:
        label, sep, target = value.partition("=")
        if not sep:
            label, target = Path(value).parent.name or value, value
        if not Path(target).is_file():
            raise FileNotFoundError(f"--metrics-log {target}: no such file")
        logs[label] = target
    return logs


def run(args: argparse.Namespace) -> int:
    check_threads(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    prompts = parse_assignments(args.prompts, "--prompts")
    for modality, path in prompts.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"--prompts {modality}={path}: no such file")
    logs = _metrics_logs(args.metrics_log)
    from peace_core.sharded_checkpoint import is_sharded_checkpoint

    if not (args.checkpoint.is_file() or is_sharded_checkpoint(args.checkpoint)):
        raise FileNotFoundError(
            f"checkpoint {args.checkpoint} does not exist (expected a file or a sharded "
            "checkpoint directory)"
        )

    from rich.console import Console

    from peace_core.evaluation.report import (
        plot_loss_curves,
        print_metrics,
        write_evaluation_report,
    )
    from peace_core.evaluation.zero_shot import evaluate
    from peace_core.factory import from_pretrained

    start = time.perf_counter()
    use_threads(args)
    model = from_pretrained(args.checkpoint, device=args.device)
    result = evaluate(
        model, args.shards, prompts, batch_size=args.batch_size, progress=not args.quiet
    )
    extra = {
        "checkpoint": str(args.checkpoint),
        "shards": list(args.shards),
        "prompts": prompts,
        "seconds": round(time.perf_counter() - start, 2),
    }
    metrics = write_evaluation_report(result, args.out, extra=extra)
    if logs:
        plot_loss_curves(logs, args.out / "loss_curves.png")
    console = Console()
    print_metrics(metrics, console)
    console.print(f"wrote {args.out / 'metrics.json'}")
    if "plots_skipped" in metrics:
        console.print(f"no plots: {metrics['plots_skipped']}")
    return 0
