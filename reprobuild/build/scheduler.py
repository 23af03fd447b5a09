"""The scheduler: walks a graph of nodes in dependency order on a thread pool.

It knows nothing of kinds, stores or sandboxes: it calls ``build(key)`` for each node
whose dependencies are done, at most ``jobs`` at once inside :meth:`Scheduler.slot`.
A failure stops what depends on it, and, unless ``keep_going``, everything that has not
started; a failure that is not a :class:`ReprobuildError` (a bug, ENOSPC outside a step)
stops everything whatever ``keep_going`` says, and is raised once running nodes end.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from reprobuild.errors import ReprobuildError, SandboxError

T = TypeVar("T")


class Cancelled(Exception):
    """A node that had not started when the build stopped after a failure."""


@dataclass
class Outcome(Generic[T]):
    """What a walk did: each finished node's result, the failures, what did not run."""

    results: dict[str, T] = field(default_factory=dict)
    failures: list[tuple[str, ReprobuildError]] = field(default_factory=list)
    # Not run because a node they depend on failed.
    skipped: list[str] = field(default_factory=list)
    # Not started because the walk stopped (a failure without keep_going): most of them
    # did not depend on the failure.
    cancelled: list[str] = field(default_factory=list)


class Scheduler(Generic[T]):
    def __init__(self, *, jobs: int, keep_going: bool) -> None:
        self.jobs = max(1, jobs)
        self.keep_going = keep_going
        self._slots = threading.Semaphore(self.jobs)
        # More threads than run slots: a finished node's registration overlaps the next
        # node's run, while at most `jobs` nodes are inside slot() at once.
        self._in_flight = 2 * self.jobs + 2
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    @contextlib.contextmanager
    def slot(self, key: str) -> Iterator[None]:
        """Hold one of the ``jobs`` run slots; raises :class:`Cancelled` when the walk
        stopped before this node started. A failure inside cancels before the slot is
        free, so no waiting node starts after it."""
        with self._slots:
            if self.cancelled:
                raise Cancelled(key)
            with self.guard():
                yield

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Cancel what has not started when the code inside fails: a ReprobuildError
        unless ``keep_going``, anything else always."""
        try:
            yield
        except ReprobuildError:
            self.cancelled = self.cancelled or not self.keep_going
            raise
        except BaseException:
            self.cancelled = True
            raise

    def run(self, deps: Mapping[str, Sequence[str]], build: Callable[[str], T], *,
            on_done: Callable[[str, T], None] | None = None,
            on_failed: Callable[[str, ReprobuildError], None] | None = None,
            on_interrupt: Callable[[], None] | None = None) -> Outcome[T]:
        """Build every key of ``deps`` (key -> keys it waits for, all within ``deps``).

        ``on_interrupt`` runs when the walk itself is interrupted (SIGINT, SIGTERM): it
        should stop what is running (kill the sandboxes), since the walk then waits for
        the running nodes to end before it re-raises."""
        self.cancelled = False
        outcome: Outcome[T] = Outcome()
        # Each node holds the set of dependencies it still waits for; one whose set empties
        # joins `ready` (in the order of ``deps``): the walk is linear in the graph's size.
        waiting = {key: set(before) for key, before in deps.items()}
        dependents: dict[str, list[str]] = {}
        for key, before in deps.items():
            for dep in before:
                dependents.setdefault(dep, []).append(key)
        ready = deque(key for key, before in waiting.items() if not before)
        running: dict[Future[T], str] = {}
        fatal: BaseException | None = None
        with ThreadPoolExecutor(max_workers=self._in_flight) as pool:
            try:
                while True:
                    while not self.cancelled and ready and len(running) < self._in_flight:
                        key = ready.popleft()
                        del waiting[key]
                        running[pool.submit(build, key)] = key
                    if not running:
                        break
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for future in done:
                        key = running.pop(future)
                        error = self._collect(key, future, outcome, waiting, dependents,
                                              ready, on_done, on_failed)
                        fatal = fatal or error
            except BaseException:
                self.cancel()  # e.g. KeyboardInterrupt: start nothing more
                if on_interrupt is not None:
                    on_interrupt()
                raise
        if self.cancelled or fatal is not None:
            outcome.cancelled.extend(waiting)
        outcome.skipped.sort()
        outcome.cancelled.sort()
        if fatal is not None:
            raise fatal
        return outcome

    def _collect(self, key: str, future: Future[T], outcome: Outcome[T],
                 waiting: dict[str, set[str]], dependents: dict[str, list[str]],
                 ready: deque[str], on_done: Callable[[str, T], None] | None,
                 on_failed: Callable[[str, ReprobuildError], None] | None
                 ) -> BaseException | None:
        """Record one finished node; return an error that must end the walk."""
        try:
            result = future.result()
        except Cancelled:
            outcome.cancelled.append(key)
            return None
        except SandboxError as exc:
            self.cancel()
            return exc  # the host cannot sandbox at all: not one node's failure
        except ReprobuildError as exc:
            outcome.failures.append((key, exc))
            if on_failed is not None:
                on_failed(key, exc)
            outcome.skipped.extend(_drop_dependents(key, waiting, dependents))
            if not self.keep_going:
                self.cancel()
            return None
        except BaseException as exc:
            self.cancel()
            return exc
        outcome.results[key] = result
        if on_done is not None:
            on_done(key, result)
        for child in dependents.get(key, []):
            if child in waiting:
                waiting[child].discard(key)
                if not waiting[child]:
                    ready.append(child)
        return None


def _drop_dependents(key: str, waiting: dict[str, set[str]],
                     dependents: dict[str, list[str]]) -> list[str]:
    dropped = []
    stack = list(dependents.get(key, []))
    while stack:
        child = stack.pop()
        if child in waiting:
            del waiting[child]
            dropped.append(child)
            stack.extend(dependents.get(child, []))
    return sorted(dropped)
