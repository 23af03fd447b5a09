"""``reprobuild worker``: a Dask worker set up for reprobuild, one per process.

Order matters: the sandbox fork server starts first, while the process has one thread
(``unshare(CLONE_NEWUSER)`` fails in a threaded process) and before the signing key is
read, so no sandbox can hold the key; a host where user namespaces do not work stops
here, saying why. Then the worker joins the scheduler with the reprobuild plugin
(:mod:`.plugin`): its own store, the cache, the key. Resources ``cores`` and ``memory``
are advertised so that steps declaring them are placed where they fit.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from distributed import Worker

from reprobuild.build.sandboxing import start_runner
from reprobuild.cache.backend import open_cache
from reprobuild.cache.settings import load_keys
from reprobuild.cache.upload import ensure_cache_info
from reprobuild.distributed.address import TlsFiles
from reprobuild.distributed.cluster import to_security
from reprobuild.distributed.plugin import ReprobuildPlugin
from reprobuild.errors import ReprobuildError, SandboxError
from reprobuild.proof import signing
from reprobuild.store.store import Store


class WorkerError(ReprobuildError):
    """A worker that cannot start."""


@dataclass(frozen=True)
class WorkerSettings:
    scheduler: str  # a Dask address (tls://… or tcp://…)
    tls: TlsFiles | None
    cache_url: str
    key_path: str
    trusted_keys: Sequence[str]
    store: str
    nthreads: int
    name: str | None = None
    resources: Mapping[str, float] | None = None
    debug: bool = False


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def serve(settings: WorkerSettings) -> None:
    """Run the worker until the scheduler closes it or SIGINT/SIGTERM."""
    try:
        runner = start_runner(debug=settings.debug)
    except SandboxError as exc:
        raise WorkerError(f"this worker cannot run sandboxes, so it does not start: "
                          f"{exc.message}", hint=exc.hint) from None
    try:
        key = signing.load_private_key(settings.key_path)
        trusted = load_keys(settings.trusted_keys)
        trusted[signing.key_id(key.public_key())] = key.public_key()
        cache = open_cache(settings.cache_url)
        ensure_cache_info(cache, None)
        plugin = ReprobuildPlugin(Store(settings.store), runner, cache, key, trusted,
                                  jobs=settings.nthreads, cores=settings.nthreads,
                                  debug=settings.debug)
        resources = dict(settings.resources or {})
        resources.setdefault("cores", float(os.cpu_count() or 1))
        resources.setdefault("memory", float(total_memory()))
        asyncio.run(_run(settings, plugin, resources))
    finally:
        runner.close()


async def _run(settings: WorkerSettings, plugin: ReprobuildPlugin,
               resources: Mapping[str, float]) -> None:
    try:
        worker = await Worker(settings.scheduler, nthreads=settings.nthreads,
                              name=settings.name, security=to_security(settings.tls),
                              plugins=(plugin,), resources=dict(resources))
    except (OSError, TimeoutError) as exc:
        raise WorkerError(f"cannot join the Dask scheduler at {settings.scheduler}: {exc}",
                          hint="is `dask scheduler` running there, with the certificates "
                               "of the same `cluster-certs`?") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    finished = asyncio.ensure_future(worker.finished())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([finished, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not finished.done():
        await worker.close()
    stopped.cancel()
