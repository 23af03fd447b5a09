"""The sandbox as data: plans, environment, wire format, and the user namespace diagnosis."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import operations, plan, userns, wire
from sandbox.errors import SandboxError, UserNamespacesUnavailable
from sandbox.spec import Mount, SandboxResult, SandboxSpec


def test_read_only_inputs_go_through_overlays_and_files_through_their_directory() -> None:
    mounts = [plan.ResolvedMount("/store/aa-dir", "/inputs/d", writable=False, is_dir=True),
              plan.ResolvedMount("/store/bb-file", "/inputs/f", writable=False, is_dir=False),
              plan.ResolvedMount("/store/cc-file", "/inputs/g", writable=False, is_dir=False),
              plan.ResolvedMount("/tmp/b", "/build", writable=True, is_dir=True)]
    ops = plan.filesystem_operations(mounts, epoch=7)
    overlays = [op for op in ops if isinstance(op, operations.OverlayMount)]
    assert [(o.lower, o.target) for o in overlays] == [
        ("/oldroot/store/aa-dir", "/newroot/inputs/d"), ("/oldroot/store", "/stage/0")]
    binds = [(op.source, op.target) for op in ops if isinstance(op, operations.BindMount)]
    assert ("/stage/0/bb-file", "/newroot/inputs/f") in binds
    assert ("/stage/0/cc-file", "/newroot/inputs/g") in binds
    assert ("/oldroot/tmp/b", "/newroot/build") in binds
    tmpfs_targets = [op.target for op in ops
                     if isinstance(op, operations.MountFilesystem) and op.fstype == "tmpfs"]
    assert "/newroot/build" not in tmpfs_targets and "/newroot/tmp" in tmpfs_targets
    stamps = [op for op in ops if isinstance(op, operations.Stamp)]
    assert all(s.epoch == 7 for s in stamps) and "/newroot/etc/passwd" in stamps[0].paths
    assert isinstance(ops[-1], operations.Unmount) and ops[-1].target == "."
    text = "\n".join(op.describe() for op in ops)
    assert "mount -o remount,bind,ro,nosuid,nodev /newroot" in text
    assert "lowerdir=.:/empty" in text


def test_writable_siblings_share_one_overlay_of_their_parent() -> None:
    build = plan.ResolvedMount("/s/tmp/b.1/build", "/build", writable=True, is_dir=True)
    out = plan.ResolvedMount("/s/tmp/b.1/out", "/output", writable=True, is_dir=True)
    alone = plan.ResolvedMount("/s/other", "/other", writable=True, is_dir=True)
    assert plan.shared_layers([build, out, alone]) == {build.source: "/s/tmp/b.1",
                                                        out.source: "/s/tmp/b.1"}
    above = plan.ResolvedMount("/s/tmp", "/in", writable=False, is_dir=True)
    assert plan.shared_layers([build, out, above]) == {}  # the parent is visible elsewhere
    assert plan.shared_layers([build]) == {}
    layered = [plan.ResolvedMount(m.source, m.target, True, True, work="../.sandbox-work-b.1",
                                  layer="/s/tmp/b.1") for m in (build, out)]
    ops = plan.job_operations(layered, epoch=0)
    overlays = [op for op in ops if isinstance(op, operations.WritableOverlay)]
    assert [(o.upper, o.target, o.work) for o in overlays] == [
        ("/oldroot/s/tmp/b.1", "/stage/w0", "../.sandbox-work-b.1")]
    binds = [(op.source, op.target) for op in ops if isinstance(op, operations.BindMount)]
    assert binds == [("/stage/w0/build", "/newroot/build"), ("/stage/w0/out", "/newroot/output")]


def test_root_callers_map_an_unprivileged_uid_from_outside() -> None:
    clone, maps, rest = plan.namespace_operations(0, 0, cgroup=True)
    assert maps.pid == "" and maps.uid_map == "1000 65534 1" and maps.gid_map == "100 65534 1"
    assert "--user --pid" in clone.describe() and "--net" in rest.describe()
    assert "--cgroup" in rest.describe()
    _clone, own, own_rest = plan.namespace_operations(4242, 77, cgroup=False)
    assert own.pid == "self" and own.uid_map == "1000 4242 1" and own.gid_map == "100 77 1"
    assert "--cgroup" not in own_rest.describe()
    assert "echo deny > /proc/self/setgroups" in own.describe()


def test_environment_fixed_variables_win() -> None:
    spec = SandboxSpec(argv=("x",), env=(("HOME", "/root"), ("TZ", "Asia/Tokyo"), ("A", "1")),
                       epoch=123, cores=3)
    env = plan.environment(spec)
    assert env == {"A": "1", "HOME": "/homeless-shelter", "TZ": "UTC", "LANG": "C.UTF-8",
                   "TMPDIR": "/tmp", "PATH": "/path-not-set", "SOURCE_DATE_EPOCH": "123",
                   "BUILD_CORES": "3"}
    with_path = SandboxSpec(argv=("x",), env=(("PATH", "/bin"),))
    assert plan.environment(with_path)["PATH"] == "/bin"


def test_wire_round_trip() -> None:
    spec = SandboxSpec(argv=("a", "b"), mounts=(Mount("/s", "/t", writable=True),),
                       env=(("K", "V"),), cwd="/c", epoch=5, cores=2, timeout=1.5,
                       interactive=True, debug=True)
    assert wire.decode_spec(wire.encode_spec(spec)) == spec
    result = SandboxResult(returncode=None, signal=9, timed_out=True, duration=0.5)
    assert wire.decode_reply(wire.encode_result(result)) == result
    with pytest.raises(UserNamespacesUnavailable, match="which"):
        wire.decode_reply(wire.encode_error(UserNamespacesUnavailable("which", hint="h")))
    with pytest.raises(SandboxError) as caught:
        wire.decode_reply(wire.encode_error(SandboxError("setup", hint="do this")))
    assert caught.value.hint == "do this" and not isinstance(caught.value,
                                                             UserNamespacesUnavailable)


def facts(**changes: object) -> userns.HostFacts:
    base: dict[str, object] = dict(unprivileged_userns_clone=None, max_user_namespaces=1000,
                                   apparmor_restrict=None, seccomp_mode=0, in_container=False)
    base.update(changes)
    return userns.HostFacts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "says", "fix"), [
    ({"unprivileged_userns_clone": 0}, "kernel.unprivileged_userns_clone=0",
     "sysctl -w kernel.unprivileged_userns_clone=1"),
    ({"max_user_namespaces": 0}, "user.max_user_namespaces=0",
     "sysctl -w user.max_user_namespaces=15000"),
    ({"apparmor_restrict": 1}, "kernel.apparmor_restrict_unprivileged_userns=1",
     "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
    ({"in_container": True}, "container", "seccomp=unconfined"),
    ({"seccomp_mode": 2}, "seccomp filter", "--security-opt"),
    ({}, "refused", "CONFIG_USER_NS"),
])
def test_diagnosis_names_the_cause_and_the_fix(changes: dict[str, object], says: str,
                                               fix: str) -> None:
    error = userns.diagnose(PermissionError(1, "Operation not permitted"), facts(**changes))
    assert isinstance(error, UserNamespacesUnavailable)
    assert says in error.message and "Operation not permitted" in error.message
    assert error.hint is not None and fix in error.hint


def test_read_facts_from_a_fake_proc(tmp_path: Path) -> None:
    proc = tmp_path
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "sys/user").mkdir(parents=True)
    (proc / "self").mkdir()
    (proc / "sys/kernel/unprivileged_userns_clone").write_text("0\n")
    (proc / "sys/user/max_user_namespaces").write_text("15000\n")
    (proc / "self/status").write_text("Name:\tx\nSeccomp:\t2\n")
    found = userns.read_facts(str(proc), root=str(proc))
    assert found.unprivileged_userns_clone == 0 and found.max_user_namespaces == 15000
    assert found.apparmor_restrict is None and found.seccomp_mode == 2
    assert not found.in_container
