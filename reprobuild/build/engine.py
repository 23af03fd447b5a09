"""The engine: builds a plan's missing nodes, once each, through an executor.

Everything already in the store, with its bytes checked (see Store.trusted), is reused
without starting anything. The rest is handed to an :class:`~.executor.Executor`: by
default the local thread pool (:class:`~reprobuild.build.local.LocalExecutor`), or a
Dask cluster (:mod:`reprobuild.distributed.executor`). Every entry found or built is held
as a temporary gc root until the caller releases the store (after making its result
links).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from reprobuild.build.executor import BuildReport, Executor, Failure, Options
from reprobuild.build.local import LocalExecutor
from reprobuild.build.plan import Node, Plan
from reprobuild.build.producers import PRODUCERS, Producer, offline_error, tail
from reprobuild.build.progress import Progress
from reprobuild.errors import BuildError
from reprobuild.store.store import Store
from sandbox.spec import Runner

__all__ = ["BuildReport", "Engine", "Executor", "Failure", "Options", "offline_error", "tail"]


def _warn(message: str) -> None:
    print(f"reprobuild: warning: {message}", file=sys.stderr)


class Engine:
    """Builds plans into a store. ``runner_factory`` is called at most once, before threads.

    ``producers`` maps derivation kinds to producers (default :data:`PRODUCERS`);
    ``warn`` receives messages about damaged store entries that are rebuilt;
    ``executor`` replaces the local thread pool (it then owns its own producers).
    """

    def __init__(self, store: Store, runner_factory: Callable[[], Runner], options: Options,
                 progress: Progress | None = None, *,
                 producers: Mapping[str, Producer] = PRODUCERS,
                 warn: Callable[[str], None] = _warn,
                 executor: Executor | None = None) -> None:
        self.store = store
        self.options = options
        self.progress = progress or Progress(enabled=False)
        self.producers = producers
        self.warn = warn
        self.executor: Executor = executor or LocalExecutor(
            store, runner_factory, options, self.progress, producers=producers, warn=warn)

    @property
    def runner(self) -> Runner | None:
        return self.executor.runner

    @runner.setter
    def runner(self, runner: Runner | None) -> None:
        self.executor.runner = runner

    def close(self) -> None:
        self.executor.close()

    def build(self, plan: Plan) -> BuildReport:
        """Build every node of ``plan`` that is not in the store yet (or is damaged).

        The entries of the report stay held against gc until ``store.release()``.
        """
        report = BuildReport()
        with self.store.session():
            self.store.clean_tmp()
            todo = self._cached(plan, report)
            if not todo:
                return report
            unknown = sorted({n.derivation.kind for n in todo} - set(self.producers))
            if unknown:
                raise BuildError(f"no producer for derivation kind {', '.join(unknown)}")
            self.executor.execute(plan, todo, report)
        return report

    def _cached(self, plan: Plan, report: BuildReport) -> list[Node]:
        """Record what the store has, checked; return what must be built (never below a
        hit). Hits are held against gc from now on."""
        needed: set[str] = set()
        stack = list(plan.targets)
        while stack:
            key = stack.pop()
            if key in needed or key in report.entries:
                continue
            entry = self.store.trusted(plan.nodes[key].id, warn=self.warn)
            if entry is not None:
                report.entries[key] = entry
                continue
            needed.add(key)
            stack.extend(plan.nodes[key].deps)
        # Within the session: gc cannot have run since the entries were checked.
        self.store.hold([e.derivation_id for e in report.entries.values()])
        return [n for n in plan.order() if n.key in needed]
