"""The ``peace`` command line.

Each subcommand is a module ``peace_core.cli.<name>`` exposing ``add_parser(subparsers)``, which
adds its parser and sets ``handler`` (``args -> exit code``) as a default. Adding a subcommand is
one entry in :data:`SUBCOMMANDS`. Subcommand modules import heavy things inside their handlers so
that ``peace --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from peace_registry.errors import PeaceError

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[str, ...] = (
    "plugins",
    "models",
    "convert",
    "embed",
    "data",
    "pretrain",
    "eval",
    "demo",
)

#: Errors caused by user input: reported as one line, without a traceback. (KeyError and
#: friends are left out on purpose: outside PeaceError they are bugs, and deserve a traceback.)
USER_ERRORS: tuple[type[BaseException], ...] = (
    PeaceError,
    ValueError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peace-core")
    except PackageNotFoundError:
        return "unknown"


def _unavailable(name: str, error: Exception) -> None:
    raise PeaceError(f"the '{name}' command is unavailable: {type(error).__name__}: {error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peace",
        description="ONE-PEACE-style multimodal representation models; every modality a plugin.",
    )
    parser.add_argument("--version", action="version", version=f"peace-core {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ImportError as exc:  # one broken subcommand must not take the others down
            broken = subparsers.add_parser(name, help=f"(unavailable: {exc})")
            broken.set_defaults(handler=lambda args, n=name, e=exc: _unavailable(n, e))
            continue
        module.add_parser(subparsers)
    return parser


def one_line(error: BaseException) -> str:
    """An error's message on one line (pydantic and others write several)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peace``; return the exit code (0 ok, 1 failure, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's own usage error
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except USER_ERRORS as exc:
        print(f"peace {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("peace: interrupted", file=sys.stderr)
        return 130
