"""The host conditions `reprobuild check` varies, and how a rebuild is run under them.

Each variation changes one thing about the host a build runs on: where it runs, its
environment, its umask, timezone and locale, the number of cores, the uid, the order in
which input files are created on disk. A reproducible build gives the same bytes under all
of them (the sandbox should hide most; the store's canonical form hides the rest).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reprobuild.errors import ReprobuildError

NOBODY = 65534


@dataclass(frozen=True)
class Variation:
    name: str
    description: str


VARIATIONS: tuple[Variation, ...] = (
    Variation("build-dir", "another build directory, store location and recipe location"),
    Variation("env", "extra and changed host environment variables"),
    Variation("umask", "another umask"),
    Variation("tz-locale", "another timezone and locale"),
    Variation("cores", "another number of cores (-j 1, one CPU)"),
    Variation("uid", "another host uid (65534; only when running as root)"),
    Variation("import-order", "input files created on disk in reverse order"),
)
VARIATION_NAMES: tuple[str, ...] = tuple(v.name for v in VARIATIONS)

# Values alternate between rounds so that two rounds also differ from each other.
_UMASKS = (0o077, 0o002)
_TIMEZONES = ("Pacific/Kiritimati", "America/St_Johns")
_LOCALES = ("fr_FR.UTF-8", "ja_JP.UTF-8")


def parse_variations(text: str | None) -> tuple[str, ...]:
    """``a,b,c`` (or ``all``/None) -> variation names in the canonical order."""
    if text is None or text == "all":
        return VARIATION_NAMES
    if text == "none":
        return ()
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in VARIATION_NAMES]
    if unknown:
        raise ReprobuildError(f"unknown variation {unknown[0]!r}",
                              hint="known: " + ", ".join(VARIATION_NAMES) + ", all, none")
    return tuple(v for v in VARIATION_NAMES if v in wanted)


def can_change_uid() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


@dataclass(frozen=True)
class HostConditions:
    """How one rebuild process is started."""

    env: tuple[tuple[str, str], ...]
    umask: int | None
    cwd: str
    wrapper: tuple[str, ...]  # argv prefix (setpriv, taskset)
    build_args: tuple[str, ...]  # extra `reprobuild build` arguments (-j 1)
    uid: int | None  # who must own the variant's store
    applied: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (variation, why)


def host_conditions(variations: Sequence[str], round_index: int, workdir: str,
                    base_env: Mapping[str, str]) -> HostConditions:
    """The conditions of round ``round_index`` (0-based) with ``variations`` applied."""
    pick = round_index % 2
    env = dict(base_env)
    wrapper: list[str] = []
    build_args: list[str] = []
    applied: list[str] = []
    skipped: list[tuple[str, str]] = []
    umask: int | None = None
    uid: int | None = None
    cwd = workdir
    for name in variations:
        if name == "build-dir":
            cwd = os.path.join(workdir, "cwd-elsewhere")
            os.makedirs(cwd, exist_ok=True)
        elif name == "env":
            env.update({
                "REPROBUILD_CHECK_NOISE": f"round-{round_index}",
                "CFLAGS": "-O0 -g3", "MAKEFLAGS": "-j7", "LD_BIND_NOW": "1",
                "USER": "another-user", "LOGNAME": "another-user",
                "HOSTNAME": "another-host.example", "SHELL": "/bin/false",
                "TMPDIR": os.path.join(workdir, "tmpdir"),
            })
            os.makedirs(env["TMPDIR"], exist_ok=True)
        elif name == "umask":
            umask = _UMASKS[pick]
        elif name == "tz-locale":
            env.update({"TZ": _TIMEZONES[pick], "LANG": _LOCALES[pick],
                        "LC_ALL": _LOCALES[pick], "LANGUAGE": _LOCALES[pick].split(".")[0]})
        elif name == "cores":
            build_args += ["-j", "1"]
            if shutil.which("taskset"):
                wrapper += ["taskset", "-c", "0"]
        elif name == "uid":
            if not can_change_uid():
                skipped.append((name, "needs root to switch to another uid"))
                continue
            uid = NOBODY
            home = os.path.join(workdir, "home")
            os.makedirs(home, exist_ok=True)
            env["HOME"] = home
            env["PYTHONDONTWRITEBYTECODE"] = "1"
            wrapper = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                       "--clear-groups", "--", *wrapper]
        elif name == "import-order":
            pass  # applied when inputs and the recipe are copied
        applied.append(name)
    return HostConditions(tuple(sorted(env.items())), umask, cwd, tuple(wrapper),
                          tuple(build_args), uid, tuple(applied), tuple(skipped))


# -- copying trees in a chosen creation order ---------------------------------------------
def listing_policy(directory: str) -> str:
    """How a filesystem lists a small directory: "newest-first", "oldest-first" (both
    follow creation order, as tmpfs does) or "hashed" (ext4: by a hash of the name)."""
    probe = tempfile.mkdtemp(prefix=".listing-probe-", dir=directory)
    try:
        for name in ("b", "a", "c", "e", "d"):
            Path(probe, name).touch()
        listed = os.listdir(probe)  # nondet-ok: the probe measures the listing order
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if listed == ["d", "e", "c", "a", "b"]:
        return "newest-first"
    if listed == ["b", "a", "c", "e", "d"]:
        return "oldest-first"
    return "hashed"


def _creation_order(src: str, *, invert: str | None) -> list[str]:
    """Names of ``src`` in the order to create them so the copy lists them in reverse
    of the source's listing (when ``invert`` says how the destination lists)."""
    listed = os.listdir(src)  # nondet-ok: this variation inverts the order
    if invert == "newest-first":
        return listed  # created in source order -> listed reversed
    if invert == "oldest-first":
        return listed[::-1]
    return sorted(listed)


def copy_tree(src: str, dest: str, *, invert: str | None = None,
              exclude: frozenset[str] = frozenset()) -> None:
    """Copy a file, symlink or directory keeping modes and mtimes.

    Entries are created in sorted order; with ``invert`` (the destination's
    :func:`listing_policy`, a creation-order one) they are created so that every copied
    directory lists its entries in the reverse of the source's order: a builder that
    depends on readdir order then sees another order. Paths in ``exclude`` (absolute
    source paths) are left out.
    """
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        Path(dest).symlink_to(os.readlink(src))
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return
    if stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dest, follow_symlinks=False)
        os.chmod(dest, stat.S_IMODE(st.st_mode))
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
        return
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{src}: not a file, directory or symlink")
    os.mkdir(dest, 0o700)
    for name in _creation_order(src, invert=invert):
        child = os.path.join(src, name)
        if child not in exclude:
            copy_tree(child, os.path.join(dest, name), invert=invert, exclude=exclude)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))


def import_order_dir(min_free: int = 0) -> str | None:
    """A directory for rebuilds whose listing order follows creation order (a tmpfs)
    with at least ``min_free`` bytes free, or None when there is none (then input
    order cannot be varied on this host)."""
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            try:
                fs = os.statvfs(candidate)
                if fs.f_bavail * fs.f_frsize < min_free:
                    continue
                if listing_policy(candidate) != "hashed":
                    return candidate
            except OSError:
                continue
    return None


def tree_bytes(path: str) -> int:
    """Bytes of file data under ``path`` (a file, link or directory), for space checks."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    names = os.listdir(path)  # nondet-ok: only summed
    return st.st_size + sum(tree_bytes(os.path.join(path, n)) for n in names)


def chown_tree(path: str, uid: int) -> None:
    """Give a directory tree we created to ``uid`` (the variant build's user)."""
    os.lchown(path, uid, uid)
    if os.path.isdir(path) and not os.path.islink(path):
        for name in sorted(os.listdir(path)):
            chown_tree(os.path.join(path, name), uid)
