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
