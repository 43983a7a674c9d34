"""``peace pretrain CONFIG``: pretrain (or extend) a model on webdataset shards."""

from __future__ import annotations

import argparse
from typing import Any

from peace_core.cli.threads import add_threads_option, check_threads


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain a model with the ONE-PEACE objective from a TOML/YAML config",
        description="Pretrain a model on webdataset shards with the aligning and denoising "
        "contrasts. CONFIG is a TOML or YAML file (see configs/); --set changes any field. "
        "A run continues from OUTPUT_DIR's latest checkpoint unless auto_resume=false. "
        "Under torchrun the same command trains with DDP.",
        epilog="examples:\n"
        "  peace pretrain configs/stage1_tiny.toml\n"
        "  peace pretrain configs/stage1_tiny.toml --set optim.lr=1e-3 --set data.batch_size=16\n"
        "  torchrun --nproc-per-node 8 -m peace_core.cli pretrain configs/stage1_4b.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="TOML or YAML pretraining config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (dotted key; YAML value), e.g. schedule.total_steps=100; "
        "repeatable",
    )
    parser.add_argument(
        "--resume",
        metavar="PATH",
        default=None,
        help="continue from this checkpoint file or run directory (default: OUTPUT_DIR's latest)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="stop at optimizer step N (the schedule is unchanged); resume later to go on",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_threads_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from peace_core.pretrain.config import load_pretrain_config
    from peace_core.pretrain.signals import exit_code
    from peace_core.pretrain.trainer import pretrain

    if args.max_steps is not None and args.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
    check_threads(args)
    overrides = list(args.overrides)
    if args.threads is not None:  # the same as --set threads=N
        overrides.append(f"threads={args.threads}")
    config = load_pretrain_config(args.config, overrides)
    result = pretrain(
        config,
        resume=args.resume,
        max_steps=args.max_steps,
        progress=not args.no_progress,
    )
    if result.stopped_by is not None and result.stopped_by in ("SIGTERM", "SIGINT"):
        return exit_code(result.stopped_by)  # the shell's code for it; the checkpoint is saved
    return 0
