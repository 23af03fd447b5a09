"""``store verify``: find every damaged entry, and ``--repair``: remove what cannot be
trusted (the next build makes it again).

Verify never trusts the stats fast path: it rehashes every output, checks the canonical
form of every node (modes, setuid bits, mtimes, xattrs), that each entry's metadata,
record and inputs are present and whole, and that no output lies in ``out/`` without
valid metadata.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from reprobuild.errors import BuildError
from reprobuild.store import canon, trust
from reprobuild.store.layout import Layout

RecordCheck = Callable[[Mapping[str, Any], str, bytes], str | None]
"""Given metadata, output path and the stored record's bytes: why the record is wrong."""


@dataclass(frozen=True)
class VerifyProblem:
    derivation_id: str
    name: str
    path: str
    message: str
    # What --repair does: "rewrite-record" when only the record is wrong, else "remove".
    repair: str = "remove"


def read_metadata(layout: Layout, derivation_id: str) -> tuple[dict[str, Any] | None, str]:
    """The metadata object, or None and why not ("" when the file does not exist)."""
    try:
        with open(layout.meta_path(derivation_id), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"metadata cannot be read: {exc.strerror}"
    try:
        meta = json.loads(raw)
    except ValueError:
        return None, "metadata does not parse (truncated?)"
    if not isinstance(meta, dict):
        return None, f"metadata is a JSON {type(meta).__name__}, not an object"
    if not isinstance(meta.get("hash"), str) or meta.get("type") not in (
            "file", "directory", "symlink"):
        return None, "metadata lacks the content hash or type"
    if not isinstance(meta.get("derivation", {}), dict) or not isinstance(
            meta.get("inputs", {}), dict) or not all(
            isinstance(v, dict) for v in meta.get("inputs", {}).values()):
        return None, "metadata has a malformed derivation or inputs"
    if meta.get("derivation_id", derivation_id) != derivation_id:
        return None, f"metadata names another derivation ({meta.get('derivation_id')})"
    return meta, ""


def all_ids(layout: Layout) -> list[str]:
    """Every id that has a metadata file, an output, a record or stats."""
    ids: set[str] = set()
    for sub, suffix in (("meta", ".json"), ("records", ".json"), ("stats", ".json")):
        ids.update(n[:-len(suffix)] for n in os.listdir(layout.subdir(sub))  # nondet-ok
                   if n.endswith(suffix) and not n.startswith("."))
    ids.update(n for n in os.listdir(layout.subdir("out"))  # nondet-ok: sorted below
               if not n.startswith("."))
    return sorted(ids)


def _node_problems(path: str, epoch_ns: int | None) -> list[str]:
    """Canonical-form problems of every node under ``path``."""
    problems = []
    top = os.fsencode(path)
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = top + rel if rel else top
        st = os.lstat(full)
        shown = os.fsdecode(rel).lstrip("/")
        problem = trust.canonical_form_problem(shown, st, epoch_ns)
        if problem:
            problems.append(problem)
        names = trust.xattr_names(full, st)
        if names:
            problems.append(f"{shown or 'the output'}: has extended attributes "
                            f"{', '.join(names)}")
        if stat.S_ISDIR(st.st_mode):
            stack.extend(rel + b"/" + n for n in sorted(os.listdir(full), reverse=True))
    return problems


def _entry_problems(layout: Layout, did: str, meta: Mapping[str, Any],
                    record_check: RecordCheck | None) -> list[tuple[str, str]]:
    out = layout.output_path(did)
    if not os.path.lexists(out):
        return [("the output is missing (its metadata is kept)", "remove")]
    try:
        actual = canon.hash_path(out)
    except (OSError, BuildError) as exc:
        return [(f"cannot be read: {exc}", "remove")]
    if actual != meta["hash"]:
        return [(f"content changed: recorded blake3 {meta['hash']}, now {actual}", "remove")]
    attrs = meta.get("derivation", {}).get("attrs", {})
    epoch = attrs.get("epoch") if isinstance(attrs, dict) else None
    problems = [(p, "remove") for p in _node_problems(
        out, _mtime_ns(layout, did, meta, epoch))]
    # A substitute comes whole from a cache: like a Nix substitute, it needs its build
    # inputs only to be rebuilt, not to be valid.
    inputs = {} if meta.get("substituted") else meta.get("inputs", {})
    for name, value in sorted(inputs.items()):
        dep = value.get("derivation")
        if not isinstance(dep, str) or read_metadata(layout, dep)[0] is None:
            problems.append((f"input {name} ({dep}) is not in the store", "remove"))
    try:
        with open(layout.record_path(did), "rb") as f:
            record = f.read()
    except FileNotFoundError:
        return [*problems, ("the build record is missing", "rewrite-record")]
    why = record_check(meta, out, record) if record_check else _plain_record_check(record)
    if why:
        problems.append((f"the build record {why}", "rewrite-record"))
    return problems


def _mtime_ns(layout: Layout, did: str, meta: Mapping[str, Any], epoch: object
              ) -> int | None:
    """The mtime every node of the output must have: the epoch it was registered with
    (older entries: the one their stats recorded, or the derivation's)."""
    if isinstance(meta.get("epoch"), int):
        return int(meta["epoch"]) * 10**9
    try:
        with open(layout.stats_path(did), "rb") as f:
            rows = json.load(f)["nodes"]
        if rows and len(rows[0]) > 3:
            return int(rows[0][3])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    if meta.get("derivation", {}).get("kind") in ("path", "host", "fetch-deb", "deb"):
        return 0
    return int(epoch) * 10**9 if isinstance(epoch, int) else None


def _plain_record_check(record: bytes) -> str | None:
    try:
        parsed = json.loads(record)
    except ValueError:
        return "does not parse (truncated?)"
    return None if isinstance(parsed, dict) else "is not a JSON object"


def verify(layout: Layout, *, record_check: RecordCheck | None = None
           ) -> list[VerifyProblem]:
    """Every problem of every entry, sorted by derivation id; never raises on damage."""
    problems = []
    for did in all_ids(layout):
        meta, why = read_metadata(layout, did)
        out = layout.output_path(did)
        if meta is None:
            # An output alone is the garbage of a build killed before it registered
            # (the next build replaces it); with its stats or record written, the
            # metadata was there and is gone.
            registered = os.path.lexists(layout.stats_path(did)) or os.path.lexists(
                layout.record_path(did))
            if why or (registered and os.path.lexists(out)):
                problems.append(VerifyProblem(
                    did, "", out, why or "the metadata is missing (deleted?)"))
            continue
        name = str(meta.get("derivation", {}).get("name", ""))
        for message, repair in _entry_problems(layout, did, meta, record_check):
            problems.append(VerifyProblem(did, name, out, message, repair))
    return problems
