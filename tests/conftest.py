"""Shared test fixtures: capability probes, reference-tool checks, unprivileged runs.

Probes try the operation once and skip with a reason; under CI (``CI=true``) a skip for a
missing tool or capability is a failure, so nothing is silently untested.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
NOBODY = 65534


def need(condition: bool, reason: str) -> None:
    """Skip (or, in CI, fail) the current test when ``condition`` is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must not skip: {reason}")
    pytest.skip(reason)


def need_tool(*names: str) -> None:
    for name in names:
        need(shutil.which(name) is not None or os.path.exists(f"/usr/sbin/{name}")
             or os.path.exists(f"/sbin/{name}"),
             f"missing tool {name} (run scripts/setup.sh --test)")


def commands(marker: bytes) -> dict[int, bytes]:
    """The command lines (NUL-separated, as in /proc) that contain ``marker``, by pid."""
    found = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue  # it ended meanwhile
        if marker in cmdline:
            found[int(name)] = cmdline
    return found


@functools.cache
def can_loop_mount() -> bool:
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp, "probe.img")
        mnt = Path(tmp, "mnt")
        mnt.mkdir()
        with img.open("wb") as f:
            f.truncate(8 << 20)
        if subprocess.run(["mkfs.ext4", "-q", str(img)], capture_output=True).returncode:
            return False
        ok = subprocess.run(["mount", "-o", "loop,ro", str(img), str(mnt)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(mnt)], check=False)
        return ok


@functools.cache
def can_unshare_user() -> bool:
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--net", "true"]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *cmd]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root"):
        need(can_loop_mount(), "needs root and loop mounts")
    if item.get_closest_marker("userns"):
        need(can_unshare_user(), "needs unprivileged user namespaces")


@pytest.fixture()
def mount_image(tmp_path: Path) -> Iterator[object]:
    """Loop-mount an image read-only: ``mount_image(path, fstype) -> Path``; unmounted after."""
    mounted: list[Path] = []

    def mount(image: Path, fstype: str, *, offset: int | None = None) -> Path:
        need(can_loop_mount(), "needs root and loop mounts")
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        opts = "loop,ro" + (f",offset={offset}" if offset is not None else "")
        subprocess.run(["mount", "-t", fstype, "-o", opts, str(image), str(target)],
                       check=True, capture_output=True)
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=False)


class Unprivileged:
    """Runs Python code of this checkout as uid 65534 (or as the caller when not root).

    The checkout may live under a 0700 home, so the packages and the venv's site-packages
    are copied once into a world-readable directory and run with Debian's /usr/bin/python3
    (the venv is made from it, so compiled modules match).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.as_root = os.geteuid() == 0
        purelib = Path(sysconfig.get_paths()["purelib"])
        site = root / "site"
        shutil.copytree(purelib, site, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pth", "__editable__*",
                                                      "reprobuild*"))
        for pkg in ("reprobuild", "sandbox"):
            shutil.copytree(REPO / pkg, root / "src" / pkg,
                            ignore=shutil.ignore_patterns("__pycache__"))
        self.python = "/usr/bin/python3" if self.as_root else sys.executable
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
            for name in filenames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
        os.chmod(root, 0o755)
        self.pythonpath = f"{root / 'src'}:{site}"

    def command(self, argv: Sequence[str]) -> list[str]:
        if self.as_root:
            return ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                    "--clear-groups", "--", *argv]
        return list(argv)

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            cwd: str | Path | None = None, timeout: float = 300,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` (``python`` as first word means the test interpreter) unprivileged."""
        argv = [self.python if a == "python" else a for a in argv]
        full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                    "HOME": str(self.root / "home"), "PYTHONPATH": self.pythonpath,
                    "PYTHONDONTWRITEBYTECODE": "1"}
        full_env.update(env or {})
        return subprocess.run(self.command(argv), env=full_env, cwd=cwd or self.root,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def reprobuild(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run(["python", "-m", "reprobuild", *args], **kwargs)  # type: ignore[arg-type]

    def scratch(self, name: str) -> Path:
        """A fresh directory the unprivileged uid owns."""
        path = self.root / "scratch" / name
        path.mkdir(parents=True)
        if self.as_root:
            for p in (self.root / "scratch", path):
                os.chown(p, NOBODY, NOBODY)
        return path


@pytest.fixture(scope="session")
def unprivileged() -> Iterator[Unprivileged]:
    need(can_unshare_user(), "needs unprivileged user namespaces")
    # Not under /tmp: the sandbox mounts a fresh /tmp over anything bound below it, and
    # built-in image steps bind this checkout's code at its host path.
    root = Path(tempfile.mkdtemp(prefix="reprobuild-unpriv-", dir="/var/tmp"))
    try:
        home = root / "home"
        yield_obj = Unprivileged(root)
        home.mkdir()
        if yield_obj.as_root:
            os.chown(home, NOBODY, NOBODY)
        yield yield_obj
    finally:
        shutil.rmtree(root, ignore_errors=True)


MINBASE_CACHE = Path(os.environ.get("REPROBUILD_TEST_CACHE", "/var/tmp/reprobuild-test-cache"))


@pytest.fixture(scope="session")
def debian_minbase_tar() -> Path:
    """A Debian bookworm minbase root filesystem as a tar (made once, then cached).

    Made with mmdebstrap from the host's own apt sources (no mirror name here).
    """
    target = MINBASE_CACHE / "bookworm-minbase.tar"
    if _valid_tar(target):
        return target
    # A cache entry that is not a complete tar (a directory left by an older fixture, a
    # truncated file) is rebuilt, never trusted.
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    need_tool("mmdebstrap")
    MINBASE_CACHE.mkdir(parents=True, exist_ok=True)
    sources = next((p for p in ("/etc/apt/sources.list.d/debian.sources",
                                "/etc/apt/sources.list") if Path(p).exists()), None)
    need(sources is not None, "no apt sources on this host for mmdebstrap")
    # mmdebstrap picks its output format from the name's extension: the temporary name
    # must end in ".tar" too, or it writes a directory.
    partial = MINBASE_CACHE / f"bookworm-minbase.{os.getpid()}.partial.tar"
    # "-" reads the host's apt sources (one-line or deb822 format) from stdin.
    cmd = ["mmdebstrap", "--variant=minbase", "--format=tar", "--quiet", "bookworm",
           str(partial), "-"]
    assert sources is not None
    with open(sources, "rb") as stdin:
        result = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True,
                                timeout=1800)
    need(result.returncode == 0, f"mmdebstrap failed: {result.stderr[-2000:]}")
    assert _valid_tar(partial), f"mmdebstrap did not write a tar at {partial}"
    partial.rename(target)
    return target


def _valid_tar(path: Path) -> bool:
    """True when ``path`` is a regular file that reads to the end as a tar with members."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with tarfile.open(path, "r:") as archive:
            return any(True for _ in archive)
    except (tarfile.TarError, OSError, EOFError):
        return False


class ComposefsTools:
    """mkcomposefs, composefs-info and mount.composefs of Debian unstable's ``composefs``
    package, run from a cached chroot through its own loader (no chroot call needed)."""

    PROGRAMS: ClassVar[dict[str, str]] = {"mkcomposefs": "usr/bin/mkcomposefs",
                                          "composefs-info": "usr/bin/composefs-info",
                                          "mount.composefs": "usr/sbin/mount.composefs"}

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = (root / "reprobuild-composefs-version").read_text().strip()

    def command(self, program: str, *args: str | Path) -> list[str]:
        libs = f"{self.root}/usr/lib/x86_64-linux-gnu:{self.root}/lib/x86_64-linux-gnu"
        return [str(self.root / "lib64/ld-linux-x86-64.so.2"), "--library-path", libs,
                str(self.root / self.PROGRAMS[program]), *map(str, args)]

    def run(self, program: str, *args: str | Path, text: bool = True,
            check: bool = True) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.command(program, *args), capture_output=True, text=text,
                              check=check, timeout=600)


def _host_debian_uri() -> str | None:
    """The first Debian archive URI of the host's apt sources (deb822 or one-line)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for line in deb822.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    one_line = Path("/etc/apt/sources.list")
    if one_line.exists():
        for line in one_line.read_text().splitlines():
            words = line.split()
            if words[:1] == ["deb"]:
                return next(w for w in words[1:] if not w.startswith("["))
    return None


@pytest.fixture(scope="session")
def composefs_tools() -> ComposefsTools:
    """Debian unstable with the ``composefs`` package, made once with mmdebstrap (as
    root) and cached beside the minbase tar."""
    target = MINBASE_CACHE / "sid-composefs"
    marker = target / "reprobuild-composefs-version"
    if marker.is_file():
        return ComposefsTools(target)
    if target.exists():
        shutil.rmtree(target)
    need_tool("mmdebstrap")
    need(os.geteuid() == 0, "making the composefs chroot needs root")
    uri = _host_debian_uri()
    need(uri is not None, "no apt sources on this host for mmdebstrap")
    MINBASE_CACHE.mkdir(parents=True, exist_ok=True)
    partial = MINBASE_CACHE / f"sid-composefs.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    # The unstable Release file may be past its Valid-Until in a snapshot.
    cmd = ["mmdebstrap", "--variant=essential", "--include=composefs", "--quiet",
           "--aptopt=Acquire::Check-Valid-Until \"false\"", "unstable", str(partial),
           f"deb {uri} unstable main"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    need(result.returncode == 0, f"mmdebstrap failed: {result.stderr[-2000:]}")
    version = subprocess.run(["chroot", str(partial), "dpkg-query", "-W", "-f=${Version}",
                              "composefs"], capture_output=True, text=True, check=True).stdout
    (partial / "reprobuild-composefs-version").write_text(version + "\n")
    partial.rename(target)
    return ComposefsTools(target)
class BootableDisk:
    """recipes/bootable-disk.toml built once as the unprivileged uid: where and what."""

    TARGETS = ("systemd-boot", "kernel", "initrd", "root-verity", "uki", "esp", "disk")

    def __init__(self, unprivileged: Unprivileged, work: Path, rows: dict[str, Path]) -> None:
        self.unprivileged = unprivileged
        self.work = work
        self.store = str(work / "store")
        self.paths = rows

    def reprobuild(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """``reprobuild ARGS`` in the work directory (recipes/ there), as the same uid."""
        return self.unprivileged.reprobuild(*args, cwd=self.work, timeout=timeout)


@pytest.fixture(scope="session")
def bootable_disk(unprivileged: Unprivileged) -> BootableDisk:
    """The shipped bootable disk recipe built into one store, shared by the UKI and boot
    tests (fetches its pinned Debian packages once)."""
    import json

    need_tool("apt-get")
    work = unprivileged.scratch("bootable")
    shutil.copytree(REPO / "recipes", work / "recipes")
    unprivileged.run(["chmod", "-R", "a+rwX", str(work)], check=False)
    built = unprivileged.reprobuild("build", "--json", "--no-out-link", "--store",
                                    str(work / "store"), "recipes/bootable-disk.toml",
                                    *BootableDisk.TARGETS, cwd=work, timeout=1800)
    need("could not fetch" not in built.stderr.lower(), "no network to fetch the packages")
    assert built.returncode == 0, built.stderr
    rows = {row["target"]: Path(row["path"]) for row in json.loads(built.stdout)}
    return BootableDisk(unprivileged, work, rows)
