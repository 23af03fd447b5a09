"""A real Dask cluster for the distributed tests: a TLS scheduler and two `reprobuild
worker`s on 127.0.0.1, the workers as uid 65534, sharing a file:// cache.

Started once per module (the suite runs on 2 cores); a test that kills a worker starts
its replacement with :meth:`Cluster.start_worker`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reprobuild.distributed.certs import make_certs
from reprobuild.proof import signing
from tests.conftest import NOBODY, REPO, Unprivileged, can_unshare_user, need

START_TIMEOUT = 60.0


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)


@dataclass
class Cluster:
    root: Path
    unpriv: Unprivileged
    address: str  # tls://127.0.0.1:PORT
    certs: Path
    cache: Path
    key: Path
    scheduler: subprocess.Popen[bytes]
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def cache_url(self) -> str:
        return f"file://{self.cache}"

    def worker_store(self, name: str) -> Path:
        return self.root / "scratch" / f"store-{name}"

    def start_worker(self, name: str, *, nthreads: int = 2) -> None:
        store = self.worker_store(name)
        store.mkdir(parents=True, exist_ok=True)
        _own(store)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": str(self.unpriv.root / "home"), "PYTHONPATH": self.unpriv.pythonpath,
               "PYTHONDONTWRITEBYTECODE": "1"}
        argv = self.unpriv.command([
            self.unpriv.python, "-m", "reprobuild", "worker", "--scheduler", self.address,
            "--certs", str(self.certs), "--cache", self.cache_url, "--key", str(self.key),
            "--store", str(store), "--nthreads", str(nthreads), "--name", name])
        log = (self.root / f"worker-{name}.log").open("ab")
        self.workers[name] = subprocess.Popen(argv, env=env, cwd=self.unpriv.root,
                                              stdout=log, stderr=log)
        log.close()
        self.wait_for_workers()

    def wait_for_workers(self) -> None:
        """Until the scheduler knows exactly the running workers."""
        alive = {n for n, p in self.workers.items() if p.poll() is None}
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.scheduler_workers() == alive:
                return
            for name, process in self.workers.items():
                if name in alive and process.poll() is not None:
                    log = (self.root / f"worker-{name}.log").read_text(errors="replace")
                    raise RuntimeError(f"worker {name} exited:\n{log[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"the scheduler does not see workers {sorted(alive)}")

    def scheduler_workers(self) -> set[str]:
        result = self.client_python(
            "import sys, json\n"
            "from distributed import Client\n"
            "from reprobuild.distributed.cluster import security\n"
            f"c = Client({self.address!r}, security=security({str(self.certs)!r}, 'client'),"
            " timeout=20)\n"
            "print(json.dumps(sorted(str(w['name']) for w in "
            "c.scheduler_info(n_workers=-1)['workers'].values())))\n"
            "c.close()\n")
        return set(json.loads(result.stdout.strip().splitlines()[-1]))

    def client_python(self, code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=True, cwd=REPO)

    def kill(self, name: str) -> None:
        process = self.workers.pop(name)
        process.kill()
        process.wait()

    def build(self, recipe: Path, *targets: str, store: Path, extra: Sequence[str] = (),
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``reprobuild build --executor`` as a client (this uid), JSON on stdout."""
        return subprocess.run(
            [sys.executable, "-m", "reprobuild", "build", "--store", str(store), "--json",
             "--no-out-link", "--executor", self.address.replace("tls://", "dask://"),
             "--certs", str(self.certs), "--cache", self.cache_url,
             f"--trusted-keys={self.key}.pub", *extra, str(recipe), *targets],
            capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def stop(self) -> None:
        for name in list(self.workers):
            process = self.workers.pop(name)
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.scheduler.terminate()
        self.scheduler.wait(timeout=20)


def _start_scheduler(root: Path, certs: Path) -> tuple[subprocess.Popen[bytes], str]:
    address_file = root / "scheduler.json"
    log = (root / "scheduler.log").open("ab")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dask"), "scheduler", "--host", "127.0.0.1",
         "--port", "0", "--protocol", "tls", "--no-dashboard",
         "--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "scheduler.pem"),
         "--tls-key", str(certs / "scheduler.key"), "--scheduler-file", str(address_file)],
        stdout=log, stderr=log, cwd=root)
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while not address_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError((root / "scheduler.log").read_text(errors="replace")[-3000:])
        time.sleep(0.1)
    time.sleep(0.1)  # written whole before it is renamed? read until it parses
    while True:
        try:
            return process, str(json.loads(address_file.read_text())["address"])
        except ValueError:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    need(can_unshare_user(), "needs unprivileged user namespaces")
    # Not under /tmp: the sandbox mounts a fresh /tmp over anything bound below it.
    root = Path(tempfile.mkdtemp(prefix="reprobuild-dask-", dir="/var/tmp"))
    unpriv = Unprivileged(root / "unpriv")
    (unpriv.root / "home").mkdir()
    _own(unpriv.root / "home")
    (root / "scratch").mkdir()
    _own(root / "scratch")
    os.chmod(root, 0o755)
    certs = root / "certs"
    make_certs(str(certs))
    key = root / "keys" / "worker.key"
    key.parent.mkdir()
    signing.generate_key(key)
    for path in (certs / "worker.key", key):
        _own(path)
    cache = root / "cache"
    # The client (this uid) adds objects too: the workers must still write every folder.
    for folder in (cache, *(cache / sub for sub in ("objects", "meta", "logs", "records"))):
        folder.mkdir()
        _own(folder)
    scheduler, address = _start_scheduler(root, certs)
    built = Cluster(root, unpriv, address, certs, cache, key, scheduler)
    try:
        for name in ("w1", "w2"):
            built.start_worker(name)
        yield built
    finally:
        built.stop()
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)
