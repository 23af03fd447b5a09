"""Building on a real cluster: a TLS scheduler and two workers as uid 65534 (conftest)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reprobuild.store.store import Store
from tests.conftest import REPO, Unprivileged
from tests.distributed.conftest import Cluster

SHIPPED = sorted((REPO / "recipes").glob("*.toml"))


def rows(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str | None]]:
    return {row["target"]: row for row in json.loads(result.stdout)}


def local_build(unpriv: Unprivileged, recipe: Path, store: Path
                ) -> dict[str, dict[str, str | None]]:
    result = unpriv.reprobuild("build", "--store", str(store), "--json", "--no-out-link",
                               str(recipe), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return rows(result)


@pytest.mark.userns
@pytest.mark.parametrize("recipe", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_gives_the_bytes_of_a_local_build(cluster: Cluster, recipe: Path
                                                         ) -> None:
    local = local_build(cluster.unpriv, recipe, cluster.unpriv.scratch(f"local-{recipe.stem}"))
    store = cluster.root / f"client-{recipe.stem}"
    result = cluster.build(recipe, store=store, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = rows(result)
    assert sorted(remote) == sorted(local)
    for target, row in remote.items():
        assert row["derivation"] == local[target]["derivation"]
        assert row["hash"] == local[target]["hash"], target
        assert row["fsverity"] == local[target]["fsverity"], target
        assert row["path"] is not None and Path(row["path"]).exists()
    # Progress names the worker of each remote step, when it starts or when it ends.
    assert re.search(r"\bon w[12]\b", result.stderr), result.stderr
    # Only the targets were downloaded: the steps below them stay on the workers.
    downloaded = {e.derivation_id for e in Store(str(store)).paths()}
    assert {r["derivation"] for r in remote.values()} <= downloaded
    assert len(downloaded) < len(list((cluster.cache / "meta").iterdir()))


def write_recipe(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    recipe = directory / "recipe.toml"
    recipe.write_text('epoch = 1700000000\n[sources.bb]\nhost = "/bin/busybox"\n' + body)
    return recipe


FAILING = """
[steps.bad]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "echo compiling {salt}; echo 'error: no such thing' >&2; exit 3"]
[steps.after-bad]
inputs = ["bb", "bad"]
builder = ["bb", "sh", "-c", "echo never > $out"]
[steps.fine]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "sleep 2; echo fine {salt} > $out"]
"""


@pytest.mark.userns
def test_a_failing_step_shows_its_log_tail_and_log(cluster: Cluster, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r", FAILING.format(salt="one"))
    store = tmp_path / "client"
    result = cluster.build(recipe, "after-bad", "fine", store=store)
    assert result.returncode == 1, result.stderr
    assert "bad failed with exit status 3" in result.stderr
    assert "error: no such thing" in result.stderr  # the log tail, on the client
    assert "on worker w" in result.stderr
    got = rows(result)
    assert got["after-bad"]["path"] is None
    log = subprocess.run([sys.executable, "-m", "reprobuild", "log", "--store", str(store),
                          str(recipe), "bad"], capture_output=True, text=True, cwd=REPO)
    assert log.returncode == 0 and "compiling one" in log.stdout


@pytest.mark.userns
def test_keep_going_builds_what_does_not_depend_on_the_failure(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r", FAILING.format(salt="two"))
    result = cluster.build(recipe, "after-bad", "fine", store=tmp_path / "client",
                           extra=["--keep-going"])
    assert result.returncode == 1
    got = rows(result)
    assert got["fine"]["path"] is not None
    assert Path(str(got["fine"]["path"])).read_text() == "fine two\n"
    assert "not built because a dependency failed: after-bad" in result.stderr


def built_here(cluster: Cluster, derivation_id: str) -> list[str]:
    """The workers whose store built ``derivation_id`` (not substituted it)."""
    found = []
    for name in sorted(cluster.workers):
        meta = cluster.worker_store(name) / "meta" / f"{derivation_id}.json"
        if meta.exists() and "substituted" not in json.loads(meta.read_text()):
            found.append(name)
    return found


@pytest.mark.userns
def test_two_clients_at_once_build_each_step_once(cluster: Cluster, tmp_path: Path) -> None:
    body = "".join(f'[steps.s{i}]\ninputs = ["bb"]\nbuilder = ["bb", "sh", "-c", '
                   f'"echo building {i}; sleep 1; echo {i} > $out"]\n' for i in range(4))
    body += ('[steps.all]\ninputs = ["bb", "s0", "s1", "s2", "s3"]\n'
             'builder = ["bb", "sh", "-c", "cat $s0 $s1 $s2 $s3 > $out"]\n')
    recipe = write_recipe(tmp_path / "r", body)
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    def client(i: int) -> None:
        results[i] = cluster.build(recipe, "all", store=tmp_path / f"client{i}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results.values():
        assert result.returncode == 0, result.stderr[-3000:]
    paths = [rows(r)["all"]["path"] for r in results.values()]
    assert [Path(str(p)).read_text() for p in paths] == ["0\n1\n2\n3\n"] * 2
    ids = [json.loads(subprocess.run(
        [sys.executable, "-m", "reprobuild", "show", "--store", str(tmp_path / "client0"),
         str(recipe), f"s{i}"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout)["id"] for i in range(4)]
    for derivation_id in ids:
        assert len(built_here(cluster, derivation_id)) == 1
    # s0 was built on a worker and never downloaded: its log is read from the cache.
    log = [sys.executable, "-m", "reprobuild", "log", "--store", str(tmp_path / "client0"),
           str(recipe), "s0"]
    missing = subprocess.run(log, capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "no build log for s0" in missing.stderr
    remote = subprocess.run([*log, "--cache", cluster.cache_url], capture_output=True,
                            text=True, cwd=REPO)
    assert remote.returncode == 0 and remote.stdout.endswith("\nbuilding 0\n")


@pytest.mark.userns
def test_a_worker_killed_mid_step_and_the_build_still_finishes(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r", '[steps.slow]\ninputs = ["bb"]\nbuilder = '
                          '["bb", "sh", "-c", "echo started; sleep 4; echo slow > $out"]\n')
    show = subprocess.run([sys.executable, "-m", "reprobuild", "show", "--store",
                           str(tmp_path / "c"), str(recipe), "slow"], capture_output=True,
                          text=True, cwd=REPO, check=True)
    derivation_id = json.loads(show.stdout)["id"]
    outcome: list[subprocess.CompletedProcess[str]] = []
    client = threading.Thread(target=lambda: outcome.append(
        cluster.build(recipe, "slow", store=tmp_path / "client")))
    client.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        for name in list(cluster.workers):
            log = cluster.worker_store(name) / "logs" / f"{derivation_id}.log"
            if log.exists() and b"started" in log.read_bytes():
                victim = name
        time.sleep(0.05)
    assert victim is not None, "the step never started"
    cluster.kill(victim)
    client.join()
    result = outcome[0]
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        assert Path(str(rows(result)["slow"]["path"])).read_text() == "slow\n"
        assert built_here(cluster, derivation_id) != [], "no other worker built it"
    finally:
        cluster.start_worker(victim)


@pytest.mark.userns
def test_step_cores_are_a_dask_resource(cluster: Cluster, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r", '[steps.two]\ninputs = ["bb"]\ncores = 2\n'
                          'builder = ["bb", "sh", "-c", "echo $BUILD_CORES > $out"]\n'
                          '[steps.many]\ninputs = ["bb"]\ncores = 64\n'
                          'builder = ["bb", "sh", "-c", "echo > $out"]\n'
                          '[steps.huge]\ninputs = ["bb"]\nlimits = { memory = "64T" }\n'
                          'builder = ["bb", "sh", "-c", "echo > $out"]\n')
    result = cluster.build(recipe, "two", store=tmp_path / "client")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(str(rows(result)["two"]["path"])).read_text() == "2\n"
    # A step no worker can take is refused at once, not left waiting forever.
    for step, need in (("many", "cores=64"), ("huge", "memory=64 TiB")):
        refused = cluster.build(recipe, step, store=tmp_path / "client", timeout=60)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"{step} needs " in refused.stderr and need in refused.stderr
        assert "no worker offers that" in refused.stderr


@pytest.mark.userns
def test_ctrl_c_on_the_client_cancels_its_tasks(cluster: Cluster, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r", '[steps.slow]\ninputs = ["bb"]\nbuilder = '
                          '["bb", "sh", "-c", "echo started; sleep 6; echo > $out"]\n'
                          '[steps.after]\ninputs = ["bb", "slow"]\nbuilder = '
                          '["bb", "sh", "-c", "echo after > $out"]\n')
    ids = {}
    for step in ("slow", "after"):
        show = subprocess.run([sys.executable, "-m", "reprobuild", "show", "--store",
                               str(tmp_path / "c"), str(recipe), step], capture_output=True,
                              text=True, cwd=REPO, check=True)
        ids[step] = json.loads(show.stdout)["id"]
    client = subprocess.Popen(
        [sys.executable, "-m", "reprobuild", "build", "--store", str(tmp_path / "client"),
         "--executor", cluster.address, "--certs", str(cluster.certs), "--cache",
         cluster.cache_url, f"--trusted-keys={cluster.key}.pub", str(recipe), "after"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 60
    while not any((cluster.worker_store(n) / "logs" / f"{ids['slow']}.log").exists()
                  for n in cluster.workers):
        assert time.monotonic() < deadline and client.poll() is None, "slow never started"
        time.sleep(0.05)
    client.send_signal(signal.SIGINT)
    _out, err = client.communicate(timeout=60)
    assert client.returncode == 130, err
    # slow's sandbox ends on its own, 6 s after it started (long enough that a loaded
    # machine still sends the signal while it runs); after must never start.
    time.sleep(8)
    assert not (cluster.cache / "meta" / f"{ids['after']}.json").exists()
    assert not any((cluster.worker_store(n) / "logs" / f"{ids['after']}.log").exists()
                   for n in cluster.workers)
