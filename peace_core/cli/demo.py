"""``peace demo``: synthetic data -> stage 1 -> stage 2 -> zero-shot eval -> report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from peace_core.cli.threads import add_threads_option, check_threads


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="pretrain a tiny model on synthetic data and evaluate it zero-shot (CPU, minutes)",
        description="Write a synthetic image/sound/caption dataset, pretrain the tiny preset on "
        "vision-text (stage 1), add audio with the shared layers and vision frozen (stage 2), "
        "evaluate zero-shot retrieval and classification on held-out data next to chance "
        "level, and write a report folder (OUT/report: README.md, metrics.json, loss curves, "
        "similarity heatmaps, confusion matrices). The full run takes about 12 minutes on 2 CPU "
        "cores; --quick about 5. Rerunning replaces a previous demo's output in OUT.",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="output folder (./demo-out)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="reduced sizes (CI): a few minutes, still learns"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_threads_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from peace_core.demo import FULL_PLAN, QUICK_PLAN, run_demo, summary_rows
    from peace_core.evaluation.report import print_metrics

    console = Console()

    def echo(message: str) -> None:  # plain text: "[demo]" is not rich markup
        console.print(message, markup=False, highlight=False)

    check_threads(args)
    plan = (QUICK_PLAN if args.quick else FULL_PLAN).model_copy(update={"threads": args.threads})
    result = run_demo(args.out, plan=plan, progress=not args.no_progress, echo=echo)
    print_metrics(result.metrics, console)
    table = Table(title=f"peace demo ({result.plan.name}): results next to chance")
    for name, justify in (("metric", "left"), ("result", "right"), ("chance", "right")):
        table.add_column(name, justify=justify)
    for row in summary_rows(result.metrics):
        table.add_row(*row)
    console.print(table)
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    console.print(f"time: {timing}")
    console.print(f"report: {result.report_dir / 'README.md'}")
    return 0
