"""Producers: what makes the output of each kind of derivation.

Each kind (``fetch-deb``, ``deb``, ``path``, ``host``, ``step``, ``image``) has one small
object with the :class:`Producer` interface in :data:`PRODUCERS`. The scheduler never
looks at kinds: a new kind (a substitute from a cache, a remote executor) is a new entry
in the table, given to :class:`~reprobuild.build.engine.Engine` as ``producers``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from reprobuild.build import fetch, hints, inputs, sandboxing
from reprobuild.build.plan import Node, Plan
from reprobuild.build.recipe import DebSource, PathSource
from reprobuild.errors import EXIT_DISK_FULL, BuildError, FetchError, no_space
from reprobuild.store.store import StoreEntry
from sandbox.spec import Runner, SandboxSpec

TAIL_LINES = 10


@dataclass(frozen=True)
class Job:
    """Everything a producer may use to make one node's output."""

    plan: Plan
    node: Node
    done: Mapping[str, StoreEntry]  # node key -> checked entry of every finished node
    build_dir: str  # holds build/ (the step's /build) and output/ (where $out goes)
    log: str  # the node's log file
    runner: Runner | None  # the sandbox, for producers with needs_runner
    offline: bool = False
    cores: int = 1
    debug: bool = False
    # The --store given on the command line, repeated in the commands hints suggest.
    store_option: str | None = None

    @property
    def output(self) -> str:
        return os.path.join(self.build_dir, "output", "out")


class Producer(Protocol):
    """Makes the output of one kind of derivation at ``job.output``."""

    # Whether it runs in the sandbox (the engine then starts the runner first).
    needs_runner: bool
    # Whether it downloads (then --offline refuses to build, naming what is missing).
    needs_network: bool

    def produce(self, job: Job) -> None:
        """Create ``job.output`` or raise a ReprobuildError saying why not."""

    def input_hashes(self, job: Job) -> dict[str, dict[str, str]]:
        """The ``inputs`` the store records: name -> {"derivation", "hash"}."""

    def expected_hash(self, job: Job) -> str | None:
        """The content hash the output must have (fixed-output imports), or None."""

    def epoch(self, job: Job) -> int:
        """The mtime of every file of the registered output."""


class _Base:
    needs_runner = False
    needs_network = False

    def input_hashes(self, job: Job) -> dict[str, dict[str, str]]:
        drv = job.node.derivation
        return {name: {"derivation": drv.inputs[name],
                       "hash": job.done[name].hash if name in job.done else ""}
                for name in drv.inputs}

    def expected_hash(self, job: Job) -> str | None:
        return None

    def epoch(self, job: Job) -> int:
        return 0


class FetchDeb(_Base):
    needs_network = True

    def produce(self, job: Job) -> None:
        what = job.node.what
        assert isinstance(what, DebSource)
        if job.offline:
            raise offline_error(job.plan, [job.node], store=job.store_option)
        fetch.apt_download(what.package, what.version, what.sha256, job.output)


class UnpackDeb(_Base):
    """The unpacked .deb; its one input is the fetched file (the node's only dep)."""

    def produce(self, job: Job) -> None:
        what = job.node.what
        assert isinstance(what, DebSource)
        fetch.unpack_deb(job.done[job.node.deps[0]].path, job.output,
                         label=f"{what.package}={what.version}")

    def input_hashes(self, job: Job) -> dict[str, dict[str, str]]:
        return {"deb": {"derivation": job.node.derivation.inputs["deb"],
                        "hash": job.done[job.node.deps[0]].hash}}


class ImportPath(_Base):
    def produce(self, job: Job) -> None:
        what = job.node.what
        assert isinstance(what, PathSource)
        inputs.copy_path(what.path, job.output)

    def expected_hash(self, job: Job) -> str | None:
        return str(job.node.derivation.attrs["hash"])


class ImportHost(ImportPath):
    def produce(self, job: Job) -> None:
        assert job.node.closure is not None
        inputs.materialise(job.node.closure.files, job.output)


class Sandboxed(_Base):
    """A recipe step or a built-in image step, run in the sandbox."""

    needs_runner = True

    def epoch(self, job: Job) -> int:
        return job.plan.recipe.epoch

    def produce(self, job: Job) -> None:
        node, plan = job.node, job.plan
        assert job.runner is not None
        deps = {name: (plan.nodes[name], job.done[name].path) for name in node.derivation.inputs}
        make = sandboxing.step_spec if node.derivation.kind == "step" else sandboxing.image_spec
        spec: SandboxSpec = make(node, deps, os.path.join(job.build_dir, "build"),
                                 os.path.join(job.build_dir, "output"), epoch=plan.recipe.epoch,
                                 cores=job.cores, debug=job.debug)
        fd = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            with sandboxing.sandbox_errors():
                result = job.runner.run(spec, log_fd=fd)
        finally:
            os.close(fd)
        if result.ok:
            if not os.path.lexists(job.output):
                raise BuildError(f"{node.key} succeeded but made no $out",
                                 hint=f"the builder must create $out (a file or a "
                                      f"directory); log: {job.log}")
            return
        if getattr(result, "interrupted", False):
            raise KeyboardInterrupt
        if result.timed_out:
            how = f"timed out after {spec.timeout:g} s"
        elif result.limit:
            how = "was stopped"
        elif result.signal:
            how = f"was killed by signal {result.signal}"
        elif result.returncode == EXIT_DISK_FULL and node.derivation.kind != "step":
            raise no_space(job.output, f"the output of {node.key}",
                           "the image step said so")
        else:
            how = f"failed with exit status {result.returncode}"
        last = tail(job.log)
        note, raise_limit = sandboxing.limit_note(node, spec, result, last)
        lines = "\n".join("    " + line for line in last)
        show_log = hints.command("log", plan.recipe.path, node.key, store=job.store_option)
        cause = raise_limit or hints.failure_hint(last)
        raise BuildError(f"{node.key} {how}{note}; log: {job.log}"
                         + (f"\n  last lines:\n{lines}" if lines else ""),
                         hint=f"{cause}; see {show_log}" if cause else show_log)


PRODUCERS: Mapping[str, Producer] = {
    "fetch-deb": FetchDeb(),
    "deb": UnpackDeb(),
    "path": ImportPath(),
    "host": ImportHost(),
    "step": Sandboxed(),
    "image": Sandboxed(),
}


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


def offline_error(plan: Plan, fetches: list[Node], *, store: str | None = None
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
