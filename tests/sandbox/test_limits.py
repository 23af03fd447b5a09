"""The pieces that hold a run to its limits, without a sandbox (the escape suite runs them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox import plan
from sandbox.limits import Cgroups, LogKeeper, disk_usage, process_usage
from sandbox.operations import MountFilesystem
from sandbox.spec import Limits


def _kept(tmp_path: Path, chunks: list[bytes], limit: int | None) -> tuple[bytes, int]:
    log = tmp_path / "log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    keeper = LogKeeper(fd, limit)
    for chunk in chunks:
        keeper.feed(chunk)
    dropped = keeper.finish()
    return log.read_bytes(), dropped


def test_log_keeper_keeps_head_and_tail(tmp_path: Path) -> None:
    chunks = [b"%06d\n" % i for i in range(10000)]  # 70,000 bytes
    data, dropped = _kept(tmp_path, chunks, 1000)
    head, _, tail = data.partition(b"\n[sandbox: ")
    assert head == b"".join(chunks)[:500]
    assert tail.split(b"]\n", 1)[1] == b"".join(chunks)[-500:]
    assert dropped == 70000 - 1000
    assert f"{dropped} bytes of output dropped here".encode() in tail


@pytest.mark.parametrize("limit", [None, 100000])
def test_log_keeper_keeps_everything_under_its_limit(tmp_path: Path, limit: int | None
                                                     ) -> None:
    chunks = [b"x" * 999, b"y" * 4096, b"z"]
    data, dropped = _kept(tmp_path, chunks, limit)
    assert data == b"".join(chunks) and dropped == 0


def test_disk_usage_counts_blocks_once_and_sees_through_mode_000(tmp_path: Path) -> None:
    top = tmp_path / "build"
    hidden = top / "hidden"
    hidden.mkdir(parents=True)
    (hidden / "data").write_bytes(os.urandom(1 << 20))
    os.link(hidden / "data", top / "link")  # a hardlink is counted once
    with (top / "sparse").open("wb") as f:
        f.truncate(1 << 30)  # a hole costs nothing
    hidden.chmod(0)
    try:
        used = disk_usage([str(top)])
    finally:
        hidden.chmod(0o700)
    assert (1 << 20) <= used < (1 << 20) + (64 << 10)


def test_process_usage_counts_this_process(tmp_path: Path) -> None:
    tasks, private = process_usage(os.getpid())
    assert tasks >= 1 and private > 1 << 20


def test_tmpfs_sizes_in_the_plan() -> None:
    ops = plan.job_operations((), epoch=0, limits=Limits(tmp=8 << 20, shm=1))
    options = {op.target: op.data for op in ops if isinstance(op, MountFilesystem)}
    assert options[plan.NEWROOT + "/tmp"] == f"mode=1777,size={8 << 20}"
    assert options[plan.NEWROOT + "/build"] == f"mode=0755,size={8 << 20}"
    assert options[plan.DEV + "/shm"] == f"mode=1777,size={os.sysconf('SC_PAGE_SIZE')}"
    unbounded = plan.job_operations((), epoch=0)
    assert all("size=" not in (op.data or "") for op in unbounded
               if isinstance(op, MountFilesystem))


def _cgroup_tree(tmp_path: Path, controllers: str, procs: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    mine = root / "user.slice" / "app.scope"
    mine.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (mine / "cgroup.controllers").write_text(controllers)
    (mine / "cgroup.subtree_control").write_text("")
    (mine / "cgroup.procs").write_text(procs)
    own = tmp_path / "own"
    own.write_text("0::/user.slice/app.scope\n")
    return root, own


def test_cgroups_found_in_a_delegated_subtree(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    caller = os.getppid()
    root, own = _cgroup_tree(tmp_path, "memory pids\n", f"{caller}\n{os.getpid()}\n")
    mine = root / "user.slice" / "app.scope"
    # cgroupfs makes a cgroup's files with it; here the test makes them.
    for directory, names in (("reprobuild-leaf", ["cgroup.procs"]),
                             (f"reprobuild-{os.getpid()}-1",
                              ["cgroup.procs", "memory.max", "memory.oom.group",
                               "pids.max"])):
        (mine / directory).mkdir()
        for name in names:
            (mine / directory / name).write_text("")
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:
        if not os.path.isdir(path):
            real_mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", mkdir)
    found, why = Cgroups.find(caller=caller, root=str(root), own=str(own))
    assert found is not None, why
    assert "+memory +pids" in (mine / "cgroup.subtree_control").read_text()
    moved = (mine / "reprobuild-leaf" / "cgroup.procs").read_text()
    assert moved in {str(caller), str(os.getpid())}
    path = found.enter(12345, Limits(memory=1 << 30, pids=100))
    assert Path(path, "memory.max").read_text() == str(1 << 30)
    assert Path(path, "pids.max").read_text() == "100"
    assert Path(path, "cgroup.procs").read_text() == "12345"
    Path(path, "pids.events").write_text("max 3\n")
    assert Cgroups.passed(path) == "pids"


@pytest.mark.parametrize("controllers, procs, reason", [
    ("cpu\n", "{caller}\n", "lacks the memory or pids controller"),
    ("memory pids\n", "{caller}\n1\n", "holds other processes"),
])
def test_cgroups_refused_with_a_reason(tmp_path: Path, controllers: str, procs: str,
                                       reason: str) -> None:
    caller = os.getppid()
    root, own = _cgroup_tree(tmp_path, controllers, procs.format(caller=caller))
    found, why = Cgroups.find(caller=caller, root=str(root), own=str(own))
    assert found is None and reason in why


def test_no_cgroup_v2_here_is_said(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.write_text("0::/\n")
    found, why = Cgroups.find(caller=1, root=str(tmp_path / "none"), own=str(own))
    assert found is None and "no cgroup v2 hierarchy" in why
