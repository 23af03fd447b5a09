"""The engine: builds a plan's missing nodes in parallel, in dependency order, once each.

Everything already in the store is reused without starting anything. The rest runs on a
thread pool of ``jobs`` workers; sandboxed nodes go through a :class:`sandbox.spec.Runner`
that the caller starts before any thread exists (see :mod:`reprobuild.build.sandboxing`). Each
node is built under its store lock, so two processes asking for the same derivation build
it once. A failure keeps its log, names the step, the log file and its last lines, and
stops the steps that depend on it; ``keep_going`` lets independent steps finish.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from reprobuild.build import fetch, hints, inputs, sandboxing
from reprobuild.build.plan import Node, Plan
from reprobuild.build.progress import Progress
from reprobuild.build.recipe import DebSource, HostSource, PathSource
from reprobuild.errors import BuildError, FetchError, ReprobuildError, SandboxError
from reprobuild.store import canon
from reprobuild.store.store import Store, StoreEntry
from sandbox.spec import Runner, SandboxSpec

TAIL_LINES = 10


@dataclass(frozen=True)
class Failure:
    key: str
    message: str
    log: str | None = None


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


def tail(path: str, lines: int = TAIL_LINES) -> list[str]:
    """The last lines of a log file (decoded leniently)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


class Engine:
    """Builds plans into a store. ``runner_factory`` is called at most once, before threads."""

    def __init__(self, store: Store, runner_factory: Callable[[], Runner], options: Options,
                 progress: Progress | None = None) -> None:
        self.store = store
        self.runner_factory = runner_factory
        self.runner: Runner | None = None
        self.options = options
        self.progress = progress or Progress(enabled=False)
        self._spare: list[str] = []
        self._slots = threading.Semaphore(max(1, options.jobs))
        self._in_flight = 2 * max(1, options.jobs) + 2
        self._cancelled = False
        self._spare_lock = threading.Lock()

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    # -- scheduling -----------------------------------------------------------------
    def build(self, plan: Plan) -> BuildReport:
        """Build every node of ``plan`` that is not in the store yet."""
        report = BuildReport()
        self._cancelled = False
        with self.store.session():
            todo = self._cached(plan, report)
            if not todo:
                return report
            if self.options.offline:
                fetches = [n for n in todo if n.derivation.kind == "fetch-deb"]
                if fetches:
                    raise offline_error(plan, fetches, store=self.options.store_option)
            if self.runner is None and any(n.sandboxed for n in todo):
                self.runner = self.runner_factory()
            try:
                self._run(plan, todo, report)
            finally:
                self._drop_spare_build_dirs()
        return report

    def _cached(self, plan: Plan, report: BuildReport) -> list[Node]:
        """Record what the store has; return what must be built (never below a hit)."""
        needed: set[str] = set()
        stack = list(plan.targets)
        while stack:
            key = stack.pop()
            if key in needed or key in report.entries:
                continue
            entry = self.store.lookup(plan.nodes[key].id)
            if entry is not None:
                report.entries[key] = entry
                continue
            needed.add(key)
            stack.extend(plan.nodes[key].deps)
        return [n for n in plan.order() if n.key in needed]

    def _run(self, plan: Plan, todo: list[Node], report: BuildReport) -> None:
        # Each node counts its unfinished dependencies; a node whose count drops to zero
        # joins `ready` (in plan order), so the walk is linear in the size of the graph.
        waiting = {n.key: {d for d in n.deps if d not in report.entries} for n in todo}
        nodes = {n.key: n for n in todo}
        dependents: dict[str, list[str]] = {}
        for node in todo:
            for dep in waiting[node.key]:
                dependents.setdefault(dep, []).append(node.key)
        ready = deque(k for k, deps in waiting.items() if not deps)
        running: dict[Future[tuple[StoreEntry, bool]], str] = {}
        stopped = False
        self.progress.start(total=len(todo))
        try:
            # More threads than run slots: a finished step's fsync and registration
            # overlap the next step's run, while at most `jobs` steps run at once.
            with ThreadPoolExecutor(max_workers=self._in_flight) as pool:
                while True:
                    while not stopped and ready and len(running) < self._in_flight:
                        key = ready.popleft()
                        del waiting[key]
                        inputs = {d: report.entries[d] for d in nodes[key].deps}
                        running[pool.submit(self._build_node, plan, nodes[key],
                                            inputs)] = key
                    if not running:
                        break
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for future in done:
                        key = running.pop(future)
                        try:
                            entry, built = future.result()
                        except _Cancelled:
                            report.cancelled.append(key)
                            continue
                        except SandboxError:
                            self._cancelled = True
                            raise  # the host cannot sandbox at all: not one step's failure
                        except ReprobuildError as exc:
                            log = self.store.log_path(nodes[key].id)
                            report.failures.append(Failure(
                                key, str(exc), log if _has_log(log, nodes[key]) else None))
                            self.progress.finished(key, ok=False)
                            report.skipped.extend(_drop_dependents(key, waiting, dependents))
                            if not self.options.keep_going:
                                stopped = self._cancelled = True
                            continue
                        report.entries[key] = entry
                        if built:
                            report.built.append(key)
                        self.progress.finished(key, ok=True, state=None if built else
                                               "done by another process")
                        for child in dependents.get(key, []):
                            if child in waiting:
                                waiting[child].discard(key)
                                if not waiting[child]:
                                    ready.append(child)
                if stopped:
                    # Not started because the build stopped: they did not all depend on
                    # the failure, so they are not "skipped".
                    report.cancelled.extend(waiting)
                report.skipped.sort()
                report.cancelled.sort()
        finally:
            self.progress.stop()

    # -- one node -------------------------------------------------------------------
    def _build_node(self, plan: Plan, node: Node, done: dict[str, StoreEntry]
                    ) -> tuple[StoreEntry, bool]:
        """Build ``node`` under its store lock; the flag says whether we built it."""
        with self.store.lock(node.id):
            entry = self.store.lookup(node.id)
            if entry is not None:  # another process built it while we waited
                return entry, False
            build_dir = self._take_build_dir()
            try:
                output = os.path.join(build_dir, "output", "out")
                with self._slots:
                    if self._cancelled:
                        raise _Cancelled(node.key)
                    self.progress.started(node.key, node.display, self.store.log_path(node.id))
                    try:
                        self._produce(plan, node, done, build_dir, output)
                    except BaseException:
                        # Before the slot is free, so no waiting node starts after this.
                        self._cancelled = self._cancelled or not self.options.keep_going
                        raise
                input_meta = {name: {"derivation": node.derivation.inputs[name],
                                     "hash": done[name].hash if name in done else ""}
                              for name in node.derivation.inputs}
                if node.derivation.kind == "deb":
                    input_meta = {"deb": {"derivation": node.derivation.inputs["deb"],
                                          "hash": done[node.deps[0]].hash}}
                expected = None
                if isinstance(node.what, PathSource | HostSource):
                    expected = str(node.derivation.attrs["hash"])
                entry = self.store.register(
                    node.id, output, derivation=node.derivation.to_json(), inputs=input_meta,
                    epoch=plan.recipe.epoch if node.sandboxed else 0, expected_hash=expected,
                    fsverity_file=node.main_file)
            except _Cancelled:
                self._give_back_build_dir(build_dir)
                raise
            except BaseException as exc:
                if self.options.keep_failed and node.sandboxed and isinstance(exc, BuildError):
                    kept = self._keep(node, build_dir)
                    exc.hint = (exc.hint + "; " if exc.hint else "") + \
                        f"kept /build and $out in {kept}"
                canon.remove_tree(build_dir)
                raise
            self._give_back_build_dir(build_dir)
            return entry, True

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

    def _drop_spare_build_dirs(self) -> None:
        with self._spare_lock:
            spare, self._spare = self._spare, []
        for build_dir in spare:
            canon.remove_tree(build_dir)

    def _keep(self, node: Node, build_dir: str) -> str:
        kept = os.path.join(self.store.root, "tmp", f"failed-{node.key}-{node.id[:12]}")
        canon.remove_tree(kept)
        os.rename(build_dir, kept)
        return kept

    def _produce(self, plan: Plan, node: Node, done: dict[str, StoreEntry], build_dir: str,
                 output: str) -> None:
        kind = node.derivation.kind
        what = node.what
        if kind == "fetch-deb":
            assert isinstance(what, DebSource)
            if self.options.offline:
                raise offline_error(plan, [node], store=self.options.store_option)
            fetch.apt_download(what.package, what.version, what.sha256, output)
        elif kind == "deb":
            fetch.unpack_deb(done[node.deps[0]].path, output)
        elif kind == "path":
            assert isinstance(what, PathSource)
            inputs.copy_path(what.path, output)
        elif kind == "host":
            assert node.closure is not None
            inputs.materialise(node.closure.files, output)
        else:
            self._sandboxed(plan, node, done, build_dir)

    def _sandboxed(self, plan: Plan, node: Node, done: dict[str, StoreEntry],
                   build_dir: str) -> None:
        assert self.runner is not None
        deps = {name: (plan.nodes[name], done[name].path) for name in node.derivation.inputs}
        make = sandboxing.step_spec if node.derivation.kind == "step" else sandboxing.image_spec
        spec: SandboxSpec = make(node, deps, os.path.join(build_dir, "build"),
                                 os.path.join(build_dir, "output"), epoch=plan.recipe.epoch,
                                 cores=self.options.cores, debug=self.options.debug)
        log = self.store.log_path(node.id)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            with sandboxing.sandbox_errors():
                result = self.runner.run(spec, log_fd=fd)
        finally:
            os.close(fd)
        if result.ok:
            if not os.path.lexists(os.path.join(build_dir, "output", "out")):
                raise BuildError(f"{node.key} succeeded but made no $out",
                                 hint=f"the builder must create $out (a file or a directory); "
                                      f"log: {log}")
            return
        if getattr(result, "interrupted", False):
            raise KeyboardInterrupt
        if result.timed_out:
            how = f"timed out after {spec.timeout:g} s"
        elif result.signal:
            how = f"was killed by signal {result.signal}"
        else:
            how = f"failed with exit status {result.returncode}"
        last = tail(log)
        lines = "\n".join("    " + line for line in last)
        show_log = hints.command("log", plan.recipe.path, node.key,
                                 store=self.options.store_option)
        cause = hints.failure_hint(last)
        raise BuildError(f"{node.key} {how}; log: {log}"
                         + (f"\n  last lines:\n{lines}" if lines else ""),
                         hint=f"{cause}; see {show_log}" if cause else show_log)


def _has_log(log: str, node: Node) -> bool:
    """Whether a failed node has a log worth naming (the lock makes an empty one)."""
    try:
        return node.sandboxed or os.path.getsize(log) > 0
    except OSError:
        return False


class _Cancelled(Exception):
    """A node that had not started when the build stopped after a failure."""


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


def offline_error(plan: Plan, fetches: Iterable[Node], *, store: str | None = None
                  ) -> FetchError:
    """The --offline error naming each missing input and the command that fetches it."""
    lines = []
    for node in fetches:
        source = node.what
        assert isinstance(source, DebSource)
        lines.append(f"  {source.name}: {source.package}={source.version} "
                     f"(sha256 {source.sha256[:16]}…) is not in the store")
    return FetchError("offline, and these inputs must be fetched:\n" + "\n".join(lines),
                      hint=f"run `{hints.command('fetch', plan.recipe.path, store=store)}` "
                           "while online")
