"""What a sandbox looks like, as data: its namespaces, its file system, its environment.

Pure: these functions return lists of :mod:`sandbox.operations` and dictionaries; they
never touch the disk, so the plan can be printed and tested without a sandbox.

Inside every sandbox:

* user ``build`` (uid 1000) in group ``users`` (gid 100), as Nix's ``nixbld`` users;
  the caller's uid and gid map to them and nothing else is mapped; ``setgroups`` is denied;
* hostname ``localhost``, domain name ``(none)``; only ``lo`` (127.0.0.1, ::1) is up;
* ``/`` is a read-only tmpfs holding ``/etc/{passwd,group,hosts}``, the declared mounts
  (read-only ones through an overlay, see :class:`sandbox.operations.OverlayMount`,
  writable ones bound nosuid,nodev), a tmpfs ``/build`` and ``/tmp`` unless declared,
  a new ``/proc`` and a minimal read-only ``/dev``; everything the sandbox made has the
  epoch as its time;
* the environment is the caller's variables overridden by :data:`FIXED_ENV` and
  ``SOURCE_DATE_EPOCH`` (the spec's epoch) and ``BUILD_CORES`` (the spec's core count);
  ``PATH`` is ``/path-not-set`` unless the caller sets it.

What the kernel still shows and a user namespace cannot change: /proc/self/mountinfo
names a writable *file*'s host path (relative to its file system; read-only inputs go
through overlays and show only ``.``; writable directories too, when the server could
make their work directory beside them, so the store's location stays hidden) and the
host uid owning each tmpfs (``uid=`` option); ``ls -l /`` shows /proc's mount time and
a link count that counts the host's processes; supplementary groups of an unprivileged
caller appear as ``nogroup`` (root callers drop theirs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from sandbox.limits import tmpfs_size
from sandbox.operations import (
    BindMount,
    CloneNamespaces,
    LoopbackUp,
    MakeDirectory,
    MakePrivate,
    MapIds,
    MountFilesystem,
    Operation,
    OverlayMount,
    PivotRoot,
    RemountBind,
    SetHostname,
    Stamp,
    Symlink,
    Unmount,
    Unshare,
    WritableOverlay,
    WriteFile,
)
from sandbox.spec import Limits, SandboxSpec
from sandbox.syscalls import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
)

BUILD_UID = 1000
BUILD_GID = 100
HOSTNAME = "localhost"
DOMAINNAME = "(none)"

FIXED_ENV = {
    "HOME": "/homeless-shelter",  # does not exist: a build must not depend on a home
    "TMPDIR": "/tmp",
    "TZ": "UTC",
    "LANG": "C.UTF-8",
}
DEFAULT_PATH = "/path-not-set"

PASSWD = (b"root:x:0:0:root:/homeless-shelter:/noshell\n"
          b"build:x:1000:100:reprobuild builder:/build:/noshell\n"
          b"nobody:x:65534:65534:nobody:/nonexistent:/noshell\n")
GROUP = b"root:x:0:\nusers:x:100:\nnogroup:x:65534:\n"
HOSTS = b"127.0.0.1 localhost\n::1 localhost\n"

# The host's directory a first tmpfs is mounted on; it only has to exist. As bubblewrap
# does, the sandbox pivots into that tmpfs, finds the host at /oldroot, builds the new
# root at /newroot, then pivots again and detaches everything else.
BASE = "/tmp"
NEWROOT = "/newroot"
OLDROOT = "/oldroot"
EMPTY = "/empty"
STAGE = "/stage"

DEVICES = ("full", "null", "random", "tty", "urandom", "zero")
DEV_LINKS = (("fd", "/proc/self/fd"), ("ptmx", "pts/ptmx"), ("stderr", "/proc/self/fd/2"),
             ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"))

NAMESPACES = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC
RO = MS_RDONLY | MS_NOSUID | MS_NODEV
UNBOUNDED = Limits()


@dataclass(frozen=True)
class ResolvedMount:
    """A declared mount whose host source has been resolved (symlinks followed)."""

    source: str  # real host path, no symlinks
    target: str  # normalised absolute path inside the sandbox
    writable: bool
    is_dir: bool
    # How to reach the source (for a read-only file: its directory) from the host's root
    # when not by its path: /proc/self/fd/N of a descriptor opened before dropping root.
    via: str = ""
    # A writable directory's overlay work directory (empty, beside it, made by the
    # server), relative to the source or (via a descriptor) from the host's root; ""
    # when there is none and the directory is bound as it is.
    work: str = ""
    # Set for writable directories that share their parent with another one: the parent
    # (or, via a descriptor, how to reach it) is the upper layer of one overlay, ``work``
    # is that overlay's work directory, and the directory is bound out of it.
    layer: str = ""


def work_directory(source: str) -> str:
    """Where a writable directory's overlay work directory goes: beside it."""
    parent, name = os.path.split(source)
    return os.path.join(parent, f".sandbox-work-{name}")


def shared_layers(mounts: Sequence[ResolvedMount]) -> dict[str, str]:
    """Writable directory sources that can share one overlay -> its upper (their parent).

    Two or more writable directories with the same parent, when no mount's source is
    that parent or lies above it, and the parent is not ``/``.
    """
    by_parent: dict[str, list[str]] = {}
    for m in mounts:
        if m.writable and m.is_dir:
            by_parent.setdefault(os.path.dirname(m.source), []).append(m.source)
    shared = {}
    for parent, sources in by_parent.items():
        if len(sources) < 2 or parent == "/" or len(set(sources)) != len(sources):
            continue
        if any(parent == m.source or parent.startswith(m.source.rstrip("/") + "/")
               for m in mounts):
            continue
        shared.update(dict.fromkeys(sources, parent))
    return shared


# The host uid and gid a root caller's sandboxes run as (mapping root itself would make
# every root-owned host file look owned by the build user, unlike for anybody else).
ROOT_CALLER_UID = 65534


def namespace_operations(host_uid: int, host_gid: int, *, cgroup: bool
                         ) -> tuple[CloneNamespaces, MapIds, Unshare]:
    """The clone into a new user and pid namespace, the id maps, and the other namespaces.

    The server only clones (user and pid namespaces must be made by the fork); the child
    makes the costly ones (network above all) itself, in parallel with other runs. A root
    caller's maps are written by the server (``pid`` filled in after the clone).
    """
    as_root = host_uid == 0
    if as_root:
        host_uid = host_gid = ROOT_CALLER_UID
    return (CloneNamespaces(CLONE_NEWUSER | CLONE_NEWPID),
            MapIds(f"{BUILD_UID} {host_uid} 1", f"{BUILD_GID} {host_gid} 1",
                   "" if as_root else "self"),
            Unshare(NAMESPACES | (CLONE_NEWCGROUP if cgroup else 0)))


def network_operations() -> list[Operation]:
    return [SetHostname(HOSTNAME, DOMAINNAME), LoopbackUp()]


def _parents(path: str) -> list[str]:
    """``/a/b/c`` -> ``["/a", "/a/b"]``."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


SKELETON_DIRS = ("/build", "/dev", "/etc", "/proc", "/tmp")
ETC_FILES = {"/etc/group": GROUP, "/etc/hosts": HOSTS, "/etc/passwd": PASSWD}
DEV = NEWROOT + "/dev"


def skeleton_operations() -> list[Operation]:
    """The part of the new root that is the same for every run.

    A spare pid 1 (:mod:`sandbox.server`) builds it before its job arrives: a tmpfs
    root with /etc's files, a minimal /dev and a new /proc. Nothing here depends on the
    job; the sized tmpfs /tmp and /dev/shm, the times and the read-only root come with it.
    """
    ops: list[Operation] = [
        MakePrivate(),
        MountFilesystem("tmpfs", BASE, MS_NOSUID | MS_NODEV, "mode=0755"),
    ]
    ops += [MakeDirectory(BASE + d) for d in (NEWROOT, OLDROOT, EMPTY, STAGE)]
    ops.append(PivotRoot(BASE, OLDROOT.lstrip("/")))
    ops.append(MountFilesystem("tmpfs", NEWROOT, MS_NOSUID | MS_NODEV, "mode=0755"))
    ops += [MakeDirectory(NEWROOT + d) for d in SKELETON_DIRS]
    ops += [WriteFile(NEWROOT + path, content) for path, content in sorted(ETC_FILES.items())]
    ops.append(MountFilesystem("tmpfs", DEV, MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755"))
    ops += [WriteFile(f"{DEV}/{name}", b"", 0o666) for name in DEVICES]
    ops += [MakeDirectory(f"{DEV}/pts"), MakeDirectory(f"{DEV}/shm", 0o1777)]
    ops += [Symlink(target, f"{DEV}/{name}") for name, target in DEV_LINKS]
    ops += [BindMount(f"{OLDROOT}/dev/{name}", f"{DEV}/{name}") for name in DEVICES]
    ops.append(MountFilesystem("devpts", f"{DEV}/pts", MS_NOSUID | MS_NOEXEC,
                               "newinstance,ptmxmode=0666,mode=0620"))
    ops.append(MountFilesystem("proc", NEWROOT + "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC))
    return ops


def job_operations(mounts: Sequence[ResolvedMount], *, epoch: int,
                   limits: Limits = UNBOUNDED) -> list[Operation]:
    """Finish the new root for one run: its mounts, /build, the epoch's times, pivot.

    /tmp and /dev/shm are tmpfs of the sizes ``limits`` gives (and /build too, the size
    of /tmp, unless mounted). Declared mounts go over whatever the skeleton has at their
    target (/tmp, /etc/hosts).
    """
    declared = {m.target for m in mounts}
    tmp = tmpfs_size(limits.tmp)
    ops: list[Operation] = [
        MountFilesystem("tmpfs", f"{DEV}/shm", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                        "mode=1777" + tmpfs_size(limits.shm)),
        MountFilesystem("tmpfs", NEWROOT + "/tmp", MS_NOSUID | MS_NODEV, "mode=1777" + tmp)]
    if "/build" not in declared:
        ops.append(MountFilesystem("tmpfs", NEWROOT + "/build", MS_NOSUID | MS_NODEV,
                                   "mode=0755" + tmp))
    # What the sandbox made and no mount covers gets the epoch as its time.
    made = [NEWROOT, *(NEWROOT + d for d in SKELETON_DIRS if d != "/proc"),
            *(NEWROOT + f for f in sorted(ETC_FILES)), f"{DEV}/shm",
            *(f"{DEV}/{name}" for name, _ in DEV_LINKS)]
    exists = {"/", *SKELETON_DIRS, *ETC_FILES, *(f"/dev/{n}" for n in DEVICES),
              "/dev/pts", "/dev/shm", *(f"/dev/{n}" for n, _ in DEV_LINKS)}
    directories: set[str] = set()
    for m in mounts:
        directories.update(_parents(m.target))
        if m.is_dir:
            directories.add(m.target)
    for d in sorted(directories - exists, key=os.fsencode):
        ops.append(MakeDirectory(NEWROOT + d))
        made.append(NEWROOT + d)
    for m in mounts:
        if not m.is_dir and m.target not in exists:
            ops.append(WriteFile(NEWROOT + m.target, b"", 0o644))
            made.append(NEWROOT + m.target)
    ops.append(Stamp(tuple(made), epoch))

    staged: dict[str, str] = {}
    layers: dict[str, str] = {}
    for m in sorted(mounts, key=lambda m: os.fsencode(m.target)):
        target = NEWROOT + m.target
        if m.writable and m.work and m.layer:
            # One overlay for every writable directory of this parent (its probes of the
            # upper file system cost more than the mount), each bound out of it: a bind
            # mount of an overlay's subdirectory names only that subdirectory.
            layer = layers.get(m.layer)
            if layer is None:
                layer = layers[m.layer] = f"{STAGE}/w{len(layers)}"
                work = m.work if not m.work.startswith("/") else OLDROOT + m.work
                ops.append(MakeDirectory(layer))
                ops.append(WritableOverlay(OLDROOT + m.layer, layer, work, EMPTY))
            ops.append(BindMount(f"{layer}/{os.path.basename(m.source)}", target))
        elif m.writable and m.work:
            work = m.work if not m.work.startswith("/") else OLDROOT + m.work
            ops.append(WritableOverlay(OLDROOT + (m.via or m.source), target, work, EMPTY))
        elif m.writable:
            ops.append(BindMount(OLDROOT + (m.via or m.source), target))
            ops.append(RemountBind(target, MS_NOSUID | MS_NODEV))
        elif m.is_dir:
            ops.append(OverlayMount(OLDROOT + (m.via or m.source), target, EMPTY))
        else:
            # A file: overlay its directory once, then bind the one file out of it, so
            # mountinfo shows only the file's own name.
            parent, name = os.path.split(m.source)
            stage = staged.get(parent)
            if stage is None:
                stage = staged[parent] = f"{STAGE}/{len(staged)}"
                ops.append(MakeDirectory(stage))
                ops.append(OverlayMount(OLDROOT + (m.via or parent), stage, EMPTY))
            ops.append(BindMount(f"{stage}/{name}", target))
    ops.append(RemountBind(DEV, RO | MS_NOEXEC))
    ops.append(RemountBind(NEWROOT, RO))
    ops.append(Unmount(OLDROOT))
    ops.append(PivotRoot(NEWROOT))
    ops.append(Unmount("."))
    return ops


def filesystem_operations(mounts: Sequence[ResolvedMount], *, epoch: int,
                          limits: Limits = UNBOUNDED) -> list[Operation]:
    """The whole new root (run by the sandbox's pid 1, inside every namespace)."""
    return skeleton_operations() + job_operations(mounts, epoch=epoch, limits=limits)


def environment(spec: SandboxSpec) -> dict[str, str]:
    """The complete environment of the sandboxed command."""
    env = {"PATH": DEFAULT_PATH}
    env.update(dict(spec.env))
    env.update(FIXED_ENV)
    env["SOURCE_DATE_EPOCH"] = str(spec.epoch)
    env["BUILD_CORES"] = str(spec.cores)
    return env
