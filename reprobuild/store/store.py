"""The content-addressed store: where outputs live, how they become valid, and gc.

Layout under the store root (default ``$XDG_CACHE_HOME/reprobuild``)::

    out/ID           the output of derivation ID (a file, symlink or directory)
    meta/ID.json     its metadata; an output counts as valid only when this exists
    logs/ID.log      the build log (kept after a failure), also the per-derivation
                     lock (flock) so concurrent builders build once
    tmp/             build directories, renamed into out/ when complete
    roots/           symlinks to result links (gc roots)
    gc.lock          shared by builders, exclusive for gc

Registration is atomic: the output is canonicalised and hashed in ``tmp/``, its file
data fsynced, renamed to ``out/ID``, then the metadata is written to a temporary file and
renamed over ``meta/ID.json``. A process killed at any moment leaves either no metadata
(the output, if any, is garbage and is replaced by the next build) or a complete, valid
entry. After a power loss, journaling filesystems keep renames in order, and metadata
that does not parse counts as absent, so an entry is valid only with its synced output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reprobuild import __version__
from reprobuild.errors import BuildError, StoreError
from reprobuild.store import canon

_SUBDIRS = ("out", "meta", "logs", "tmp", "roots", "records")


@dataclass(frozen=True)
class StoreEntry:
    """A valid output: where it is and what it hashes to."""

    derivation_id: str
    path: str
    hash: str  # blake3 over the canonical serialisation (see reprobuild.store.canon)
    # fs-verity sha256 digest (4 KiB blocks, no salt) of a file output, or of a directory
    # output's main file (a disk image's disk.img, see Store.register's fsverity_file)
    fsverity: str | None
    type: str  # "file", "directory" or "symlink"
    # Set by `reprobuild check` when a rebuild differed: what differed, under what.
    unreproducible: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class VerifyProblem:
    derivation_id: str
    name: str
    path: str
    message: str


@dataclass(frozen=True)
class GcResult:
    kept: tuple[str, ...]
    deleted: tuple[str, ...]
    freed_bytes: int


def _write_atomic(path: str, data: bytes, *, sync: bool = True) -> None:
    """Replace ``path`` by a rename; ``sync`` fsyncs the data first."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _tree_size(path: str) -> int:
    total = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    total += st.st_size
    if stat.S_ISDIR(st.st_mode):
        for name in os.listdir(path):  # nondet-ok: a sum
            total += _tree_size(os.path.join(path, name))
    return total


class Store:
    """A store directory. Safe for several processes and threads at once."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        try:
            for sub in _SUBDIRS:
                os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store at {self.root}: {exc.strerror}",
                             hint="pass --store DIR with a writable directory") from None

    # -- paths ----------------------------------------------------------------------
    def output_path(self, derivation_id: str) -> str:
        return os.path.join(self.root, "out", derivation_id)

    def meta_path(self, derivation_id: str) -> str:
        return os.path.join(self.root, "meta", derivation_id + ".json")

    def log_path(self, derivation_id: str) -> str:
        return os.path.join(self.root, "logs", derivation_id + ".log")

    def record_path(self, derivation_id: str) -> str:
        """The build record (in-toto statement, see reprobuild.proof.records) of an entry."""
        return os.path.join(self.root, "records", derivation_id + ".json")

    # -- lookups --------------------------------------------------------------------
    def lookup(self, derivation_id: str) -> StoreEntry | None:
        """The valid entry for ``derivation_id``, or None when it is not (completely) built."""
        meta = self.metadata(derivation_id)
        if meta is None:
            return None
        path = self.output_path(derivation_id)
        if not os.path.lexists(path):
            return None
        return StoreEntry(derivation_id, path, meta["hash"], meta.get("fsverity"),
                          meta.get("type", "directory"), meta.get("unreproducible"))

    def metadata(self, derivation_id: str) -> dict[str, Any] | None:
        """The JSON metadata of a valid entry (see :meth:`register`), or None."""
        try:
            with open(self.meta_path(derivation_id), "rb") as f:
                meta: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # torn by a power loss: the entry is not valid and will be rebuilt
        except OSError as exc:
            raise StoreError(f"store metadata {self.meta_path(derivation_id)} is unreadable: "
                             f"{exc.strerror}", hint="check the store's permissions") from None
        return meta

    def paths(self) -> list[StoreEntry]:
        """Every valid entry, sorted by derivation id."""
        entries = []
        for name in sorted(os.listdir(os.path.join(self.root, "meta"))):
            if name.endswith(".json") and not name.startswith("."):
                entry = self.lookup(name[:-5])
                if entry is not None:
                    entries.append(entry)
        return entries

    # -- locking --------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, derivation_id: str) -> Iterator[None]:
        """Hold the build lock of ``derivation_id`` (blocks while another process has it).

        The lock is taken on the entry's log file, which a build makes anyway: one file
        fewer to create per step (file creation is most of a trivial step's cost on a
        busy ext4 without a journal). Opening it neither truncates nor writes it.
        """
        fd = os.open(self.log_path(derivation_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def session(self, *, exclusive: bool = False) -> Iterator[None]:
        """Builders hold this shared; gc holds it exclusively so it never races a build."""
        fd = os.open(os.path.join(self.root, "gc.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # -- building and registering ---------------------------------------------------
    def new_build_dir(self, label: str) -> str:
        """A fresh private directory under ``tmp/`` on the store's filesystem."""
        return tempfile.mkdtemp(prefix=f"{label}.", dir=os.path.join(self.root, "tmp"))

    def register(self, derivation_id: str, output: str, *, derivation: Mapping[str, Any],
                 inputs: Mapping[str, Mapping[str, str]], epoch: int,
                 extra: Mapping[str, Any] | None = None,
                 expected_hash: str | None = None,
                 fsverity_file: str | None = None) -> StoreEntry:
        """Canonicalise ``output``, hash it and make it the valid entry of the derivation.

        Call with :meth:`lock` held. ``output`` must be on the store's filesystem (under
        :meth:`new_build_dir`); it is moved. ``inputs`` maps input names to
        ``{"derivation": id, "hash": content hash}``. The metadata records the derivation,
        the inputs, the output's content hash and type, the fs-verity digest of a file
        output, reprobuild's version and the log path. With ``expected_hash`` (a
        fixed-output import) a different content hash is an error and nothing is stored.
        ``fsverity_file`` names the file of a directory output whose fs-verity digest is
        recorded instead (and as ``fsverity_file``); the build failed if it is missing.
        """
        if not os.path.lexists(output):
            raise StoreError(f"the build made no output at {output}")
        canon.canonicalize(output, epoch=epoch, top_mode=False)
        content_hash = canon.hash_path(output)
        if expected_hash is not None and content_hash != expected_hash:
            raise StoreError(f"the output of {derivation_id} hashes to {content_hash}, "
                             f"expected {expected_hash}",
                             hint="a source changed while it was imported; build again")
        st = os.lstat(output)
        kind = ("directory" if stat.S_ISDIR(st.st_mode) else
                "symlink" if stat.S_ISLNK(st.st_mode) else "file")
        fsverity = None
        if kind == "file":
            fsverity = _fsverity_digest(output)
        elif kind == "directory" and fsverity_file is not None:
            fsverity = _main_file_digest(derivation_id, output, fsverity_file)
        canon.fsync_tree(output)
        final = self.output_path(derivation_id)
        if os.path.lexists(final):  # garbage of a killed build: never valid without metadata
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.meta_path(derivation_id))
            canon.remove_tree(final)
        os.rename(output, final)
        if kind == "directory":
            os.chmod(final, 0o555)
        meta: dict[str, Any] = {
            "derivation_id": derivation_id,
            "derivation": dict(derivation),
            "inputs": {k: dict(v) for k, v in sorted(inputs.items())},
            "hash": content_hash,
            "type": kind,
            "fsverity": fsverity,
            **({"fsverity_file": fsverity_file} if kind == "directory" and fsverity else {}),
            "reprobuild": __version__,
            "log": self.log_path(derivation_id),
        }
        if extra:
            meta.update(extra)
        # The record first: a valid entry (metadata present) always has its record.
        from reprobuild.proof import records

        # Not fsynced: a metadata file torn by a power loss does not parse, and an entry
        # whose metadata does not parse is not valid (see metadata()), so it is rebuilt.
        # The output's data, which the metadata vouches for, was fsynced above.
        _write_atomic(self.record_path(derivation_id),
                      records.record_bytes(records.record_from_metadata(meta, final)),
                      sync=False)
        _write_atomic(self.meta_path(derivation_id),
                      json.dumps(meta, indent=1, sort_keys=True).encode(), sync=False)
        return StoreEntry(derivation_id, final, content_hash, fsverity, kind)

    def mark_unreproducible(self, derivation_id: str, report: Mapping[str, Any]) -> None:
        """Record in the entry's metadata that a rebuild differed; ``report`` is JSON-able."""
        with self.lock(derivation_id):
            meta = self.metadata(derivation_id)
            if meta is None:
                raise StoreError(f"derivation {derivation_id} is not in the store")
            meta["unreproducible"] = dict(report)
            _write_atomic(self.meta_path(derivation_id),
                          json.dumps(meta, indent=1, sort_keys=True).encode())

    # -- verify ---------------------------------------------------------------------
    def verify(self) -> list[VerifyProblem]:
        """Re-hash every valid output; name each one whose content no longer matches."""
        problems = []
        for entry in self.paths():
            meta = self.metadata(entry.derivation_id) or {}
            name = str(meta.get("derivation", {}).get("name", ""))
            try:
                actual = canon.hash_path(entry.path)
            except (OSError, BuildError) as exc:
                problems.append(VerifyProblem(entry.derivation_id, name, entry.path,
                                              f"cannot be read: {exc}"))
                continue
            if actual != entry.hash:
                problems.append(VerifyProblem(
                    entry.derivation_id, name, entry.path,
                    f"content changed: recorded blake3 {entry.hash}, now {actual}"))
        return problems

    # -- roots and gc ---------------------------------------------------------------
    def add_root(self, link: str) -> None:
        """Register ``link`` (a result symlink into the store) as a gc root."""
        import blake3

        link = os.path.abspath(link)
        name = blake3.blake3(os.fsencode(link)).hexdigest()[:32]
        root = os.path.join(self.root, "roots", name)
        tmp = root + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(link, tmp)  # noqa: PTH211
        os.rename(tmp, root)

    def make_result_link(self, link: str, derivation_id: str) -> None:
        """Point ``link`` at the output atomically and register it as a root."""
        tmp = f"{link}.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(self.output_path(derivation_id), tmp)  # noqa: PTH211
        try:
            os.rename(tmp, link)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StoreError(f"cannot create the result link {link}: {exc.strerror}") from None
        self.add_root(link)

    def roots(self) -> dict[str, str]:
        """Result link path -> derivation id, for every root that still points here."""
        live: dict[str, str] = {}
        roots_dir = os.path.join(self.root, "roots")
        out_dir = os.path.join(self.root, "out") + os.sep
        for name in sorted(os.listdir(roots_dir)):
            root = os.path.join(roots_dir, name)
            try:
                link = os.readlink(root)
                target = os.readlink(link)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(root)  # the result link is gone: no longer a root
                continue
            if target.startswith(out_dir):
                live[link] = target[len(out_dir):].split(os.sep, 1)[0]
        return live

    def closure(self, derivation_ids: list[str]) -> set[str]:
        """The ids and, transitively, the inputs recorded in their metadata."""
        seen: set[str] = set()
        stack = list(derivation_ids)
        while stack:
            did = stack.pop()
            if did in seen:
                continue
            seen.add(did)
            meta = self.metadata(did)
            if meta:
                stack.extend(v["derivation"] for v in meta.get("inputs", {}).values())
        return seen

    def gc(self, *, keep: Sequence[str] = (), dry_run: bool = False) -> GcResult:
        """Delete every output no root reaches (roots: result links and ``keep`` ids).

        A root keeps its inputs too (transitively), so ``check --deep`` and rebuilds after
        a change need not refetch or rebuild them. Logs and locks of deleted outputs,
        incomplete outputs and abandoned build directories go as well.
        """
        with self.session(exclusive=True):
            live = self.closure([*self.roots().values(), *keep])
            deleted: list[str] = []
            kept: list[str] = []
            freed = 0
            out_dir = os.path.join(self.root, "out")
            # Sets of names, walked in sorted order below.
            meta_names = os.listdir(os.path.join(self.root, "meta"))  # nondet-ok
            log_names = os.listdir(os.path.join(self.root, "logs"))  # nondet-ok
            ids = {n[:-5] for n in meta_names if n.endswith(".json") and not n.startswith(".")}
            ids |= set(os.listdir(out_dir))  # nondet-ok
            ids |= {n[:-4] for n in log_names if n.endswith(".log")}
            for did in sorted(ids):
                if did in live and self.lookup(did) is not None:
                    kept.append(did)
                    continue
                deleted.append(did)
                freed += _tree_size(self.output_path(did))
                if dry_run:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.meta_path(did))
                canon.remove_tree(self.output_path(did))
                for path in (self.log_path(did), self.record_path(did)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            if not dry_run:
                tmp = os.path.join(self.root, "tmp")
                for name in os.listdir(tmp):
                    if not name.startswith("failed-"):
                        canon.remove_tree(os.path.join(tmp, name))
            return GcResult(tuple(kept), tuple(deleted), freed)


def _main_file_digest(derivation_id: str, output: str, name: str) -> str | None:
    """The fs-verity digest of the regular file ``name`` inside a directory output."""
    path = os.path.join(output, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise BuildError(f"the output of {derivation_id} has no regular file {name}",
                         hint="the image step must write its main file; see its log")
    return _fsverity_digest(path)


def _fsverity_digest(path: str) -> str | None:
    """The fs-verity digest of a file output, when the integrity module is available."""
    try:
        from reprobuild.integrity import fsverity  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    try:
        digest: bytes = fsverity.digest_file(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return digest.hex()
