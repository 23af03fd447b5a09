"""The command line: parses arguments, runs one subcommand, prints errors, picks exit codes.

Only this module prints errors and chooses exit codes; library code raises
:class:`~reprobuild.errors.ReprobuildError`. Exit codes: 0 success or identical, 1 a build
failed or is not reproducible, 2 usage, recipe or environment error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from reprobuild import __version__
from reprobuild.errors import ReprobuildError

# name -> module in reprobuild.commands. Imported lazily: only the chosen one is loaded.
COMMANDS: dict[str, str] = {
    "build": "build",
    "show": "show",
    "log": "log",
    "path": "path",
    "fetch": "fetch",
    "store": "store",
    "gc": "gc",
    "shell": "shell",
    "image": "image",
    "verity": "verity",
    "fsverity": "fsverity",
    "check": "check",
    "diff": "diff",
    "sign": "sign",
    "challenge": "challenge",
    "copy": "copy",
    "cache": "cache",
    "worker": "worker",
    "cluster-certs": "cluster_certs",
    "test": "test",
}


def default_store() -> str:
    """The embedded default store: $XDG_CACHE_HOME/reprobuild (no server needed)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "reprobuild")


def create_default_store(path: str) -> None:
    """Create the default store directory mode 0700 when it does not exist yet.

    Outputs in the store are world-readable files (0444), so the store's own directory is
    what keeps one user's builds (and any private input they hold) from the others. An
    existing directory and ``--store DIR`` are left as they are.
    """
    with contextlib.suppress(OSError):  # Store() reports an unusable directory
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(path, 0o700)


def terminal_columns() -> int:
    """The width argparse would read through ``shutil.get_terminal_size``: $COLUMNS, else
    the terminal's, else 80."""
    with contextlib.suppress(KeyError, ValueError):
        columns = int(os.environ["COLUMNS"])
        if columns > 0:
            return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # no stdout (None), closed, not a tty
        return 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized without importing shutil: argparse makes a formatter
    for every argument added, and shutil loads bz2 and lzma, which no command needs."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         terminal_columns() - 2 if width is None else width)


class ArgumentParser(argparse.ArgumentParser):
    """A parser (and, through ``add_subparsers``, its subparsers) using HelpFormatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", default=None,
                        help="store directory (default: $XDG_CACHE_HOME/reprobuild)")
    parser.add_argument("--debug", action="store_true",
                        help="print tracebacks and every sandbox operation")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="reprobuild",
        description="Build reproducible filesystem and disk images from recipes.")
    parser.add_argument("--version", action="version", version=f"reprobuild {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Load only the requested command's module; list the others by name.
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in COMMANDS.items():
        if name != wanted:
            sub.add_parser(name, help=f"(see reprobuild {name} --help)")
            continue
        module = importlib.import_module(f"reprobuild.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        _common(cmd)
        module.add_arguments(cmd)
        cmd.set_defaults(run=module.run)
    return parser


def _terminated(_signum: int, _frame: object) -> None:
    # SIGTERM takes the SIGINT path: running sandboxes killed, build directories
    # removed, exit 130.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(args_list)
    except ModuleNotFoundError as exc:
        print(f"reprobuild: command not available: {exc.name}", file=sys.stderr)
        return 2
    args = parser.parse_args(args_list)
    if hasattr(args, "store"):
        # What the user gave: hints that suggest a command repeat it.
        args.store_option = args.store
        if args.store is None:
            args.store = default_store()
            create_default_store(args.store)
    try:
        code: int = args.run(args)
        if argv is None and getattr(args, "frozen_at_exit", False):
            # The process exits next: what is left, cycles included, goes with it, not
            # through the interpreter's last collection (30-40 ms for the composefs
            # plan of a root filesystem, a tenth of the command).
            gc.freeze()
        return code
    except ReprobuildError as exc:
        if getattr(args, "debug", False):
            # The interpreter's own printer (the traceback module costs every start-up).
            sys.__excepthook__(type(exc), exc, exc.__traceback__)
        print(f"reprobuild: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("reprobuild: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
