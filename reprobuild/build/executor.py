"""What the engine hands an executor, and what an executor gives back.

The engine decides *what* must be built (everything a plan's targets need that the store
does not hold); an :class:`Executor` decides *where and how*: the local thread pool
(:mod:`reprobuild.build.local`, the default) or a Dask cluster
(:mod:`reprobuild.distributed.executor`). Both fill the same :class:`BuildReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from reprobuild.build.plan import Node, Plan
from reprobuild.errors import ReprobuildError
from reprobuild.store.store import StoreEntry
from sandbox.spec import Runner

__all__ = ["BuildReport", "Executor", "Failure", "Options"]


@dataclass(frozen=True)
class Failure:
    key: str
    message: str
    log: str | None = None
    error: ReprobuildError | None = field(default=None, compare=False, repr=False)


@dataclass
class BuildReport:
    """What a build did: the entries of every built or found node, and what failed."""

    entries: dict[str, StoreEntry] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    # Not built because something they depend on failed.
    skipped: list[str] = field(default_factory=list)
    # Not started because the build stopped after a failure (no --keep-going).
    cancelled: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.skipped and not self.cancelled


@dataclass(frozen=True)
class Options:
    jobs: int = 1
    keep_going: bool = False
    keep_failed: bool = False
    offline: bool = False
    cores: int = 1
    debug: bool = False
    # The --store given on the command line, repeated in the commands hints suggest.
    store_option: str | None = None


class Executor(Protocol):
    """Builds the nodes the store lacks, dependencies first, into a report."""

    # The sandbox fork server, when this executor runs steps in this process.
    runner: Runner | None

    def execute(self, plan: Plan, todo: list[Node], report: BuildReport) -> None:
        """Build every node of ``todo`` (in plan order; each dependency is either in
        ``todo`` or already in ``report.entries``), recording entries of the nodes the
        caller needs, the nodes built, the failures, and what was skipped or cancelled.
        Call with the store's session held."""

    def close(self) -> None:
        """Release what the executor holds (the sandbox server, a cluster connection)."""
