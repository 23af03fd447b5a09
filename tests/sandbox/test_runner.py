"""The runner from the caller's side: concurrency, a dead spare, closing, bad requests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sandbox.errors import SandboxError
from sandbox.runner import ForkServer, start
from sandbox.spec import Mount, SandboxSpec
from tests.conftest import can_unshare_user, commands, need
from tests.sandbox.conftest import BUSYBOX

pytestmark = pytest.mark.userns


def busybox(script: str, **options: object) -> SandboxSpec:
    return SandboxSpec(argv=(BUSYBOX, "sh", "-c", script), mounts=(Mount(BUSYBOX, BUSYBOX),),
                       env=(("PATH", "/bin"),), **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def runner() -> Iterator[ForkServer]:
    need(can_unshare_user() and os.path.exists(BUSYBOX), "needs user namespaces, busybox")
    with start() as server:
        yield server


def run(runner: ForkServer, spec: SandboxSpec) -> tuple[int | None, str]:
    with tempfile.TemporaryFile() as log:
        result = runner.run(spec, log_fd=log.fileno())
        log.seek(0)
        return result.returncode, log.read().decode()


def spare_pids(runner: ForkServer) -> list[int]:
    children = Path(f"/proc/{runner.pid}/task/{runner.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_concurrent_runs_each_get_their_own_sandbox(runner: ForkServer) -> None:
    # Runs overlap (each sleeps), yet each sees only its own /tmp and 127.0.0.1:8080
    # (counted once the background nc listens: how soon it does is the machine's load).
    spec = busybox("echo $$; touch /tmp/mine; (nc -l -p 8080 >/dev/null &); i=0; "
                   "until netstat -ltn | grep -q :8080 || [ $i = 600 ]; do "
                   "sleep 0.05; i=$((i+1)); done; sleep 0.3; "
                   "ls /tmp | wc -l; netstat -ltn | grep -c :8080")
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: run(runner, spec), range(8)))
    assert [log.split() for _, log in outcomes] == [["1", "1", "1"]] * 8
    assert all(code == 0 for code, _ in outcomes)


def test_a_dead_spare_is_replaced(runner: ForkServer) -> None:
    deadline = time.monotonic() + 5
    while not spare_pids(runner) and time.monotonic() < deadline:
        time.sleep(0.01)
    spares = spare_pids(runner)
    assert spares, "the server keeps a spare"
    for pid in spares:
        os.kill(pid, signal.SIGKILL)
    for pid in spares:  # dead (a zombie the server has not reaped), not merely dying
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert run(runner, busybox("echo fine")) == (0, "fine\n")


def test_bad_requests_raise_and_the_runner_survives(runner: ForkServer) -> None:
    with pytest.raises(SandboxError, match="No such file or directory"):
        runner.run(SandboxSpec(argv=("/x",), mounts=(Mount("/nonexistent", "/x"),)),
                   log_fd=2)
    with pytest.raises(SandboxError, match="unknown sandbox options"):
        runner.run(SandboxSpec(argv=("/x",), extra=(("network", "on"),)), log_fd=2)
    code, log = run(runner, SandboxSpec(argv=("/no/such/program",)))
    assert code == 127 and "cannot execute /no/such/program" in log
    assert run(runner, busybox("exit 4"))[0] == 4


def test_close_kills_running_sandboxes() -> None:
    need(can_unshare_user() and os.path.exists(BUSYBOX), "needs user namespaces, busybox")
    server = start()
    # The server closes however the test goes: a failure before close() would otherwise
    # leave the pool's exit waiting for a sandbox that sleeps for hours.
    with ThreadPoolExecutor(1) as pool, server:
        pending = pool.submit(run, server, busybox("sleep 7781"))
        # Closed while the sandbox runs (not before the run reached the server, which a
        # fixed wait on a loaded machine may give: "closed" is a SandboxError too).
        deadline = time.monotonic() + 30
        while not marked("7781"):
            assert time.monotonic() < deadline and not pending.done(), pending
            time.sleep(0.02)
        server.close()
        with pytest.raises(SandboxError):
            pending.result(timeout=10)
    assert not marked("7781")
    with pytest.raises(SandboxError, match="closed"):
        server.run(busybox("true"), log_fd=2)


def test_everything_dies_with_the_caller(tmp_path: Path) -> None:
    """SIGKILL the caller mid-run: the server, the spares and the sandbox all go."""
    need(can_unshare_user() and os.path.exists(BUSYBOX), "needs user namespaces, busybox")
    started = tmp_path / "started"
    caller = subprocess.Popen([sys.executable, "-c", f"""
import os, sys
sys.path[:0] = {sys.path!r}
from sandbox.runner import start
from tests.sandbox.test_runner import busybox
runner = start()
open({str(started)!r}, "w").write(str(runner.pid))
runner.run(busybox("sleep 7782"), log_fd=2)
"""], cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 20
    while not (started.exists() and marked("7782")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marked("7782"), "the sandbox started"
    server = int(started.read_text())
    caller.kill()
    caller.wait()
    while (marked("7782") or Path(f"/proc/{server}").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not marked("7782") and not Path(f"/proc/{server}").exists()


def marked(marker: str) -> bool:
    return bool(commands(marker.encode()))


def test_writable_paths_hidden_unless_asked_not_to(runner: ForkServer, tmp_path: Path) -> None:
    out = tmp_path / "host-visible-name" / "out"
    out.mkdir(parents=True)
    if os.geteuid() == 0:  # the sandbox's uid must be able to write there
        os.chown(out, 65534, 65534)
    script = "grep ' /output ' /proc/self/mountinfo; echo made > /output/f"
    for hide in (True, False):
        spec = SandboxSpec(argv=(BUSYBOX, "sh", "-c", script), env=(("PATH", "/bin"),),
                           mounts=(Mount(BUSYBOX, BUSYBOX), Mount(str(out), "/output", True)),
                           hide_writable_paths=hide)
        code, log = run(runner, spec)
        assert code == 0 and (out / "f").read_text() == "made\n"
        assert ("host-visible-name" in log) is not hide, log
        assert sorted(os.listdir(out.parent)) == ["out"]  # no work directory left
