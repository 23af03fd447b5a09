"""What every ``scripts/bench_*.py`` needs: options, the source tree, one timed child.

``argument_parser`` has the options they share. ``workspace`` (or ``source_tree``) gives
a temporary directory and the tree to build from (the argument, or the generated
benchmark tree of scripts/benchtree.py) with the page cache warmed, so neither side pays
for the first read. ``run_child`` runs one command and reports its wall time, its CPU
time (user + system) and its peak memory, all of the child alone (and of the children it
waited for: a shell pipeline counts whole).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ChildRun:
    """One run of a command: wall and CPU seconds, peak resident memory in KiB."""

    wall: float
    cpu: float
    peak_kib: int


def argument_parser(description: str | None, *, repeat: int = 3) -> argparse.ArgumentParser:
    """The options every benchmark takes: the source directory and best of N runs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("tree", nargs="?", type=Path, help="source directory")
    parser.add_argument("--repeat", type=int, default=repeat, help="best of N runs each")
    return parser


@contextmanager
def workspace(name: str, tree: Path | None) -> Iterator[tuple[str, Path]]:
    """A temporary directory for the outputs, and the source tree (made there when not
    given), warmed; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        yield tmp, source_tree(tree, tmp)


def source_tree(tree: Path | None, tmp: str) -> Path:
    """``tree``, or the generated benchmark tree made in ``tmp``; its pages read once."""
    if tree is None:
        sys.path.insert(0, str(HERE))
        from benchtree import make_tree

        tree = make_tree(Path(tmp) / "tree")
    warm(tree)
    return tree


def warm(tree: Path) -> None:
    """Read every file once so that the page cache holds the tree for both sides."""
    subprocess.run(["tar", "-cf", "/dev/null", "-C", str(tree), "."], check=True)


def run_child(argv: list[str], *, output: str | None = None, env: dict[str, str] | None = None,
              shell: bool = False, cwd: str | None = None, quiet: bool = False) -> ChildRun:
    """Run ``argv`` once (its stdout dropped, stderr too when ``quiet``) after removing
    ``output``; exits the benchmark if it fails."""
    if output is not None and os.path.exists(output):
        os.unlink(output)
    start = time.perf_counter()
    proc = subprocess.Popen(" ".join(argv) if shell else argv, shell=shell, cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL if quiet else None)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed with exit code {proc.returncode}")
    return ChildRun(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
