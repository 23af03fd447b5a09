"""Work on many files in a few processes: the files cut into shares of about equal
work, each share but the first done by a forked child that sends its result back
through a pipe, the first done here.

Python threads would not help the work done here (hashing 4 KiB blocks, copying
files): each call is too short for them to overlap, and two threads hashed slower than
one. A child is forked only while this process runs no other thread (a fork copies
no thread, and a lock another thread holds would stay held). A child that fails has
its share done again here, so an error is raised by this process, with its message;
a share no process can be forked for (a limit on processes) is done here too.
The results come back in the order of the files: they never depend on the number of
processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence

from reprobuild.trees.tree import Entry

MAX_PROCESSES = 4
PARALLEL_MIN_FILES = 256
"""Fewer files are done in this process alone: a fork would cost more."""
FILE_COST = 16 << 10
"""What opening a file costs, counted in bytes read (measured on a root filesystem)."""

Work = Callable[[Sequence[Entry]], bytes]
_ENDING = (signal.SIGINT, signal.SIGTERM)


def process_count(files: int, processes: int | None) -> int:
    """How many processes share ``files`` files (``processes`` None: one per CPU, at
    most :data:`MAX_PROCESSES`)."""
    wanted = processes if processes is not None else min(os.cpu_count() or 1, MAX_PROCESSES)
    if files < PARALLEL_MIN_FILES or threading.active_count() > 1:
        return 1
    return max(wanted, 1)


def shares(entries: Sequence[Entry], count: int, *, head_start: int = 0) -> list[Sequence[Entry]]:
    """``entries`` cut into at most ``count`` runs of about equal work (bytes, plus
    what a file's open costs), none empty (one empty run for no entries). The first run
    is ``head_start`` (in the same units) lighter: this process has other work to do."""
    costs = [e.size + FILE_COST for e in entries]
    total = sum(costs) + head_start
    runs: list[Sequence[Entry]] = []
    start = 0
    done = head_start
    for index, cost in enumerate(costs):
        done += cost
        if len(runs) < count - 1 and done * count >= total * (len(runs) + 1):
            runs.append(entries[start:index + 1])
            start = index + 1
    if start < len(entries):
        runs.append(entries[start:])
    return runs or [entries]


def in_processes(entries: Sequence[Entry], work: Work, *,
                 processes: int | None = None) -> list[bytes]:
    """``work`` of each share of ``entries``, in order; see the module's description."""
    with started(entries, work, processes=processes) as results:
        return results()


@contextlib.contextmanager
def started(entries: Sequence[Entry], work: Work, *, processes: int | None = None,
            head_start: int = 0) -> Iterator[Callable[[], list[bytes]]]:
    """The children for every share of ``entries`` but the first, forked now; yields a
    function that does the first share here (do other work before calling it; the first
    share is ``head_start`` lighter for it) and returns ``work`` of each share, in order.
    Children left when the block ends (an error, an interruption) are ended."""
    runs = shares(entries, process_count(len(entries), processes), head_start=head_start)
    children: list[tuple[int, int] | None] = []  # for runs[1:]; None: done here

    def results() -> list[bytes]:
        found = [work(runs[0])]
        for index, run in enumerate(runs[1:]):
            child, children[index] = children[index], None
            result = None if child is None else _collect(*child)
            found.append(work(run) if result is None else result)
        return found

    try:
        for run in runs[1:]:  # after a fork fails (a process limit), no more tries
            failed = bool(children) and children[-1] is None
            children.append(None if failed else _forked(run, work))
        yield results
    finally:  # an error or an interruption here: the children left are ended
        for child in children:
            if child is not None:
                pid, read_end = child
                os.close(read_end)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)


def _forked(run: Sequence[Entry], work: Work) -> tuple[int, int] | None:
    """A child process doing ``work(run)`` into a pipe: (its pid, the read end); None
    when no process or pipe can be made."""
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return None
    # SIGINT and SIGTERM held back over the fork, so that a child takes them (as the
    # KeyboardInterrupt of reprobuild's handler) only inside the block that ends it:
    # never in its copy of this process's stack.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ENDING)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # the child: the result out, then leave without running any cleanup
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(read_end)
            with open(write_end, "wb") as out:
                out.write(b"\1" + work(run))
            code = 0
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(write_end)
    return pid, read_end


def _collect(pid: int, read_end: int) -> bytes | None:
    """A child's result, or None when it failed (the caller does its share again)."""
    with open(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data.startswith(b"\1"):
        return None
    return data[1:]
