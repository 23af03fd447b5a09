"""The Dask executor: the client side of building a plan on a cluster.

What the store lacks is sorted first: a derivation the cache already holds needs
nothing (and its inputs are not looked at); a path or host source is imported here (it
is this machine's files) and its object put in the cache for the workers; everything
else becomes one Dask task keyed by its derivation id (:mod:`.task`), submitted as one
graph whose edges are the plan's. Workers read inputs from the cache and write outputs
to it; the client then downloads only the targets, checked against the signed metadata.

A failed step stops the build unless ``keep_going`` (its tasks are cancelled), with the
step's log tail in the error and its log in the local store for ``reprobuild log``.
Ctrl-C cancels this client's tasks (another client waiting for the same key keeps it).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reprobuild.build.executor import BuildReport, Failure, Options
from reprobuild.build.limits import effective, image_limits
from reprobuild.build.local import LocalExecutor
from reprobuild.build.plan import Node, Plan
from reprobuild.build.progress import Progress
from reprobuild.build.recipe import Image, Step
from reprobuild.cache import archive
from reprobuild.cache.backend import Cache, CacheError, open_cache
from reprobuild.cache.layout import ObjectInfo, object_name
from reprobuild.cache.settings import load_keys
from reprobuild.cache.substitute import SubstituteError, Substituter, from_any, query
from reprobuild.cache.upload import entry_epoch
from reprobuild.distributed.address import ClusterError, TlsFiles, scheduler_address, tls_files
from reprobuild.distributed.task import (
    StepTask,
    run_task,
    slim_recipe,
    task_key,
)
from reprobuild.errors import BuildError
from reprobuild.store.store import Store
from sandbox.spec import Runner

# The Dask side, imported only when there are tasks to run (Dask takes half a second).
CLUSTER = "reprobuild.distributed.cluster"
IMPORT_KINDS = ("path", "host")
QUERY_THREADS = 16


def _no_runner() -> Runner:
    raise BuildError("path and host sources are imported without the sandbox")


class DaskExecutor:
    """Builds on the Dask cluster at ``address`` through the cache at ``cache_url``;
    downloads need metadata signed by one of ``trusted`` (the workers' keys)."""

    runner: Runner | None = None

    def __init__(self, store: Store, options: Options, progress: Progress, *, address: str,
                 tls: TlsFiles | None, cache_url: str,
                 trusted: Mapping[str, Ed25519PublicKey], warn: Callable[[str], None]) -> None:
        self.store = store
        self.options = options
        self.progress = progress
        self.address = address
        self.tls = tls
        self.cache_url = cache_url
        self.trusted = dict(trusted)
        self.warn = warn
        self.client: Any = None  # a distributed.Client, once connected
        self.cache: Cache | None = None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def execute(self, plan: Plan, todo: list[Node], report: BuildReport) -> None:
        self.cache = self.cache or open_cache(self.cache_url)
        fate = self._classify(plan, todo, report)
        objects = self._imports(plan, [k for k, f in fate.items() if f == "import"], report)
        remote = [n for n in plan.order() if fate.get(n.key) in ("task", "import")]
        if remote:
            self._run(plan, remote, objects, report)
        wanted = [t for t in plan.targets if fate.get(t) in ("task", "cached")
                  and t not in report.entries and not _failed(report, t)]
        self._download(plan, wanted, report)

    # -- what runs where ----------------------------------------------------------------
    def _classify(self, plan: Plan, todo: list[Node], report: BuildReport) -> dict[str, str]:
        """key -> "cached" (the cache has it), "import" or "task", for what the targets
        need; walked a frontier at a time, the cache queried in parallel."""
        assert self.cache is not None
        cache = self.cache
        needed = {n.key for n in todo}
        fate: dict[str, str] = {}

        def classify(key: str) -> tuple[str, str]:
            node = plan.nodes[key]
            if node.derivation.kind in IMPORT_KINDS:
                in_cache = _query(cache, node, self.trusted, self.warn) is not None
                return key, "cached" if in_cache else "import"
            if _query(cache, node, self.trusted, self.warn) is not None:
                return key, "cached"
            return key, "task"

        frontier = sorted(t for t in set(plan.targets) if t in needed)
        with ThreadPoolExecutor(max_workers=QUERY_THREADS) as pool:
            while frontier:
                following: set[str] = set()
                for key, kind in pool.map(classify, frontier):
                    fate[key] = kind
                    if kind == "task":
                        following.update(plan.nodes[key].deps)
                frontier = sorted(following - set(fate))
        return fate

    def _imports(self, plan: Plan, keys: list[str], report: BuildReport
                 ) -> dict[str, tuple[ObjectInfo, int]]:
        """Import each source here (unless the store has it) and put its object in the
        cache; key -> (object, epoch)."""
        assert self.cache is not None
        missing = [plan.nodes[k] for k in keys if k not in report.entries]
        if missing:
            local = LocalExecutor(self.store, _no_runner, self.options,
                                  Progress(enabled=False), warn=self.warn)
            local.execute(plan, missing, report)
            if report.failures:
                raise report.failures[0].error or BuildError(report.failures[0].message)
        objects: dict[str, tuple[ObjectInfo, int]] = {}
        for key in keys:
            entry = report.entries[key]
            epoch = entry_epoch(entry.path)
            work = self.store.new_build_dir("object")
            try:
                path = os.path.join(work, "object.tar.zst")
                info = archive.pack(entry.path, epoch, path)
                if not self.cache.exists(object_name(info.blake3)):
                    self.cache.write_file(object_name(info.blake3), path)
            finally:
                self.store.drop_build_dir(work)
            objects[key] = (info, epoch)
        return objects

    # -- the cluster --------------------------------------------------------------------
    def _run(self, plan: Plan, remote: list[Node], objects: Mapping[str, tuple[ObjectInfo, int]],
             report: BuildReport) -> None:
        cluster = importlib.import_module(CLUSTER)
        if self.client is None:
            self.client = cluster.connect(self.address, self.tls)
        recipe = slim_recipe(plan.recipe)
        keys = {n.key for n in remote}
        graph: dict[str, Any] = {}
        for node in remote:
            info, epoch = objects.get(node.key, (None, 0))
            task = StepTask(recipe, node, tuple(plan.nodes[d] for d in node.deps), info, epoch)
            graph[task_key(node.id)] = (run_task, task,
                                        *(task_key(plan.nodes[d].id) for d in node.deps
                                          if d in keys))
        by_key = {task_key(n.id): n for n in remote}
        needs = {key: task_resources(node) for key, node in by_key.items()}
        run = cluster.GraphRun(self.client, self.store, self.options, self.progress, self.warn)
        run.run(plan, graph, by_key, needs, report)

    def _download(self, plan: Plan, targets: list[str], report: BuildReport) -> None:
        """Put the targets into the local store from the cache, checked."""
        assert self.cache is not None
        substituters = [Substituter(self.cache, 0)]
        for key in targets:
            node = plan.nodes[key]
            warnings: list[SubstituteError] = []
            with self.store.lock(node.id):
                got = from_any(self.store, substituters, node.id, self.trusted, warnings)
            if got is None:
                why = "; ".join(w.message for w in warnings) or "the cache does not hold it"
                message = f"{key} was built on the cluster but cannot be downloaded: {why}"
                report.failures.append(Failure(key, message, None, BuildError(
                    message, hint="give --trusted-keys the workers' public keys")))
                continue
            report.entries[key] = got[0]
            self.store.hold([node.id])


def open_executor(address: str, *, certs: str | None, insecure: bool, cache_url: str | None,
                  trusted_keys: Sequence[str], store: Store, options: Options,
                  progress: Progress, warn: Callable[[str], None]) -> DaskExecutor:
    """The executor ``build --executor dask://HOST:PORT`` asks for, checked before any
    connection: TLS or loopback (or ``insecure``), a cache, trusted keys."""
    target = scheduler_address(address, tls=certs is not None, insecure=insecure)
    if not cache_url:
        raise ClusterError("--executor dask://… needs --cache URL",
                           hint="the workers read inputs from the cache and write outputs "
                                "to it; give the URL they were started with")
    if not trusted_keys:
        raise ClusterError("--executor dask://… needs --trusted-keys",
                           hint="give the workers' public keys (the outputs are "
                                "downloaded only when one of them signed)")
    return DaskExecutor(store, options, progress, address=target,
                        tls=tls_files(certs, "client"), cache_url=cache_url,
                        trusted=load_keys(trusted_keys), warn=warn)


def task_resources(node: Node) -> dict[str, float]:
    """The Dask resources a node's task takes: ``cores`` (the step's, default 1) and, for
    a sandboxed node, ``memory`` (its memory limit, which the sandbox enforces)."""
    needs = {"cores": 1.0}
    if isinstance(node.what, Step):
        needs["cores"] = float(node.what.cores or 1)
        needs["memory"] = float(effective(node.what.limits).memory or 0)
    elif isinstance(node.what, Image):
        needs["memory"] = float(image_limits(node.what.limits, node.what.size).memory or 0)
    return needs


def _query(cache: Cache, node: Node, trusted: Mapping[str, Ed25519PublicKey],
           warn: Callable[[str], None]) -> object | None:
    try:
        return query(cache, node.id, trusted, name=node.key)
    except CacheError as exc:
        warn(exc.message)
        return None


def _failed(report: BuildReport, key: str) -> bool:
    return key in report.skipped or key in report.cancelled or any(
        f.key == key for f in report.failures)


__all__ = ["DaskExecutor", "open_executor"]
