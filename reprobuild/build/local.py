"""The local executor: builds nodes on this machine's thread pool, in this process.

The :mod:`~reprobuild.build.scheduler` walks the nodes in dependency order; each node is
made by the producer of its kind (:mod:`~reprobuild.build.producers`) in a locked build
directory, under its store lock (two processes asking for the same derivation build it
once), and registered with its build record. Sandboxed nodes go through a
:class:`sandbox.spec.Runner` started (by ``runner_factory``) before any thread exists.
A failure keeps its log, names the step, the log file and its last lines, and stops the
steps that depend on it; ``keep_going`` lets independent steps finish.

A Dask worker uses the same :meth:`LocalExecutor.build_node` for the one node of a task.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping

from reprobuild.build.executor import BuildReport, Failure, Options
from reprobuild.build.plan import Node, Plan
from reprobuild.build.producers import PRODUCERS, Job, Producer, offline_error
from reprobuild.build.progress import Progress
from reprobuild.build.scheduler import Cancelled, Scheduler
from reprobuild.errors import (
    NEARLY_FULL,
    BuildError,
    DiskFullError,
    ReprobuildError,
    StoreError,
    disk_full,
    free_bytes,
    no_space,
)
from reprobuild.proof import records
from reprobuild.store import canon
from reprobuild.store.store import Store, StoreEntry
from sandbox.plan import work_directory
from sandbox.spec import Runner

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Runs nodes ``options.jobs`` at a time; ``runner_factory`` is called at most once,
    before threads, and only when a node needs the sandbox."""

    def __init__(self, store: Store, runner_factory: Callable[[], Runner], options: Options,
                 progress: Progress, *, producers: Mapping[str, Producer] = PRODUCERS,
                 warn: Callable[[str], None]) -> None:
        self.store = store
        self.runner_factory = runner_factory
        self.runner: Runner | None = None
        self.options = options
        self.progress = progress
        self.producers = producers
        self.warn = warn
        self.scheduler: Scheduler[tuple[StoreEntry, bool]] = Scheduler(
            jobs=options.jobs, keep_going=options.keep_going)
        self._spare: list[str] = []
        self._spare_lock = threading.Lock()

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def execute(self, plan: Plan, todo: list[Node], report: BuildReport) -> None:
        if self.options.offline:
            fetches = [n for n in todo if self._producer(n).needs_network]
            if fetches:
                raise offline_error(plan, fetches, store=self.options.store_option)
        if self.runner is None and any(self._producer(n).needs_runner for n in todo):
            self.runner = self.runner_factory()
        try:
            self._run(plan, todo, report)
        finally:
            self.drop_spare_build_dirs()

    def _producer(self, node: Node) -> Producer:
        return self.producers[node.derivation.kind]

    def _run(self, plan: Plan, todo: list[Node], report: BuildReport) -> None:
        nodes = {n.key: n for n in todo}
        deps = {n.key: [d for d in n.deps if d not in report.entries] for n in todo}

        def done(key: str, result: tuple[StoreEntry, bool]) -> None:
            entry, built = result
            report.entries[key] = entry
            if built:
                report.built.append(key)
            self.progress.finished(key, ok=True,
                                   state=None if built else "done by another process")

        def build(key: str) -> tuple[StoreEntry, bool]:
            # Only the node's own inputs, all finished: not a copy of every entry per node
            # (quadratic for a long chain), and never iterating a dict another thread fills.
            inputs = {dep: report.entries[dep] for dep in nodes[key].deps}
            return self.build_node(plan, nodes[key], inputs)

        def failed(key: str, exc: ReprobuildError) -> None:
            log = self.store.log_path(nodes[key].id)
            report.failures.append(Failure(key, str(exc),
                                           log if _has_log(log, nodes[key]) else None, exc))
            self.progress.finished(key, ok=False)

        self.progress.start(total=len(todo))
        try:
            outcome = self.scheduler.run(deps, build, on_done=done, on_failed=failed,
                                         on_interrupt=self.close)
        finally:
            self.progress.stop()
        report.skipped.extend(outcome.skipped)
        report.cancelled.extend(outcome.cancelled)

    # -- one node -------------------------------------------------------------------
    def build_node(self, plan: Plan, node: Node, done: dict[str, StoreEntry]
                    ) -> tuple[StoreEntry, bool]:
        """Build ``node`` under its store lock; the flag says whether we built it.

        A full disk anywhere on the way (the lock's file, the producer, registration) is
        a :class:`DiskFullError` naming the file system and the node."""
        try:
            return self._build_locked(plan, node, done)
        except OSError as exc:
            full = disk_full(exc, self.store.root, f"the output of {node.key}")
            if full is None:
                raise
            raise full from None

    def _build_locked(self, plan: Plan, node: Node, done: dict[str, StoreEntry]
                      ) -> tuple[StoreEntry, bool]:
        with self.store.lock(node.id):
            entry = self.store.trusted(node.id, warn=self.warn, locked=True)
            if entry is not None:  # another process built it while we waited
                self.store.hold([node.id])
                return entry, False
            producer = self._producer(node)
            build_dir = self._take_build_dir()
            job = Job(plan, node, done, build_dir, self.store.log_path(node.id), self.runner,
                      offline=self.options.offline, cores=self.options.cores,
                      debug=self.options.debug, store_option=self.options.store_option)
            try:
                with self.scheduler.slot(node.key):
                    self.progress.started(node.key, node.display, job.log)
                    producer.produce(job)
                # Outside the slot: registration (hash, fsync) overlaps the next run.
                with self.scheduler.guard():
                    entry = self._register(job, producer)
            except Cancelled:
                self._give_back_build_dir(build_dir)
                raise
            except BaseException as exc:
                full = _disk_full(exc, node, build_dir)
                if self.options.keep_failed and node.sandboxed and isinstance(exc, BuildError) \
                        and full is None:
                    kept = self._keep(node, build_dir)
                    exc.hint = (exc.hint + "; " if exc.hint else "") + \
                        f"kept /build and $out in {kept}"
                else:
                    self._discard_build_dir(build_dir)
                if full is not None:
                    raise full from None
                raise
            self._give_back_build_dir(build_dir)
            return entry, True

    def _register(self, job: Job, producer: Producer) -> StoreEntry:
        node = job.node
        try:
            entry = self.store.register(
                node.id, job.output, derivation=node.derivation.to_json(),
                inputs=producer.input_hashes(job), epoch=producer.epoch(job),
                expected_hash=producer.expected_hash(job), fsverity_file=node.main_file,
                record=records.entry_record)
        except OSError as exc:
            full = disk_full(exc, self.store.root, f"the output of {node.key}")
            if full is not None:
                raise full from None
            raise StoreError(f"{node.key}: storing its output in {self.store.root} failed: "
                             f"{exc.strerror or exc}",
                             hint="free space in the store (reprobuild gc) and build "
                                  "again") from None
        self.store.hold([node.id])
        return entry

    def _take_build_dir(self) -> str:
        """An empty ``build/`` + ``output/`` pair under the store's tmp (reused: directory
        creation and removal are what a trivial step mostly costs on a busy filesystem)."""
        with self._spare_lock:
            if self._spare:
                return self._spare.pop()
        build_dir = self.store.new_build_dir("build")
        os.mkdir(os.path.join(build_dir, "output"))
        os.mkdir(os.path.join(build_dir, "build"))
        return build_dir

    def _give_back_build_dir(self, build_dir: str) -> None:
        scratch = os.path.join(build_dir, "build")
        for name in os.listdir(scratch):  # nondet-ok: deletion order is irrelevant
            canon.remove_tree(os.path.join(scratch, name))
        for name in os.listdir(os.path.join(build_dir, "output")):  # nondet-ok: deletion
            canon.remove_tree(os.path.join(build_dir, "output", name))
        with self._spare_lock:
            self._spare.append(build_dir)

    def drop_spare_build_dirs(self) -> None:
        with self._spare_lock:
            spare, self._spare = self._spare, []
        for build_dir in spare:
            self._discard_build_dir(build_dir)

    def _discard_build_dir(self, build_dir: str) -> None:
        """Remove a build directory and the sandbox's overlay work directory beside it
        (left behind when the sandbox server was killed, e.g. by an interrupt)."""
        self.store.drop_build_dir(build_dir)
        canon.remove_tree(work_directory(build_dir))

    def _keep(self, node: Node, build_dir: str) -> str:
        kept = os.path.join(self.store.root, "tmp", f"failed-{node.key}-{node.id[:12]}")
        canon.remove_tree(kept)
        os.rename(build_dir, kept)
        self.store.drop_build_dir(build_dir, remove=False)
        return kept


def _disk_full(exc: BaseException, node: Node, build_dir: str) -> DiskFullError | None:
    """A clear error when ``node`` failed because the store's file system is full.

    An OSError says so itself (ENOSPC while copying or unpacking); a step cannot tell us
    from inside the sandbox (its log is on the full disk too), so its failure is put
    down to the disk when what is left there is under NEARLY_FULL.
    """
    what = f"the output of {node.key}"
    if isinstance(exc, DiskFullError):
        return exc
    if isinstance(exc, OSError):
        return disk_full(exc, build_dir, what)
    if isinstance(exc, BuildError) and node.sandboxed:
        with contextlib.suppress(OSError):
            left = free_bytes(build_dir)
            if left < NEARLY_FULL:
                return no_space(build_dir, what, f"the step failed with {left} bytes left")
    return None


def _has_log(log: str, node: Node) -> bool:
    """Whether a failed node has a log worth naming (the lock makes an empty one)."""
    try:
        return node.sandboxed or os.path.getsize(log) > 0
    except OSError:
        return False
