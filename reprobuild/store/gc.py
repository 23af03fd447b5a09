"""Roots (result links, temporary roots of live builders) and what no root reaches: gc
and ``store delete``."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import blake3

from reprobuild.errors import StoreError
from reprobuild.store import canon, locks
from reprobuild.store.layout import Layout, unlink_quietly
from reprobuild.store.verify import all_ids, read_metadata


@dataclass(frozen=True)
class GcResult:
    kept: tuple[str, ...]
    deleted: tuple[str, ...]
    freed_bytes: int
    # Every path gc deletes (or, with dry_run, would delete), sorted.
    paths: tuple[str, ...] = ()


def tree_size(path: str) -> int:
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            continue
        total += st.st_size
        if stat.S_ISDIR(st.st_mode):
            stack.extend(os.path.join(current, n) for n in os.listdir(current))  # nondet-ok
    return total


def add_root(layout: Layout, link: str) -> None:
    """Register ``link`` (a result symlink into the store) as a gc root."""
    link = os.path.abspath(link)
    name = blake3.blake3(os.fsencode(link)).hexdigest()[:32]
    root = os.path.join(layout.root, "roots", name)
    tmp = root + ".tmp"
    unlink_quietly(tmp)
    os.symlink(link, tmp)  # noqa: PTH211
    os.rename(tmp, root)


def make_result_link(layout: Layout, link: str, derivation_id: str) -> None:
    """Point ``link`` at the output atomically and register it as a root."""
    tmp = f"{link}.tmp-{os.getpid()}"
    try:
        unlink_quietly(tmp)
        os.symlink(layout.output_path(derivation_id), tmp)  # noqa: PTH211
        os.rename(tmp, link)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreError(f"cannot create the result link {link}: {exc.strerror}",
                         hint="run the build in a writable directory, or pass "
                              "--out-link PATH or --no-out-link") from None
    add_root(layout, link)


def roots(layout: Layout) -> dict[str, str]:
    """Result link path -> derivation id, for every root that still points here."""
    live: dict[str, str] = {}
    roots_dir = layout.subdir("roots")
    out_dir = layout.subdir("out") + os.sep
    for name in sorted(os.listdir(roots_dir)):
        root = os.path.join(roots_dir, name)
        try:
            link = os.readlink(root)
            target = os.readlink(link)
        except OSError:
            unlink_quietly(root)  # the result link is gone: no longer a root
            continue
        if target.startswith(out_dir):
            live[link] = target[len(out_dir):].split(os.sep, 1)[0]
    return live


def closure(layout: Layout, derivation_ids: Iterable[str]) -> set[str]:
    """The ids and, transitively, the inputs recorded in their metadata."""
    seen: set[str] = set()
    stack = list(derivation_ids)
    while stack:
        did = stack.pop()
        if did in seen:
            continue
        seen.add(did)
        meta, _why = read_metadata(layout, did)
        for value in (meta or {}).get("inputs", {}).values():
            if isinstance(value, dict) and isinstance(value.get("derivation"), str):
                stack.append(value["derivation"])
    return seen


def dependents(layout: Layout, derivation_ids: Iterable[str]) -> set[str]:
    """The ids and every entry that has one of them in its closure."""
    users: dict[str, set[str]] = {}
    for did in all_ids(layout):
        meta, _why = read_metadata(layout, did)
        for value in (meta or {}).get("inputs", {}).values():
            if isinstance(value, dict) and isinstance(value.get("derivation"), str):
                users.setdefault(value["derivation"], set()).add(did)
    found: set[str] = set()
    stack = list(derivation_ids)
    while stack:
        did = stack.pop()
        if did not in found:
            found.add(did)
            stack.extend(users.get(did, ()))
    return found


def entry_paths(layout: Layout, did: str) -> list[str]:
    return [p for p in (layout.meta_path(did), layout.output_path(did),
                        layout.record_path(did), layout.stats_path(did), layout.log_path(did),
                        os.path.join(layout.root, "locks", did + ".lock"))
            if os.path.lexists(p)]


def remove_entry(layout: Layout, did: str) -> None:
    """Delete an entry, metadata first so that it is never valid while half gone."""
    unlink_quietly(layout.meta_path(did))
    canon.remove_tree(layout.output_path(did))
    unlink_quietly(layout.record_path(did), layout.stats_path(did), layout.log_path(did),
                   os.path.join(layout.root, "locks", did + ".lock"))


def gc(layout: Layout, *, keep: Sequence[str] = (), dry_run: bool = False) -> GcResult:
    """See :meth:`reprobuild.store.store.Store.gc`."""
    with locks.session(layout, exclusive=True):
        live = closure(layout, [*roots(layout).values(), *locks.live_temp_roots(layout),
                                *keep])
        deleted: list[str] = []
        kept: list[str] = []
        paths: list[str] = []
        freed = 0
        ids = set(all_ids(layout))
        ids |= {n[:-4] for n in os.listdir(layout.subdir("logs"))  # nondet-ok: sorted
                if n.endswith(".log")}
        for did in sorted(ids):
            if did in live and read_metadata(layout, did)[0] is not None \
                    and os.path.lexists(layout.output_path(did)):
                kept.append(did)
                continue
            deleted.append(did)
            paths.extend(entry_paths(layout, did))
            freed += tree_size(layout.output_path(did))
            if not dry_run:
                remove_entry(layout, did)
        tmp = layout.subdir("tmp")
        for name in sorted(os.listdir(tmp)):
            if not name.startswith("failed-"):
                paths.append(os.path.join(tmp, name))
                freed += tree_size(os.path.join(tmp, name))
                if not dry_run:
                    canon.remove_tree(os.path.join(tmp, name))
        return GcResult(tuple(kept), tuple(deleted), freed, tuple(sorted(paths)))


def delete(layout: Layout, derivation_ids: Sequence[str], *, force: bool = False,
           dry_run: bool = False) -> list[str]:
    """Delete entries and every entry that depends on them; refuse (unless ``force``)
    when a result link or a live builder still holds one. Returns the deleted ids."""
    unknown = [d for d in derivation_ids if not entry_paths(layout, d)]
    if unknown:
        raise StoreError(f"not in the store {layout.root}: {', '.join(unknown)}",
                         hint="`reprobuild store ls` lists the derivation ids")
    with locks.session(layout, exclusive=True):
        doomed = sorted(dependents(layout, derivation_ids))
        if not force:
            held = {did: link for link, did in roots(layout).items()}
            held.update({did: "a running build" for did in locks.live_temp_roots(layout)})
            live = closure(layout, held)
            blocked = [d for d in doomed if d in live]
            if blocked:
                rooted = sorted(f"{d} (held by {held[d]})" if d in held else d
                                for d in blocked)
                raise StoreError("refusing to delete outputs a gc root still needs: "
                                 + ", ".join(rooted),
                                 hint="remove the result link first, or pass --force")
        if not dry_run:
            for did in doomed:
                remove_entry(layout, did)
        return doomed
