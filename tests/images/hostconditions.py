"""One source tree made and built under varying host conditions, for every image format.

An image must not depend on the host: the order files were created in, the file system
the source lives on (tmpfs or disk), holes in the source, the order xattrs were set, the
umask, TZ, the locale, the working directory or the uid building it. A ``Condition``
names one such host; ``make_source`` makes the same logical tree under it, and
``build_under_conditions`` runs a format's build script once per condition and returns the
images, which the format's test compares byte for byte. ``write_tree`` unpacks a whole
Tree (owners, devices, sockets) under a condition, as root would.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from reprobuild.trees.load import load_tree
from reprobuild.trees.tree import EntryType, Tree
from tests.conftest import REPO, Unprivileged, need

SHM = Path("/dev/shm")
DISK = Path("/var/tmp")
BLOCK_SIZE = 4096
XATTRS = ((b"user.a", b"1"), (b"user.b", b"2" * 80), (b"user.c", b"c" * 300))


@dataclass(frozen=True)
class Condition:
    """One host: where and how the source is made, and how the builder runs."""

    on_tmpfs: bool = False  # the source on /dev/shm, else on disk (/var/tmp)
    reverse: bool = False  # files, links and siblings created in reverse order
    sparse: bool = False  # zero blocks left as holes
    xattr_order: int = 0  # 0: xattrs set in their listed order, 1: reversed
    umask: int = 0o022  # while making the source and for the builder
    env: Mapping[str, str] = field(default_factory=dict)  # TZ, LANG, LC_ALL ...
    as_nobody: bool = False  # the builder runs as uid 65534
    cwd: Path | None = None  # the builder's working directory


# Three hosts as unlike as can be: disk/tmpfs, order, holes, xattr order, umask, TZ with
# odd offsets, locales, uid.
CONDITIONS = (
    Condition(env={"TZ": "UTC", "LC_ALL": "C"}),
    Condition(on_tmpfs=True, reverse=True, sparse=True, xattr_order=1, umask=0o077,
              env={"TZ": "Asia/Kolkata", "LC_ALL": "C.UTF-8"}, as_nobody=True),
    Condition(reverse=True, sparse=True, xattr_order=1, umask=0o002,
              env={"TZ": "America/St_Johns", "LANG": "tr_TR.UTF-8"}),
)


def tmpfs_available() -> bool:
    return SHM.is_dir() and os.access(SHM, os.W_OK)


def need_tmpfs() -> None:
    need(tmpfs_available(), "needs a writable tmpfs at /dev/shm")


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextmanager
def source_dir(name: str, condition: Condition) -> Iterator[Path]:
    """A fresh world-readable directory on tmpfs or disk, as ``condition`` says; removed
    afterwards."""
    base = (SHM if condition.on_tmpfs else DISK) / f"{name}-{os.getpid()}"
    base.mkdir()
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def write_sparse(path: Path | bytes, data: bytes, *, sparse: bool) -> None:
    """Write ``data``; with ``sparse``, every all-zero block is a hole."""
    with open(path, "wb") as out:
        if not sparse:
            out.write(data)
            return
        for at in range(0, len(data), BLOCK_SIZE):
            chunk = data[at:at + BLOCK_SIZE]
            if chunk.count(0) == len(chunk):
                out.seek(len(chunk), 1)
            else:
                out.write(chunk)
        out.truncate(len(data))


def make_source(root: Path, condition: Condition, *, per_dir: int = 40, wide: int = 300,
                xattrs: Sequence[tuple[bytes, bytes]] = XATTRS) -> None:
    """The same logical tree in ``root``, created in ``condition``'s order and way: four
    directories of ``per_dir`` files (each ``f3`` has holes, a middle block and a
    trailer), a directory of ``wide`` long names, xattrs on every file, two symlinks and
    a hardlink ``hard`` to ``d1/f2``."""
    names = [f"d{i}/f{j}" for i in range(4) for j in range(per_dir)]
    names += [f"wide/n{j:04d}-{'y' * (j % 30)}" for j in range(wide)]  # an htree in ext4
    if condition.reverse:
        names.reverse()
    with umask(condition.umask):
        for name in names:
            path = root / name
            path.parent.mkdir(exist_ok=True)
            if name.endswith("f3"):
                trailer = name.encode().ljust(10, b"-")[:10]
                data = (bytes(4 * BLOCK_SIZE) + b"m" * BLOCK_SIZE
                        + bytes(4 * BLOCK_SIZE - 10) + trailer)
            else:
                size = 5000 + 97 * len(name) * (1 + name.count("1"))
                data = name.encode() * (size // len(name))
            write_sparse(path, data, sparse=condition.sparse)
            os.chmod(path, 0o644 if "f1" not in name else 0o755)
            for key, value in (xattrs if condition.xattr_order == 0 else reversed(xattrs)):
                os.setxattr(path, key, value)
        links = [("l1", "d0/f0"), ("l2", "x" * 120)]
        for name, target in (links if not condition.reverse else reversed(links)):
            (root / name).symlink_to(target)
        os.link(root / "d1" / "f2", root / "hard")
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            os.chmod(path, 0o755)


def small_source(root: Path, condition: Condition) -> None:
    """``make_source`` at its smallest: sixteen files, the links, no xattrs."""
    make_source(root, condition, per_dir=4, wide=0, xattrs=())


def in_process_conditions() -> list[Condition]:
    """The hosts a build in this process can vary (the source: disk or tmpfs where there
    is one, creation order, holes, xattr order, umask)."""
    conditions = [CONDITIONS[0], replace(CONDITIONS[1], on_tmpfs=False), CONDITIONS[2]]
    if tmpfs_available():
        conditions.append(CONDITIONS[1])
    return conditions


def images_in_process(name: str, image_of: Callable[[Tree], bytes], *, epoch: int,
                      make: Callable[[Path, Condition], None] = small_source) -> list[bytes]:
    """``image_of`` the tree loaded from the source made under each in-process condition."""
    images = []
    for number, condition in enumerate(in_process_conditions()):
        with source_dir(f"{name}-tree-{number}", condition) as root:
            make(root, condition)
            images.append(image_of(load_tree(str(root), epoch=epoch)))
    return images


def write_tree(tree: Tree, root: Path, condition: Condition = Condition()) -> None:
    """Unpack ``tree`` into ``root`` as root would (owners, modes, devices, sockets,
    xattrs, nanosecond times), in ``condition``'s creation order, holes, xattr order and
    umask."""
    base = os.fsencode(root)
    entries = [e for e in tree if e.path]
    if condition.reverse:
        # Parents still first, but siblings and files in reverse order.
        entries.sort(key=lambda e: (e.path.count(b"/"), e.path), reverse=True)
        entries.sort(key=lambda e: e.path.count(b"/") if e.type is EntryType.DIRECTORY
                     else 1 << 30)
    os.makedirs(base, exist_ok=True)
    with umask(condition.umask):
        for entry in entries:
            path = base + b"/" + entry.path
            if entry.type is EntryType.DIRECTORY:
                os.makedirs(path, exist_ok=True)
            elif entry.type is EntryType.REGULAR:
                assert entry.content is not None
                write_sparse(path, entry.content.read(), sparse=condition.sparse)
            elif entry.type is EntryType.HARDLINK:
                continue  # once every primary exists
            elif entry.type is EntryType.SYMLINK:
                assert entry.target is not None
                os.symlink(entry.target, path)  # noqa: PTH211 - bytes paths
            elif entry.type is EntryType.SOCKET:
                with socket.socket(socket.AF_UNIX) as s:
                    s.bind(path)
            else:
                kind = {EntryType.CHAR: stat.S_IFCHR, EntryType.BLOCK: stat.S_IFBLK,
                        EntryType.FIFO: stat.S_IFIFO}[entry.type]
                os.mknod(path, kind | 0o600, os.makedev(entry.rdev_major, entry.rdev_minor))
        for entry in entries:
            if entry.type is EntryType.HARDLINK:
                assert entry.target is not None
                os.link(base + b"/" + entry.target, base + b"/" + entry.path)
    for entry in sorted(tree, key=lambda e: e.path.count(b"/"), reverse=True):
        if entry.type is EntryType.HARDLINK:
            continue
        path = base + b"/" + entry.path if entry.path else base
        os.lchown(path, entry.uid, entry.gid)
        if entry.type is not EntryType.SYMLINK:
            os.chmod(path, entry.mode)
        # After chown, which drops security.capability.
        xattrs = list(entry.xattrs)
        for name, value in (xattrs if condition.xattr_order == 0 else reversed(xattrs)):
            os.setxattr(path, name, value, follow_symlinks=False)
        os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def run_under(argv: Sequence[str], condition: Condition, *, cwd: Path | str,
              unprivileged: Unprivileged | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (``python`` as first word: the interpreter) with ``condition``'s umask,
    environment and uid."""
    wrapped = ["sh", "-c", f"umask {condition.umask:03o} && exec \"$@\"", "sh", *argv]
    if condition.as_nobody:
        assert unprivileged is not None, "running as nobody needs the unprivileged fixture"
        return unprivileged.run(wrapped, env=dict(condition.env), cwd=cwd)
    wrapped = [sys.executable if a == "python" else a for a in wrapped]
    env = {**os.environ, "PYTHONPATH": str(REPO), **condition.env}
    return subprocess.run(wrapped, env=env, cwd=cwd, capture_output=True, text=True)


def build_under_conditions(unprivileged: Unprivileged, name: str, script: str,
                           make: Callable[[Path, Condition], None],
                           conditions: Sequence[Condition] = CONDITIONS) -> list[Path]:
    """Under each condition: ``make`` the source, run ``script SOURCE IMAGE`` (working
    directory alternately the unprivileged root and the output's directory unless the
    condition names one); the images, in order."""
    script_path = unprivileged.root / f"build_{name}.py"
    script_path.write_text(script)
    os.chmod(script_path, 0o644)
    images = []
    for number, condition in enumerate(conditions):
        with source_dir(f"{name}-test-{number}", condition) as source:
            make(source, condition)
            out_dir = unprivileged.scratch(f"{name}-host-{number}-{os.getpid()}")
            image = out_dir / "out.img"
            cwd = condition.cwd or (out_dir if number % 2 else unprivileged.root)
            result = run_under(["python", str(script_path), str(source), str(image)],
                               condition, cwd=cwd, unprivileged=unprivileged)
            assert result.returncode == 0, result.stderr
        images.append(image)
    return images
