"""The content-addressed store: one object over the store's modules.

:mod:`~reprobuild.store.layout` says where things live, :mod:`~reprobuild.store.locks`
how processes share the store, :mod:`~reprobuild.store.register` how an output becomes
valid, :mod:`~reprobuild.store.trust` how its bytes are checked before use,
:mod:`~reprobuild.store.verify` how damage is found and :mod:`~reprobuild.store.gc` what
roots keep. The store never imports :mod:`reprobuild.proof`: the engine hands it the
function that writes an entry's build record.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from reprobuild.errors import StoreError
from reprobuild.store import canon, gc, locks, register, trust, verify
from reprobuild.store.gc import GcResult
from reprobuild.store.layout import SUBDIRS, Layout, write_atomic
from reprobuild.store.register import RecordWriter, StoreEntry
from reprobuild.store.verify import RecordCheck, VerifyProblem

__all__ = ["GcResult", "RecordCheck", "RecordWriter", "Store", "StoreEntry",
           "VerifyProblem", "canon"]


class Store:
    """A store directory. Safe for several processes and threads at once."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.layout = Layout(self.root)
        try:
            for sub in SUBDIRS:
                os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store at {self.root}: {exc.strerror}",
                             hint="pass --store DIR with a writable directory") from None
        self.temp_roots = locks.TempRoots(self.layout)
        self._build_dirs: dict[str, locks.BuildDir] = {}
        self._build_dirs_lock = threading.Lock()

    # -- paths ----------------------------------------------------------------------
    def output_path(self, derivation_id: str) -> str:
        return self.layout.output_path(derivation_id)

    def meta_path(self, derivation_id: str) -> str:
        return self.layout.meta_path(derivation_id)

    def log_path(self, derivation_id: str) -> str:
        return self.layout.log_path(derivation_id)

    def record_path(self, derivation_id: str) -> str:
        return self.layout.record_path(derivation_id)

    # -- lookups --------------------------------------------------------------------
    def lookup(self, derivation_id: str) -> StoreEntry | None:
        """The entry for ``derivation_id`` as recorded, or None when it is not (completely)
        built. Its bytes are not checked: use :meth:`trusted` before using them."""
        meta = self.metadata(derivation_id)
        if meta is None or not os.path.lexists(self.output_path(derivation_id)):
            return None
        return register.entry_from_metadata(self.layout, derivation_id, meta)

    def metadata(self, derivation_id: str) -> dict[str, Any] | None:
        """The JSON metadata of a complete entry, or None (absent, torn or damaged
        metadata all mean "not built": the entry is rebuilt)."""
        meta, _why = verify.read_metadata(self.layout, derivation_id)
        return meta

    def trusted(self, derivation_id: str, *, warn: Callable[[str], None],
                locked: bool = False) -> StoreEntry | None:
        """The entry, once its bytes are checked against its recorded hash (fast path:
        only files whose inode, size, ctime or mtime changed are rehashed). A damaged
        entry is reported through ``warn``, removed and None returned, so it is rebuilt.
        ``locked``: the caller holds the entry's lock."""
        entry = self.lookup(derivation_id)
        if entry is None or self._check(entry) is None:
            return entry
        with contextlib.nullcontext() if locked else self.lock(derivation_id):
            # Again under the lock: another process may have replaced it meanwhile.
            entry = self.lookup(derivation_id)
            why = entry and self._check(entry)
            if entry is None or why is None:
                return entry
            gc.remove_entry(self.layout, derivation_id)
        warn(f"{entry.path}: content no longer matches its recorded hash ({why}), "
             f"rebuilding")
        return None

    def damage(self, derivation_id: str) -> str | None:
        """Why the entry's bytes no longer match its recorded hash, or None (checked
        as :meth:`trusted` does, without removing anything)."""
        entry = self.lookup(derivation_id)
        if entry is None:
            return "not in the store"
        return self._check(entry)

    def _check(self, entry: StoreEntry) -> str | None:
        meta = self.metadata(entry.derivation_id) or {}
        epoch = meta.get("epoch")
        return trust.check_output(self.layout, entry.derivation_id, entry.hash,
                                  epoch if isinstance(epoch, int) else None)

    def paths(self) -> list[StoreEntry]:
        """Every complete entry, sorted by derivation id."""
        entries = []
        for name in sorted(os.listdir(os.path.join(self.root, "meta"))):
            if name.endswith(".json") and not name.startswith("."):
                entry = self.lookup(name[:-5])
                if entry is not None:
                    entries.append(entry)
        return entries

    # -- locking --------------------------------------------------------------------
    def lock(self, derivation_id: str) -> contextlib.AbstractContextManager[None]:
        """Hold the build lock of ``derivation_id`` (blocks while another process has it)."""
        return locks.entry_lock(self.layout, derivation_id)

    def session(self, *, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
        """Builders hold this shared; gc holds it exclusively so it never races a build."""
        return locks.session(self.layout, exclusive=exclusive)

    def hold(self, derivation_ids: Sequence[str]) -> None:
        """Keep these entries (and their inputs) from gc until :meth:`release`, or until
        this process ends. Call with the session held."""
        self.temp_roots.add(derivation_ids)

    def release(self) -> None:
        self.temp_roots.release()

    # -- build directories ------------------------------------------------------------
    def new_build_dir(self, label: str) -> str:
        """A fresh private directory under ``tmp/`` on the store's filesystem, locked by
        this process until :meth:`drop_build_dir` (or the process ends)."""
        build_dir = locks.BuildDir(self.layout, label)
        with self._build_dirs_lock:
            self._build_dirs[build_dir.path] = build_dir
        return build_dir.path

    def drop_build_dir(self, path: str, *, remove: bool = True) -> None:
        """Remove a directory of :meth:`new_build_dir` (``remove=False``: it was moved)."""
        with self._build_dirs_lock:
            build_dir = self._build_dirs.pop(path, None)
        if build_dir is None:
            if remove:
                canon.remove_tree(path)
            return
        build_dir.close(remove=remove)

    def clean_tmp(self) -> list[str]:
        """Remove the build directories no live process holds (left by killed builds)."""
        return locks.clean_tmp(self.layout)

    # -- registering ----------------------------------------------------------------
    def register(self, derivation_id: str, output: str, *, derivation: Mapping[str, Any],
                 inputs: Mapping[str, Mapping[str, str]], epoch: int,
                 expected_hash: str | None = None, fsverity_file: str | None = None,
                 record: RecordWriter | None = None,
                 extra: Mapping[str, Any] | None = None) -> StoreEntry:
        """Canonicalise ``output``, hash it and make it the valid entry of the derivation.

        Call with :meth:`lock` held. ``output`` must be on the store's filesystem (under
        :meth:`new_build_dir`); it is moved. ``inputs`` maps input names to
        ``{"derivation": id, "hash": content hash}``. The metadata records the derivation,
        the inputs, the output's content hash and type, the fs-verity digest of a file
        output, reprobuild's version and the log path. With ``expected_hash`` (a
        fixed-output import) a different content hash is an error and nothing is stored.
        ``fsverity_file`` names the file of a directory output whose fs-verity digest is
        recorded instead (and as ``fsverity_file``); the build failed if it is missing.
        ``record`` makes the entry's build record, written before the metadata.
        ``extra`` adds JSON-able keys to the metadata (a substitute's cache and signer).
        """
        return register.register(self.layout, derivation_id, output, derivation=derivation,
                                 inputs=inputs, epoch=epoch, expected_hash=expected_hash,
                                 fsverity_file=fsverity_file, record=record, extra=extra)

    def mark_unreproducible(self, derivation_id: str, report: Mapping[str, Any]) -> None:
        """Record in the entry's metadata that a rebuild differed; ``report`` is JSON-able."""
        with self.lock(derivation_id):
            meta = self.metadata(derivation_id)
            if meta is None:
                raise StoreError(f"derivation {derivation_id} is not in the store")
            meta["unreproducible"] = dict(report)
            write_atomic(self.meta_path(derivation_id),
                         json.dumps(meta, indent=1, sort_keys=True).encode())

    # -- verify, delete -------------------------------------------------------------
    def verify(self, *, record_check: RecordCheck | None = None) -> list[VerifyProblem]:
        """Every damaged entry, each problem named (never raises on damage)."""
        return verify.verify(self.layout, record_check=record_check)

    def repair(self, problems: Sequence[VerifyProblem], *,
               record: RecordWriter | None = None) -> list[str]:
        """Fix what :meth:`verify` found: rewrite a wrong record, remove (with what
        depends on it) an entry whose output or metadata is damaged. Returns the ids
        removed; the next build makes them again."""
        doomed = sorted({p.derivation_id for p in problems if p.repair == "remove"
                         or record is None})
        with self.session(exclusive=True):
            for problem in problems:
                meta = self.metadata(problem.derivation_id)
                if problem.derivation_id not in doomed and meta is not None and record:
                    path = self.output_path(problem.derivation_id)
                    write_atomic(self.record_path(problem.derivation_id), record(meta, path))
            removed = sorted(gc.dependents(self.layout, doomed))
            for did in removed:
                gc.remove_entry(self.layout, did)
        return removed

    def delete(self, derivation_ids: Sequence[str], *, force: bool = False,
               dry_run: bool = False) -> list[str]:
        """Delete entries and what depends on them (see :func:`reprobuild.store.gc.delete`)."""
        return gc.delete(self.layout, derivation_ids, force=force, dry_run=dry_run)

    # -- roots and gc ---------------------------------------------------------------
    def add_root(self, link: str) -> None:
        gc.add_root(self.layout, link)

    def make_result_link(self, link: str, derivation_id: str) -> None:
        """Point ``link`` at the output atomically and register it as a root."""
        gc.make_result_link(self.layout, link, derivation_id)

    def roots(self) -> dict[str, str]:
        return gc.roots(self.layout)

    def closure(self, derivation_ids: list[str]) -> set[str]:
        return gc.closure(self.layout, derivation_ids)

    def known(self, derivation_id: str) -> bool:
        """Whether anything of ``derivation_id`` is in the store."""
        return bool(gc.entry_paths(self.layout, derivation_id))

    def gc(self, *, keep: Sequence[str] = (), dry_run: bool = False) -> GcResult:
        """Delete every output no root reaches (roots: result links, the temporary roots
        of live builds and ``keep`` ids).

        A root keeps its inputs too (transitively), so ``check --deep`` and rebuilds after
        a change need not refetch or rebuild them. Logs and locks of deleted outputs,
        incomplete outputs and abandoned build directories go as well.
        """
        return gc.gc(self.layout, keep=keep, dry_run=dry_run)
