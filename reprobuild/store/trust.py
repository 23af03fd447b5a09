"""Check an output's bytes before it is used, cheaply.

When an entry is registered (or fully rehashed) the store writes ``stats/ID.json``: for
every node of the output, in canonical walk order, its relative path, type, mode and for
regular files (inode, size, ctime_ns, mtime_ns) and their own blake3. A check walks the
output with ``lstat`` only; a file whose stat tuple is unchanged is trusted, a changed one
is rehashed alone and compared with its recorded blake3, and anything else that differs
(names, types, modes, link targets, times) fails the check. Without a usable stats file the
whole output is rehashed against the recorded content hash, and the stats file rewritten.

This is the same verdict as rehashing everything (the content hash is a function of the
names, types, execute bits, link targets and file contents that the stats fix), plus
the canonical form (no setuid bits, 0444/0555, the recorded mtime) that the content hash
does not cover.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import Any

import blake3

from reprobuild.errors import BuildError
from reprobuild.store import canon
from reprobuild.store.layout import Layout, write_atomic

STATS_VERSION = 1
# Labels the host puts on every file and that an unprivileged user cannot remove.
HOST_XATTRS = frozenset({"security.selinux"})
_CANONICAL_MODES = {"file": (0o444, 0o555), "directory": (0o555,), "symlink": None}


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _file_blake3(path: bytes) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(canon.CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _walk(top: bytes) -> list[tuple[bytes, os.stat_result]]:
    """Every node under ``top`` (itself first) in the canonical order, without recursion."""
    found: list[tuple[bytes, os.stat_result]] = []
    stack = [b""]
    while stack:
        rel = stack.pop()
        path = top + rel if rel else top
        st = os.lstat(path)
        found.append((rel, st))
        if stat.S_ISDIR(st.st_mode):
            stack.extend(rel + b"/" + name for name in sorted(os.listdir(path), reverse=True))
    return found


def snapshot(path: str, previous: list[Any] | None = None) -> list[list[Any]]:
    """The stats rows of the output at ``path``, hashing every regular file except
    those whose (inode, size, ctime) equal their row in ``previous``."""
    top = os.fsencode(path)
    known = {}
    for old in previous or ():
        if old[1] == "file":
            known[(old[0], *old[4:7])] = old[7]
    rows: list[list[Any]] = []
    for rel, st in _walk(top):
        kind = _kind(st.st_mode)
        name = os.fsdecode(rel)
        row: list[Any] = [name, kind, stat.S_IMODE(st.st_mode), st.st_mtime_ns]
        if kind == "file":
            digest = known.get((name, st.st_ino, st.st_size, st.st_ctime_ns))
            row += [st.st_ino, st.st_size, st.st_ctime_ns, digest or _file_blake3(top + rel)]
        elif kind == "symlink":
            row.append(os.fsdecode(os.readlink(top + rel)))
        rows.append(row)
    return rows


def write_stats(layout: Layout, derivation_id: str, content_hash: str,
                previous: list[Any] | None = None) -> None:
    """Record the stats of the entry's output, which hashes to ``content_hash``
    (reusing the digests of files unchanged since ``previous`` rows)."""
    rows = snapshot(layout.output_path(derivation_id), previous)
    data = {"version": STATS_VERSION, "hash": content_hash, "nodes": rows}
    write_atomic(layout.stats_path(derivation_id), json.dumps(data).encode(), sync=False)


def _load_stats(layout: Layout, derivation_id: str, content_hash: str) -> list[Any] | None:
    try:
        with open(layout.stats_path(derivation_id), "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or data.get("version") != STATS_VERSION
            or data.get("hash") != content_hash or not isinstance(data.get("nodes"), list)):
        return None
    nodes: list[Any] = data["nodes"]
    return nodes


def xattr_names(path: bytes, st: os.stat_result) -> list[str]:
    """The extended attributes of a node that canonical outputs do not have, sorted."""
    if stat.S_ISLNK(st.st_mode):
        return []
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    return sorted(n for n in names if n not in HOST_XATTRS)


def canonical_form_problem(rel: str, st: os.stat_result, mtime_ns: int | None) -> str | None:
    """What is not canonical about one node (modes, setuid bits, mtime), or None."""
    where = rel or "the output"
    kind = _kind(st.st_mode)
    allowed = _CANONICAL_MODES.get(kind, ())
    if allowed is not None and stat.S_IMODE(st.st_mode) not in allowed:
        return f"{where}: mode {stat.S_IMODE(st.st_mode):04o} is not canonical"
    if mtime_ns is not None and st.st_mtime_ns != mtime_ns:
        return f"{where}: mtime changed ({st.st_mtime_ns} ns, recorded {mtime_ns} ns)"
    return None


def _compare(top: bytes, rows: list[Any]) -> tuple[str | None, bool]:
    """Why the output no longer matches its stats rows (None when it does), and whether
    a file had to be rehashed (then the stats are worth refreshing)."""
    found = _walk(top)
    if len(found) != len(rows):
        return f"{len(found)} entries where {len(rows)} were recorded", False
    rehashed = False
    for (rel, st), row in zip(found, rows, strict=True):
        name, kind, mode, mtime_ns = row[0], row[1], row[2], row[3]
        shown = os.fsdecode(rel).lstrip("/") or "the output"
        if os.fsdecode(rel) != name or _kind(st.st_mode) != kind:
            return f"{shown}: not the recorded {kind} {name.lstrip('/') or 'top'}", False
        if stat.S_IMODE(st.st_mode) != mode:
            return f"{shown}: mode {stat.S_IMODE(st.st_mode):04o}, recorded {mode:04o}", False
        if st.st_mtime_ns != mtime_ns:
            return f"{shown}: mtime changed", False
        if kind == "symlink" and os.fsdecode(os.readlink(top + rel)) != row[4]:
            return f"{shown}: symlink target changed", False
        if kind == "file" and (st.st_ino, st.st_size, st.st_ctime_ns) != tuple(row[4:7]):
            if st.st_size != row[5] or _file_blake3(top + rel) != row[7]:
                return f"{shown}: content changed", False
            if xattr_names(top + rel, st):  # setting one changed the ctime
                return f"{shown}: has extended attributes", False
            row[4:7] = [st.st_ino, st.st_size, st.st_ctime_ns]  # same bytes: new stat
            rehashed = True
    return None, rehashed


def check_output(layout: Layout, derivation_id: str, content_hash: str,
                 epoch: int | None = None) -> str | None:
    """None when the output's bytes (and canonical form) are as recorded, else why not.

    The stats are only a cache: when they disagree (or are missing or malformed) the
    output is rehashed and its canonical form checked (every mtime ``epoch`` when it is
    known) before it is called damaged; an output that passes gets fresh stats.
    """
    top = os.fsencode(layout.output_path(derivation_id))
    rows = _load_stats(layout, derivation_id, content_hash)
    suspicion = None
    try:
        if rows is not None:
            with contextlib.suppress(IndexError, TypeError, ValueError):
                suspicion, rehashed = _compare(top, rows)
                if suspicion is None:
                    if rehashed:  # same bytes, new inode or ctime: remember them
                        with contextlib.suppress(OSError):
                            write_stats(layout, derivation_id, content_hash, rows)
                    return None
        actual = canon.hash_path(top)
        if actual != content_hash:
            return suspicion or f"content hash is now {actual}"
        epoch_ns = None if epoch is None else epoch * 10**9
        for rel, st in _walk(top):
            problem = canonical_form_problem(os.fsdecode(rel).lstrip("/"), st, epoch_ns)
            if problem or xattr_names(top + rel, st):
                return problem or f"{os.fsdecode(rel).lstrip('/')}: has extended attributes"
    except FileNotFoundError:
        return "the output is missing"
    except (OSError, BuildError) as exc:
        return f"cannot be read: {exc}"
    with contextlib.suppress(OSError):
        write_stats(layout, derivation_id, content_hash)
    return None
