"""Apply a recipe's ``[images.X.files]`` table to a tree: owners, modes, xattrs, new nodes.

Each key is an absolute path in the image (``"/"`` is the root); each value a table of:

* ``mode`` - permission bits, an octal string (``"0640"``, ``"4755"``) or an integer;
* ``uid``, ``gid`` - numeric owner and group;
* ``mtime`` - seconds since the Unix epoch (integer);
* ``xattrs`` - a table name -> value; a value ``"base64:..."`` is decoded, ``"hex:..."`` too,
  any other string is taken as UTF-8 text. Named xattrs are set or replaced, others kept;
* ``type`` - create (or replace a non-directory with) an entry an unprivileged build cannot
  make: ``"char"``/``"block"`` (with ``major``, ``minor``), ``"dir"``, ``"fifo"``,
  ``"symlink"`` (with ``target``). A new entry is root:root, mtime the epoch, mode 0755 for a
  directory, 0777 for a symlink and 0644 otherwise, unless given.

Overriding a hardlink changes the inode: the metadata of every path of its group.
A path that is not in the tree needs ``type``; its parent directory must exist.
Paths are applied in canonical order, so a new directory can hold new entries.
"""

from __future__ import annotations

import base64
import binascii
import os
import tomllib
from collections.abc import Mapping
from dataclasses import replace

from reprobuild.errors import ImageError, RecipeError, suggest
from reprobuild.trees.builder import TreeBuilder
from reprobuild.trees.tree import Entry, EntryType, Tree, check_relative_path, path_key, sort_xattrs

KEYS = ("type", "mode", "uid", "gid", "mtime", "xattrs", "major", "minor", "target")
TYPES: dict[str, EntryType] = {
    "char": EntryType.CHAR,
    "block": EntryType.BLOCK,
    "dir": EntryType.DIRECTORY,
    "fifo": EntryType.FIFO,
    "symlink": EntryType.SYMLINK,
}
MAX_ID = (1 << 32) - 1


def _int(value: object, label: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecipeError(f"{label} must be an integer from {low} to {high}, not {value!r}")
    return value


def parse_mode(value: object, label: str) -> int:
    """A permission mode from an octal string ("0640") or an integer (0o640)."""
    if isinstance(value, str):
        text = value[2:] if value.lower().startswith("0o") else value
        try:
            mode = int(text, 8)
        except ValueError:
            raise RecipeError(f"{label} must be an octal string like \"0640\", not {value!r}",
                              ) from None
        value = mode
    return _int(value, label, low=0, high=0o7777)


def parse_xattr_value(value: object, label: str) -> bytes:
    """``base64:...`` and ``hex:...`` are decoded; other strings are UTF-8 text."""
    if not isinstance(value, str):
        raise RecipeError(f"{label} must be a string, not {value!r}")
    try:
        if value.startswith("base64:"):
            return base64.b64decode(value[7:], validate=True)
        if value.startswith("hex:"):
            return bytes.fromhex(value[4:])
    except (binascii.Error, ValueError):
        raise RecipeError(f"{label}: {value!r} does not decode",
                          hint="use base64:... or hex:... for binary values") from None
    return value.encode()


def _xattrs(value: object, label: str) -> dict[bytes, bytes]:
    if not isinstance(value, Mapping):
        raise RecipeError(f"{label} must be a table of name = value")
    out: dict[bytes, bytes] = {}
    for name, data in value.items():
        if not isinstance(name, str) or not name or "\0" in name or "." not in name:
            raise RecipeError(f"{label}: bad xattr name {name!r}",
                              hint="xattr names look like security.capability or user.x")
        out[name.encode()] = parse_xattr_value(data, f"{label}.{name}")
    return out


def _new_entry(path: bytes, spec: Mapping[str, object], label: str, epoch: int) -> Entry:
    kind_name = spec.get("type")
    if not isinstance(kind_name, str) or kind_name not in TYPES:
        raise RecipeError(f"{label}.type must be one of {', '.join(TYPES)}, not {kind_name!r}")
    kind = TYPES[kind_name]
    default_mode = {EntryType.DIRECTORY: 0o755, EntryType.SYMLINK: 0o777}.get(kind, 0o644)
    target = None
    if kind is EntryType.SYMLINK:
        raw = spec.get("target")
        if not isinstance(raw, str) or not raw:
            raise RecipeError(f"{label}: a symlink needs target = \"...\"")
        target = os.fsencode(raw)
    major = minor = 0
    if kind in (EntryType.CHAR, EntryType.BLOCK):
        if "major" not in spec or "minor" not in spec:
            raise RecipeError(f"{label}: a {kind_name} device needs major and minor")
        major = _int(spec["major"], f"{label}.major", low=0, high=(1 << 12) - 1)
        minor = _int(spec["minor"], f"{label}.minor", low=0, high=(1 << 20) - 1)
    return Entry(path, kind, default_mode, mtime_ns=epoch * 1_000_000_000, target=target,
                 rdev_major=major, rdev_minor=minor)


def _check_keys(spec: Mapping[str, object], label: str) -> None:
    for key in spec:
        if key not in KEYS:
            raise RecipeError(f"{label}: unknown key {key!r}",
                              hint=suggest(str(key), KEYS, "keys", cutoff=0.5))
    kind = spec.get("type")
    if ("major" in spec or "minor" in spec) and kind not in ("char", "block"):
        raise RecipeError(f"{label}: major and minor need type = \"char\" or \"block\"")
    if "target" in spec and kind != "symlink":
        raise RecipeError(f"{label}: target needs type = \"symlink\"")


def apply_overrides(tree: Tree, table: Mapping[str, Mapping[str, object]], *,
                    where: str, epoch: int = 0) -> Tree:
    """A new tree with the overrides of ``table`` applied (``tree`` is not changed).

    ``where`` names the table in messages (``"recipe.toml [images.root.files]"``).
    New entries get ``epoch`` (seconds) as their mtime unless the table gives one.
    """
    entries: dict[bytes, Entry] = {e.path: e for e in tree}
    planned: list[tuple[bytes, str, Mapping[str, object]]] = []
    for key, spec in table.items():
        label = f"{where} {key!r}"
        if not isinstance(key, str) or not key.startswith("/"):
            raise RecipeError(f"{label}: keys must be absolute paths in the image")
        if not isinstance(spec, Mapping):
            raise RecipeError(f"{label} must be a table like {{ mode = \"0644\" }}")
        try:
            path = check_relative_path(os.fsencode(key[1:]), label)
        except ImageError as exc:
            raise RecipeError(exc.message, hint=exc.hint) from None
        _check_keys(spec, label)
        planned.append((path, label, spec))
    planned.sort(key=lambda item: path_key(item[0]))
    seen: set[bytes] = set()
    for path, label, spec in planned:
        if path in seen:
            raise RecipeError(f"{label}: the path is given twice (as another spelling)")
        seen.add(path)
        existing = entries.get(path)
        if "type" in spec:
            new = _new_entry(path, spec, label, epoch)
            parent = entries.get(new.parent)
            if path and (parent is None or parent.type is not EntryType.DIRECTORY):
                raise RecipeError(f"{label}: parent directory /{new.parent.decode()} is not"
                                  " in the image", hint="create it first with type = \"dir\"")
            if existing is not None:
                if existing.type is EntryType.DIRECTORY and new.type is EntryType.DIRECTORY:
                    new = existing
                elif existing.type is EntryType.DIRECTORY or not path:
                    raise RecipeError(f"{label}: cannot replace the directory there by a"
                                      f" {spec['type']}")
                elif existing.type is EntryType.HARDLINK or tree.hardlink_groups().get(path):
                    raise RecipeError(f"{label}: cannot replace a hardlinked file by a"
                                      f" {spec['type']}")
            entries[path] = new
        elif existing is None:
            raise RecipeError(f"{label}: no such path in the image",
                              hint="give type = ... to create it")
        target = entries[path]
        if target.type is EntryType.HARDLINK:
            assert target.target is not None
            target = entries[target.target]
        entries[target.path] = _updated(target, spec, label)
    # The builder gives every path of a hardlink group its inode's (new) metadata.
    builder = TreeBuilder(what=where)
    for path in sorted(entries, key=path_key):
        entry = entries[path]
        shown = entry.display()
        if entry.type is EntryType.HARDLINK:
            assert entry.target is not None
            builder.link(path, entry.target, shown, replace_existing=False)
        else:
            builder.add(entry, shown)
    return builder.build()


def _updated(entry: Entry, spec: Mapping[str, object], label: str) -> Entry:
    changes: dict[str, object] = {}
    if "mode" in spec:
        changes["mode"] = parse_mode(spec["mode"], f"{label}.mode")
    if "uid" in spec:
        changes["uid"] = _int(spec["uid"], f"{label}.uid", low=0, high=MAX_ID)
    if "gid" in spec:
        changes["gid"] = _int(spec["gid"], f"{label}.gid", low=0, high=MAX_ID)
    if "mtime" in spec:
        seconds = _int(spec["mtime"], f"{label}.mtime", low=0, high=(1 << 63) // 10**9)
        changes["mtime_ns"] = seconds * 1_000_000_000
    if "xattrs" in spec:
        xattrs = dict(entry.xattrs)
        xattrs.update(_xattrs(spec["xattrs"], f"{label}.xattrs"))
        changes["xattrs"] = sort_xattrs(xattrs.items())
    return replace(entry, **changes)  # type: ignore[arg-type]


def load_overrides_file(path: str | bytes | os.PathLike[str]) -> dict[str, dict[str, object]]:
    """Read an overrides TOML file (the ``files`` table's content at top level)."""
    shown = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(f"overrides file {shown} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{shown}: not valid TOML ({exc})") from None
    for key, value in table.items():
        if not isinstance(value, dict):
            raise RecipeError(f"{shown}: {key!r} must be a table like {{ mode = \"0644\" }}",
                              hint="keys are absolute paths in the image")
    return table
