#!/usr/bin/env python3
"""Dask executor benchmark, against the local executor in the same run.

A scheduler (TLS, 127.0.0.1) and two ``reprobuild worker``s (one thread each: this is a
2-core machine) share a file:// cache. Measured, each as a fresh ``reprobuild build``:

1. 200 trivial sandboxed steps (scripts/bench_engine.py's recipe) cold: Dask vs local
   (target: at most 1.5x); no-op with everything in the cache and nothing in the
   client's store (the client downloads the one target): Dask vs the local no-op
   (target: at most 2x).
2. ``--big N`` steps (default 5,000, gathered by 100s): the client's peak memory while
   it plans, submits and follows the graph (target: under 500 MB), and the per-step
   wall time on the cluster against the local executor's (``--big 0`` skips it: about
   4 minutes here).

Run once, not in a loop: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from benchutil import ChildRun, run_child  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def reprobuild(*args: str) -> list[str]:
    return [sys.executable, "-m", "reprobuild", *args]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = root / "certs"
        subprocess.run(reprobuild("cluster-certs", str(self.certs)), check=True, env=ENV,
                       stdout=subprocess.DEVNULL)
        self.key = root / "worker.key"
        subprocess.run(reprobuild("sign", "--generate-key", str(self.key)), check=True,
                       env=ENV, stdout=subprocess.DEVNULL)
        self.cache = f"file://{root / 'cache'}"
        address_file = root / "scheduler.json"
        self.processes = [subprocess.Popen(
            [str(Path(sys.executable).parent / "dask"), "scheduler", "--host", "127.0.0.1",
             "--port", "0", "--protocol", "tls", "--no-dashboard", "--tls-ca-file",
             str(self.certs / "ca.pem"), "--tls-cert", str(self.certs / "scheduler.pem"),
             "--tls-key", str(self.certs / "scheduler.key"), "--scheduler-file",
             str(address_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        while True:
            try:
                self.address = json.loads(address_file.read_text())["address"]
                break
            except (OSError, ValueError):
                time.sleep(0.1)
        for name in ("w1", "w2"):
            self.processes.append(subprocess.Popen(
                reprobuild("worker", "--scheduler", self.address, "--certs", str(self.certs),
                           "--cache", self.cache, "--key", str(self.key), "--store",
                           str(root / f"store-{name}"), "--nthreads", "2", "--name", name),
                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(3)  # the workers join (a build waits for them anyway)

    def build(self, recipe: Path, store: Path) -> ChildRun:
        return run_child(reprobuild(
            "build", "--store", str(store), "--no-out-link", "--executor", self.address,
            "--certs", str(self.certs), "--cache", self.cache,
            f"--trusted-keys={self.key}.pub", str(recipe), "all"), env=ENV, quiet=True)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            process.wait()


def make_recipe(directory: Path, steps: int, salt: int) -> Path:
    """bench_engine's recipe (``steps`` independent steps and ``all``), with ``salt`` in
    every step so that each repetition is cold again, for both executors."""
    lines = ["epoch = 1700000000", "[sources.bb]", 'host = "/bin/busybox"', ""]
    for i in range(steps):
        lines += [f"[steps.s{i:03d}]", 'inputs = ["bb"]',
                  f'builder = ["bb", "sh", "-c", "echo {i} {salt} > $out"]', ""]
    lines += ["[steps.all]", "inputs = [" + ", ".join(f'"s{i:03d}"' for i in range(steps))
              + ', "bb"]', 'builder = ["bb", "sh", "-c", "echo done > $out"]', ""]
    directory.mkdir(parents=True)
    path = directory / "bench.toml"
    path.write_text("\n".join(lines))
    return path


def make_big_recipe(directory: Path, steps: int, group: int = 100) -> Path:
    """``steps`` trivial steps gathered by groups of ``group``, then by one ``all`` (a
    single step with thousands of inputs is over the sandbox's spec size, anywhere)."""
    lines = ["epoch = 1700000000", "[sources.bb]", 'host = "/bin/busybox"', ""]
    for i in range(steps):
        lines += [f"[steps.s{i:05d}]", 'inputs = ["bb"]',
                  f'builder = ["bb", "sh", "-c", "echo {i} > $out"]', ""]
    groups = []
    for first in range(0, steps, group):
        name = f"g{first // group:04d}"
        members = [f"s{i:05d}" for i in range(first, min(first + group, steps))]
        groups.append(name)
        lines += [f"[steps.{name}]", "inputs = [" + ", ".join(f'"{m}"' for m in members)
                  + ', "bb"]', 'builder = ["bb", "sh", "-c", "echo > $out"]', ""]
    lines += ["[steps.all]", "inputs = [" + ", ".join(f'"{g}"' for g in groups) + ', "bb"]',
              'builder = ["bb", "sh", "-c", "echo done > $out"]', ""]
    path = directory / "bench.toml"
    path.write_text("\n".join(lines))
    return path


def local(recipe: Path, store: Path) -> ChildRun:
    return run_child(reprobuild("build", "--store", str(store), "--no-out-link", "-j", "2",
                                str(recipe), "all"), env=ENV, quiet=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--big", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reprobuild-bench-dask-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)
        cluster = Cluster(root / "cluster")
        try:
            best: dict[str, float] = {}
            for run in range(args.repeat):  # interleaved: drift in the load hits both
                recipe = make_recipe(root / f"small-{run}", args.steps, run)
                times = {"local cold": local(recipe, root / f"local-{run}").wall,
                         "local no-op": local(recipe, root / f"local-{run}").wall,
                         "dask cold": cluster.build(recipe, root / f"client-{run}").wall,
                         "dask no-op": cluster.build(recipe, root / f"empty-{run}").wall}
                best = {k: min(v, best.get(k, v)) for k, v in times.items()}
            print(f"{args.steps} steps cold (best of {args.repeat}): dask "
                  f"{best['dask cold']:.2f} s, local {best['local cold']:.2f} s: "
                  f"{best['dask cold'] / best['local cold']:.2f}x (target <= 1.5x)")
            print(f"{args.steps} steps no-op, all in the cache and the client's store empty"
                  f": dask {best['dask no-op']:.2f} s, local no-op (all in its store) "
                  f"{best['local no-op']:.2f} s: "
                  f"{best['dask no-op'] / best['local no-op']:.2f}x (target <= 2x)")
            if args.big:
                (root / "big").mkdir()
                big = make_big_recipe(root / "big", args.big)
                dask_big = cluster.build(big, root / "client-big")
                local_big = local(big, root / "local-big")
                print(f"{args.big} steps cold: dask {dask_big.wall:.1f} s "
                      f"({dask_big.wall / args.big * 1000:.1f} ms/step), local "
                      f"{local_big.wall:.1f} s ({local_big.wall / args.big * 1000:.1f} "
                      f"ms/step): overhead {(dask_big.wall - local_big.wall) / args.big * 1000:.1f}"
                      f" ms/step; client peak memory {dask_big.peak_kib / 1024:.0f} MB "
                      f"(target < 500 MB), local {local_big.peak_kib / 1024:.0f} MB")
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
