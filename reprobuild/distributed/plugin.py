"""A worker's reprobuild state, as a Dask worker plugin: what one task does on a worker.

For each task: if the cache already holds the derivation (another worker built it, or a
task retried after its worker died once it had uploaded), nothing is built. Otherwise
the inputs are substituted from the cache into the worker's own store, the node is built
there by the same code as a local build (:meth:`LocalExecutor.build_node`: sandbox, store
lock, registration, build record), and the output, its log, its record and its signed
metadata are pushed to the cache, metadata last. The signing key lives in this process
only: the sandbox fork server was started before it was read.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from distributed import Worker, WorkerPlugin

from reprobuild.build.executor import Options
from reprobuild.build.local import LocalExecutor
from reprobuild.build.plan import Node, Plan
from reprobuild.build.progress import Progress
from reprobuild.cache import archive
from reprobuild.cache.backend import Cache, CacheError
from reprobuild.cache.layout import log_name, meta_name, object_name
from reprobuild.cache.substitute import SubstituteError, Substituter, from_any, query
from reprobuild.cache.upload import upload_one
from reprobuild.distributed.task import (
    LOG_MARK,
    PLUGIN_NAME,
    STARTED_TOPIC,
    RemoteBuildError,
    StepTask,
    TaskResult,
    install,
)
from reprobuild.errors import BuildError, ReprobuildError
from reprobuild.proof import records
from reprobuild.store.store import Store, StoreEntry
from sandbox.spec import Runner

LOG_TAIL = 64 << 10
INPUT_THREADS = 8


def _no_runner() -> Runner:
    raise BuildError("the worker's sandbox server is gone")


def _warn(message: str) -> None:
    print(f"reprobuild worker: warning: {message}", file=sys.stderr)


class ReprobuildPlugin(WorkerPlugin):
    """Held by a worker under the name ``reprobuild``; tasks reach it through
    :func:`distributed.get_worker`."""

    name = PLUGIN_NAME

    def __init__(self, store: Store, runner: Runner, cache: Cache, key: Ed25519PrivateKey,
                 trusted: Mapping[str, Ed25519PublicKey], *, jobs: int, cores: int,
                 debug: bool = False) -> None:
        self.store = store
        self.cache = cache
        self.key = key
        self.trusted = dict(trusted)
        self.worker_name = "worker"
        self.worker: Worker | None = None
        # keep_going: one task's failure must not cancel the tasks after it.
        self.executor = LocalExecutor(
            store, _no_runner, Options(jobs=jobs, keep_going=True, cores=cores, debug=debug),
            Progress(enabled=False), warn=_warn)
        self.executor.runner = runner

    def setup(self, worker: Worker) -> None:
        self.worker_name = str(worker.name)
        self.worker = worker
        install(self)

    def build(self, task: StepTask) -> TaskResult:
        node = task.node
        try:
            known = query(self.cache, node.id, self.trusted, name=node.key)
        except SubstituteError as exc:
            _warn(exc.message)  # unusable metadata: build and replace it
            known = None
        if known is not None:
            return TaskResult(node.id, known.entry.hash, self.worker_name, False)
        # For the clients' progress ("worker" is the address: the scheduler sets it).
        if self.worker is not None:
            self.worker.log_event(STARTED_TOPIC, {"derivation_id": node.id,
                                                  "name": self.worker_name})
        with self.store.session():
            try:
                entry, built = self._produce(task)
                if not self.cache.exists(meta_name(node.id)):
                    upload_one(self.store, self.cache, node.id, self.key)
            except ReprobuildError as exc:
                raise self._failed(node, exc) from None
        return TaskResult(node.id, entry.hash, self.worker_name, built)

    def _produce(self, task: StepTask) -> tuple[StoreEntry, bool]:
        node = task.node
        if task.object is not None:
            return self._import(task), True
        if len(task.inputs) > 1:  # substitutions wait on the cache: overlap them
            with ThreadPoolExecutor(max_workers=INPUT_THREADS) as pool:
                entries = list(pool.map(self._input, task.inputs))
        else:
            entries = [self._input(dep) for dep in task.inputs]
        inputs = {dep.key: entry for dep, entry in zip(task.inputs, entries, strict=True)}
        nodes = {dep.key: dep for dep in task.inputs}
        nodes[node.key] = node
        plan = Plan(task.recipe, [node.key], nodes)
        if self.executor.scheduler.cancelled:  # only a bug or an interrupt sets it here
            self.executor.scheduler.cancelled = False
        return self.executor.build_node(plan, node, inputs)

    def _input(self, dep: Node) -> StoreEntry:
        """An input in the worker's store, substituted from the cache when missing."""
        entry = self.store.trusted(dep.id, warn=_warn)
        if entry is None:
            warnings: list[SubstituteError] = []
            with self.store.lock(dep.id):
                got = from_any(self.store, [Substituter(self.cache, 0)], dep.id,
                               self.trusted, warnings)
            if got is None:
                why = "; ".join(w.message for w in warnings) or "the cache does not hold it"
                raise BuildError(f"input {dep.key} ({dep.id}) is neither in the store of "
                                 f"worker {self.worker_name} nor in the cache {self.cache.url}"
                                 f": {why}", hint="check that every worker and the client "
                                 "use the same cache, and that the workers trust each "
                                 "other's keys (--trusted-keys)")
            entry = got[0]
        self.store.hold([dep.id])
        return entry

    def _import(self, task: StepTask) -> StoreEntry:
        """A path or host source the client put in the cache as an object; its content
        must hash to what the derivation says."""
        node, info = task.node, task.object
        assert info is not None
        with self.store.lock(node.id):
            entry = self.store.trusted(node.id, warn=_warn, locked=True)
            if entry is not None:
                return entry
            work = self.store.new_build_dir("import")
            what = self.cache.where(object_name(info.blake3))
            try:
                tar_path = os.path.join(work, "object.tar")
                with self.cache.open_read(object_name(info.blake3)) as stream:
                    archive.receive(stream, info, tar_path, what)
                output = archive.unpack(tar_path, work, what)
                os.unlink(tar_path)
                entry = self.store.register(
                    node.id, output, derivation=node.derivation.to_json(), inputs={},
                    epoch=task.epoch, expected_hash=str(node.derivation.attrs["hash"]),
                    fsverity_file=node.main_file, record=records.entry_record)
            finally:
                self.store.drop_build_dir(work)
        self.store.hold([node.id])
        return entry

    def _failed(self, node: Node, exc: ReprobuildError) -> RemoteBuildError:
        """The error sent back to the client, with the log's end; the log also goes to
        the cache (``reprobuild log`` on the client reads it there)."""
        path = self.store.log_path(node.id)
        text = ""
        with contextlib.suppress(OSError), open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL))
            text = f.read().decode("utf-8", "replace")
        if text:
            with contextlib.suppress(CacheError):
                self.cache.write_file(log_name(node.id), path)
        message = exc.message.replace(path, LOG_MARK)
        return RemoteBuildError(node.id, node.key, message, exc.hint, text, self.worker_name)
