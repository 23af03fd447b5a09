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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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
    parser.add_argument("--repeat", type=int, default=repeat,
                        help="runs of each, alternating; the table has the best of them and"
                             " the median of the run-by-run ratios")
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


def warm(tree: str | Path) -> None:
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


@dataclass(frozen=True)
class Row:
    """One line of a shape table: ours from one source against the reference tool."""

    shape: str
    source: str  # "tar" or "dir"
    ours: ChildRun
    reference: ChildRun
    entries: int
    baseline_kib: int  # peak of our child with the imports and an empty tree
    paired: float  # median of ours / reference, run by run

    @property
    def ratio(self) -> float:
        return self.ours.wall / self.reference.wall

    @property
    def per_entry_bytes(self) -> float:
        return max(0, self.ours.peak_kib - self.baseline_kib) * 1024 / max(1, self.entries)


def largest_file_alone(directory: Path, tmp: str) -> Path:
    """A directory holding only the largest regular file of ``directory`` (a copy)."""
    largest, size = None, -1
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_size > size and os.path.isfile(path) and not os.path.islink(path):
                largest, size = path, st.st_size
    alone = Path(tmp) / "largest-file-alone"
    shutil.rmtree(alone, ignore_errors=True)
    alone.mkdir()
    if largest is not None:
        shutil.copyfile(largest, alone / "largest")
    return alone


def best(runs: list[ChildRun]) -> ChildRun:
    """The fastest run, with the highest peak memory of all of them."""
    fastest = min(runs, key=lambda r: r.wall)
    return ChildRun(fastest.wall, min(r.cpu for r in runs), max(r.peak_kib for r in runs))


def print_table(title: str, reference: str, rows: list[Row], *,
                baseline: str = "an empty tree's") -> None:
    """The shape table: shape, source, ours, reference, ratio, peak memory of both."""
    print(f"\n{title}: best wall time and CPU time (user + system) of each, peak RSS of "
          f"the child (MB), our memory per entry beyond {baseline} peak; 'paired' is the "
          f"median of the wall ratios run by run (the runs alternate, so it holds when the "
          f"machine's speed drifts between runs)", flush=True)
    print(f"{'shape':<12} {'from':<4} {'ours s':>7} {reference + ' s':>14} {'ratio':>6} "
          f"{'paired':>6} "
          f"{'CPU ours':>9} {'CPU ref':>8} {'ratio':>6} {'ours MB':>8} "
          f"{reference + ' MB':>15} {'B/entry':>8}")
    for row in rows:
        cpu_ratio = row.ours.cpu / max(row.reference.cpu, 1e-9)
        print(f"{row.shape:<12} {row.source:<4} {row.ours.wall:>7.2f} "
              f"{row.reference.wall:>14.2f} {row.ratio:>6.2f} {row.paired:>6.3f} "
              f"{row.ours.cpu:>9.2f} "
              f"{row.reference.cpu:>8.2f} {cpu_ratio:>6.2f} {row.ours.peak_kib / 1024:>8.0f} "
              f"{row.reference.peak_kib / 1024:>15.0f} {row.per_entry_bytes:>8.0f}",
              flush=True)


def compare_on_shape(name: str, entries: int, sources: dict[str, str], *,
                     ours: Callable[[str], list[str]], reference: list[str], repeat: int,
                     baseline_kib: int, output: str, ref_output: str | None = None,
                     ref_env: dict[str, str] | None = None, ref_shell: bool = False,
                     ref_cwd: str | None = None,
                     check: Callable[[str], str] | None = None) -> list[Row]:
    """Alternating best-of-``repeat`` runs of the reference and of ours from each source,
    with the median of the run-by-run ratios beside the best against the best.

    ``sources`` maps "tar"/"dir" to the path ours reads; ``check`` (given our output)
    returns "clean" or what is wrong, printed for the first run from each source.
    """
    refs: list[ChildRun] = []
    runs: dict[str, list[ChildRun]] = {source: [] for source in sources}
    for _ in range(repeat):
        refs.append(run_child(reference, output=ref_output, env=ref_env, shell=ref_shell,
                              cwd=ref_cwd, quiet=True))
        for source, path in sources.items():
            runs[source].append(run_child(ours(path), output=output))
            if check is not None and len(runs[source]) == 1:
                print(f"{name} from {source}: {check(output)}", flush=True)
    return [Row(name, source, best(runs[source]), best(refs), entries, baseline_kib,
                statistics.median(o.wall / r.wall
                                  for o, r in zip(runs[source], refs, strict=True)))
            for source in sources]



MEMORY_TARGET_MB = 300
PER_ENTRY_TARGET = 2048


def largest_file_baseline(directory: str, tmp: str, ours: Callable[[str], list[str]],
                          output: str) -> int:
    """Our peak (KiB) on a tree of ``directory``'s largest file alone: the buffers the
    per-entry memory target leaves out."""
    alone = largest_file_alone(Path(directory), tmp)
    try:
        return run_child(ours(str(alone)), output=output).peak_kib
    finally:
        shutil.rmtree(alone)


def memory_ok(rows: list[Row]) -> bool:
    """Peak under MEMORY_TARGET_MB and under PER_ENTRY_TARGET bytes per entry."""
    return all(row.ours.peak_kib < MEMORY_TARGET_MB * 1024
               and row.per_entry_bytes < PER_ENTRY_TARGET for row in rows)
