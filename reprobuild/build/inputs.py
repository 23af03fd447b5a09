"""Sources imported from the host by content: ``path =`` files and ``host =`` programs.

A path source is hashed in place with the store's canonical serialisation, so its id is
known before anything is copied and a pinned ``blake3`` can be checked. A host program is
imported with its ELF closure (the program interpreter named by PT_INTERP and every
shared library the loader would map for it, read from the ELF files by
:mod:`reprobuild.build.elf`: nothing named by a recipe is executed on the host):
the closure is a directory holding each file at its original absolute path, and inside
the sandbox each file is mounted read-only at that same path, so the program runs as it
does on the host.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass

import blake3

from reprobuild.build.elf import check_host_path, elf_closure
from reprobuild.errors import RecipeError
from reprobuild.store import canon


@dataclass(frozen=True)
class HostClosure:
    """A host program and the files it needs: sandbox path -> host path."""

    program: str
    files: Mapping[str, str]
    hash: str


def _file_node(hasher: blake3.blake3, host: str) -> None:
    st = os.stat(host)
    hasher.update(b"F" + (b"x" if st.st_mode & 0o111 else b"-") + canon.U64.pack(st.st_size))
    with open(host, "rb") as f:
        while chunk := f.read(canon.CHUNK):
            hasher.update(chunk)


def hash_file_map(files: Mapping[str, str]) -> str:
    """The canonical tree hash of a directory holding each host file at its relative path.

    Equal to :func:`reprobuild.store.canon.hash_path` of the directory :func:`materialise` makes.
    """
    tree: dict[bytes, object] = {}
    for rel, host in files.items():
        node = tree
        parts = os.fsencode(rel).strip(b"/").split(b"/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})  # type: ignore[assignment]
        node[parts[-1]] = host
    hasher = blake3.blake3(canon.HEADER)

    def walk(node: Mapping[bytes, object]) -> None:
        names = sorted(node)
        hasher.update(b"D" + canon.U64.pack(len(names)))
        for name in names:
            hasher.update(canon.U64.pack(len(name)) + name)
            child = node[name]
            if isinstance(child, dict):
                walk(child)
            else:
                _file_node(hasher, str(child))

    walk(tree)
    return hasher.hexdigest()


_closure_cache: dict[tuple[str, int, int, int], HostClosure] = {}


def host_closure(program: str) -> HostClosure:
    """Find and hash the closure of a host program (cached per process by inode and mtime)."""
    st = check_host_path(program, program)
    key = (program, st.st_dev, st.st_ino, st.st_mtime_ns)
    cached = _closure_cache.get(key)
    if cached is not None:
        return cached
    files = {path.lstrip("/"): path for path in elf_closure(program)}
    privileged = reads_through_privilege()
    for path in sorted(files.values(), key=os.fsencode):
        file_st = os.stat(path)
        if _private(file_st, privileged=privileged):
            raise RecipeError(
                f"host program {program}: {path} (mode {stat.S_IMODE(file_st.st_mode):04o}, "
                f"owner uid {file_st.st_uid}) is not readable by others: this user reads it "
                "only through privilege, and the store would make it readable to everyone",
                hint="import only programs and libraries every user may read")
    closure = HostClosure(program, files, hash_file_map(files))
    _closure_cache[key] = closure
    return closure


def materialise(files: Mapping[str, str], dest: str) -> None:
    """Copy each host file (dereferenced) to ``dest/REL``."""
    os.makedirs(dest, exist_ok=True)
    for rel, host in sorted(files.items()):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(host, target)
        os.chmod(target, 0o555 if os.stat(host).st_mode & 0o111 else 0o444)


CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2


def reads_through_privilege() -> bool:
    """Whether this process reads files regardless of their modes (root, or a DAC cap)."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps & (1 << CAP_DAC_OVERRIDE | 1 << CAP_DAC_READ_SEARCH))
    except (OSError, ValueError, IndexError):
        pass
    return False


def _private(st: os.stat_result, *, privileged: bool) -> bool:
    """Readable by this user only through privilege: not readable by others, and either
    we read through privilege or the file is not ours (a group or a capability lets us)."""
    wanted = 0o005 if stat.S_ISDIR(st.st_mode) else 0o004
    if st.st_mode & wanted == wanted:
        return False
    return privileged or st.st_uid != os.getuid()


def first_private_path(root: str) -> tuple[str, os.stat_result] | None:
    """The first file or directory under ``root`` (bytewise order, root first) that the
    user can read only through privilege; symlinks are not followed (they are imported
    as links)."""
    privileged = reads_through_privilege()
    top = os.fsencode(root)
    stack = [top]
    while stack:
        path = stack.pop()
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            continue
        if _private(st, privileged=privileged):
            return os.fsdecode(path), st
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path), reverse=True)
            stack.extend(path + b"/" + name for name in names)
    return None


def check_path_source(path: str, table: str, key: str = "path", *, base: str,
                      allow_outside: bool, allow_private: bool) -> None:
    """Refuse a path source that resolves (through any symlink) outside ``base``, the
    recipe's directory, unless ``allow_outside``; and one holding a file or directory
    readable only through privilege (see :func:`first_private_path`) unless
    ``allow_private``: either would copy host files the recipe's author chose into the
    store, where every user can read them. ``table`` and ``key`` name the recipe's
    source table and its path key in messages."""
    what = f"{table} {key}"
    real = os.path.realpath(path)
    if not os.path.lexists(real):
        raise RecipeError(f"{what}: {path} does not exist")
    top = os.path.realpath(base) if base else real
    if not allow_outside and os.path.commonpath([top, real]) != top:
        shown = path if real == path else f"{path} (resolved: {real})"
        raise RecipeError(f"{what}: {shown} lies outside the recipe's directory {top}",
                          hint=f"set allow-outside = true in {table} to import it anyway")
    if allow_private:
        return
    try:
        found = first_private_path(real)
    except OSError as exc:
        raise RecipeError(f"{what}: cannot read {exc.filename!r}: {exc.strerror}") from None
    if found is not None:
        offender, st = found
        raise RecipeError(
            f"{what}: {offender} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid "
            f"{st.st_uid}) is not readable by others: this user reads it only through "
            "privilege, and the store would make it readable to everyone",
            hint=f"make it readable (chmod o+r), or set allow-private = true in {table} if "
                 "its content may be public")


def path_hash(path: str) -> str:
    """The canonical hash of a path source (a file or directory; a top symlink is followed)."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise RecipeError(f"path source {path} does not exist")
    return canon.hash_path(real)


def copy_path(path: str, dest: str) -> None:
    """Copy a path source to ``dest`` keeping symlinks inside it as symlinks."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        shutil.copytree(real, dest, symlinks=True)
    else:
        shutil.copyfile(real, dest)
        os.chmod(dest, 0o555 if os.stat(real).st_mode & 0o111 else 0o444)
