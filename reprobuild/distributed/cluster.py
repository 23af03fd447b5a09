"""The Dask side of a client: connect with TLS, submit one graph, follow its tasks.

Loaded by :mod:`.executor` only when a build has tasks to run (importing Dask costs half
a second, which a build whose outputs are all in the cache should not pay).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import dask
from distributed import Client, Future, as_completed
from distributed.scheduler import KilledWorker
from distributed.security import Security

from reprobuild.build.executor import BuildReport, Failure, Options
from reprobuild.build.plan import Node, Plan
from reprobuild.build.progress import Progress
from reprobuild.distributed.address import ClusterError, TlsFiles, tls_files
from reprobuild.distributed.task import LOG_MARK, STARTED_TOPIC, RemoteBuildError, TaskResult
from reprobuild.errors import BuildError
from reprobuild.store.store import Store
from sandbox.limits import human

CONNECT_TIMEOUT = 30.0


def to_security(files: TlsFiles | None) -> Security | None:
    """Dask's TLS settings for the role of ``files`` (None: plain TCP)."""
    if files is None:
        return None
    if files.role == "client":
        return Security(tls_ca_file=files.ca, tls_client_cert=files.cert,
                        tls_client_key=files.key, require_encryption=True)
    if files.role == "worker":
        return Security(tls_ca_file=files.ca, tls_worker_cert=files.cert,
                        tls_worker_key=files.key, require_encryption=True)
    return Security(tls_ca_file=files.ca, tls_scheduler_cert=files.cert,
                    tls_scheduler_key=files.key, require_encryption=True)


def security(directory: str | None, role: str) -> Security | None:
    """:func:`to_security` of ``role``'s files in a ``cluster-certs`` directory."""
    return to_security(tls_files(directory, role))


def connect(address: str, files: TlsFiles | None) -> Client:
    try:
        return Client(address, security=to_security(files), timeout=CONNECT_TIMEOUT,
                      set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}",
                           hint="is `dask scheduler` running there, with the "
                                "certificates of the same `cluster-certs`?") from None


class GraphRun:
    """One graph of tasks (key -> ``(run_task, StepTask, *input keys)``) on ``client``."""

    def __init__(self, client: Client, store: Store, options: Options,
                 progress: Progress, warn: Callable[[str], None]) -> None:
        self.client = client
        self.warn = warn
        self.store = store
        self.options = options
        self.progress = progress
        # Steps shown as running on a worker (their start event came), steps that ended.
        self.shown: set[str] = set()
        self.ended: set[str] = set()

    def run(self, plan: Plan, graph: Mapping[str, Any], by_key: Mapping[str, Node],
            needs: Mapping[str, Mapping[str, float]], report: BuildReport) -> None:
        if not check_resources(self.client, needs, by_key):
            self.warn("no worker is connected to the scheduler yet: the "
                      "steps wait for one (start `reprobuild worker`)")
        self.progress.start(total=len(by_key))
        self._watch(by_key)
        futures: list[Future[Any]] = []
        try:
            # A dict's bound get() pickles without reprobuild: the scheduler calls it with
            # each key to find the task's resources.
            futures = self.client.get(dict(graph), list(by_key), sync=False,
                                      resources=dict(needs).get)
            self._collect(plan, futures, by_key, report)
        except BaseException:  # Ctrl-C too: this client's tasks are cancelled
            if futures:
                self.client.cancel(futures)
            raise
        finally:
            self.client.unsubscribe_topic(STARTED_TOPIC)
            self.progress.stop()

    def _watch(self, by_key: Mapping[str, Node]) -> None:
        """Show each step as running, with its worker, when a worker starts it."""
        nodes = {node.id: node for node in by_key.values()}

        def started(event: tuple[float, Any]) -> None:
            message = event[1]
            node = nodes.get(str(message.get("derivation_id"))) \
                if isinstance(message, dict) else None
            if node is not None and node.key not in self.ended:
                self.shown.add(node.key)
                self.progress.started(node.key, f"{node.display or node.key} on "
                                      f"{message.get('name')}", "")

        self.client.subscribe_topic(STARTED_TOPIC, started)

    def _collect(self, plan: Plan, futures: list[Future[Any]], by_key: Mapping[str, Node],
                 report: BuildReport) -> None:
        unfinished = {str(f.key): f for f in futures}
        # with_results: results are fetched concurrently as tasks end, not one round trip
        # at a time from this thread (6 ms each: a third of a 200-step build).
        for future, outcome in as_completed(futures, loop=self.client.loop, with_results=True,
                                            raise_errors=False):
            node = by_key[str(future.key)]
            unfinished.pop(str(future.key), None)
            if future.status == "finished" and isinstance(outcome, TaskResult):
                result = outcome
                self.ended.add(node.key)
                if result.built:
                    report.built.append(node.key)
                where = "" if node.key in self.shown else f" on {result.worker}"
                self.progress.finished(node.key, ok=True, state=(
                    f"built{where}" if result.built else "done by another client"))
                continue
            if future.status == "cancelled":
                continue
            error = outcome if isinstance(outcome, BaseException) else future.exception()
            if isinstance(error, RemoteBuildError) and error.derivation_id != node.id:
                continue  # a dependency failed: counted below
            report.failures.append(self._failure(node, error))
            self.progress.finished(node.key, ok=False)
            if not self.options.keep_going:
                self.client.cancel(list(unfinished.values()))
                break
        failed = {f.key for f in report.failures}
        below = _dependents(plan, failed, {n.key for n in by_key.values()})
        finished = set(report.built) | failed
        for future in futures:
            key = by_key[str(future.key)].key
            if key in finished or future.status == "finished":
                continue
            (report.skipped if key in below else report.cancelled).append(key)
        report.skipped.sort()
        report.cancelled.sort()

    def _failure(self, node: Node, error: BaseException | None) -> Failure:
        """A remote failure as a local one: the log is copied into the local store."""
        if isinstance(error, KilledWorker):
            allowed = dask.config.get("distributed.scheduler.allowed-failures")
            message = (f"{node.key}: the workers building it died {int(allowed) + 1} times "
                       "(killed, out of memory?), so the scheduler gave up on it")
            return Failure(node.key, message, None, BuildError(message))
        if not isinstance(error, RemoteBuildError):
            message = f"{node.key} failed on the cluster: {error!r}"
            return Failure(node.key, message, None, BuildError(message))
        log = self.store.log_path(node.id)
        with open(log, "w", encoding="utf-8") as f:
            f.write(error.log)
        first, newline, rest = error.message.replace(LOG_MARK, log).partition("\n")
        message = f"{first} (on worker {error.worker}){newline}{rest}"
        return Failure(node.key, message, log if error.log else None,
                       BuildError(message, hint=error.hint))


def check_resources(client: Client, needs: Mapping[str, Mapping[str, float]],
                    by_key: Mapping[str, Node]) -> bool:
    """Refuse a task no connected worker can ever take (it would wait forever); False when
    no worker is connected (they may yet join: an autoscaling cluster)."""
    offers = [w.get("resources") or {}
              for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    if not offers:
        return False
    for key, need in needs.items():
        if not any(all(offer.get(r, 0) >= amount for r, amount in need.items())
                   for offer in offers):
            node = by_key[key]
            best = max(offers, key=lambda o: (o.get("cores", 0), o.get("memory", 0)))
            raise ClusterError(
                f"{node.key} needs {_describe(need)}, and no worker offers that (the "
                f"largest offers {_describe(best)})",
                hint="start a worker with more (`reprobuild worker --cores N --memory "
                     "SIZE`), or lower the step's cores or limits.memory")
    return True


def _describe(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{name}={human(int(amount)) if name == 'memory' else int(amount)}"
                     for name, amount in sorted(resources.items()))


def _dependents(plan: Plan, failed: set[str], among: set[str]) -> set[str]:
    """The keys of ``among`` that depend, directly or not, on a key of ``failed``."""
    below: set[str] = set()
    for node in plan.order():
        if node.key in among and any(d in failed or d in below for d in node.deps):
            below.add(node.key)
    return below
