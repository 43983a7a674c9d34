"""The ``--threads`` option shared by the commands that compute (pretrain, eval, embed, demo)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from peace_core.threads import THREADS_ENV_VAR, ThreadPlan, apply_threads, plan_threads


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=f"torch intra-op threads (default: {THREADS_ENV_VAR}, else this process's share of "
        "the CPUs less its data workers)",
    )


def check_threads(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")


def use_threads(args: argparse.Namespace, echo: Callable[[str], None] = print) -> ThreadPlan:
    """Plan and apply the threads of a command that reads its data in its own process (after
    ``check_threads``, which the command calls before any work)."""
    plan = plan_threads(threads=args.threads)
    apply_threads(plan)
    echo(plan.describe())
    return plan
