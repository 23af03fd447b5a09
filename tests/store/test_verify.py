"""store verify finds every kind of damage without crashing, and --repair fixes it."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from reprobuild.proof import records
from reprobuild.store.store import Store
from tests.store.test_store import EPOCH, make_output

INPUT = "a" * 64  # a directory output, the input of OUTPUT
OUTPUT = "b" * 64  # a file output


def populated(tmp_path: Path) -> Store:
    store = Store(str(tmp_path / "s"))
    tree = make_output(store, {"bin/tool": "#!/bin/sh\n", "etc/conf": "x=1\n", "empty": None})
    os.chmod(os.path.join(tree, "bin/tool"), 0o755)
    Path(tree, "link").symlink_to("bin/tool")
    entry = store.register(INPUT, tree, derivation={"name": "tree", "kind": "step"},
                           inputs={}, epoch=EPOCH, record=records.entry_record)
    out = os.path.join(store.new_build_dir("t"), "out")
    Path(out).write_bytes(b"\x01" * 10000)
    store.register(OUTPUT, out, derivation={"name": "image", "kind": "image"},
                   inputs={"tree": {"derivation": INPUT, "hash": entry.hash}}, epoch=EPOCH,
                   record=records.entry_record)
    return store


def _writable(path: str) -> None:
    os.chmod(path, 0o755)


def _in_tree(store: Store, rel: str) -> str:
    return os.path.join(store.output_path(INPUT), rel)


def _flip(path: str) -> None:
    os.chmod(path, 0o644)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 1
    Path(path).write_bytes(bytes(data))
    os.chmod(path, 0o444)


def _add_file(store: Store) -> None:
    _writable(_in_tree(store, "etc"))
    Path(_in_tree(store, "etc/extra")).write_text("")
    os.chmod(_in_tree(store, "etc/extra"), 0o444)
    os.chmod(_in_tree(store, "etc"), 0o555)


def _remove_file(store: Store) -> None:
    _writable(_in_tree(store, "etc"))
    os.unlink(_in_tree(store, "etc/conf"))


def _swap_link(store: Store) -> None:
    _writable(store.output_path(INPUT))
    os.unlink(_in_tree(store, "link"))
    Path(_in_tree(store, "link")).symlink_to("etc/conf")
    os.chmod(store.output_path(INPUT), 0o555)


def _file_to_dir(store: Store) -> None:
    _writable(_in_tree(store, "etc"))
    os.unlink(_in_tree(store, "etc/conf"))
    os.mkdir(_in_tree(store, "etc/conf"))


def _rewrite_meta(store: Store, did: str, change: Callable[[dict[str, object]], None]
                  ) -> None:
    meta = json.loads(Path(store.meta_path(did)).read_text())
    change(meta)
    Path(store.meta_path(did)).write_text(json.dumps(meta))


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def _fifo(store: Store) -> None:
    _writable(_in_tree(store, "etc"))
    os.mkfifo(_in_tree(store, "etc/fifo"))


def _setxattr(path: str) -> None:
    os.chmod(path, 0o644)
    os.setxattr(path, "user.added", b"1")
    os.chmod(path, 0o444)


def _output_file_to_dir(store: Store) -> None:
    os.unlink(store.output_path(OUTPUT))
    os.mkdir(store.output_path(OUTPUT))


CASES: dict[str, Callable[[Store], None]] = {
    "meta deleted": lambda s: os.unlink(s.meta_path(OUTPUT)),
    "meta truncated": lambda s: _truncate(s.meta_path(OUTPUT)),
    "meta {}": lambda s: Path(s.meta_path(OUTPUT)).write_text("{}"),
    "meta []": lambda s: Path(s.meta_path(OUTPUT)).write_text("[]"),
    "meta hash not a string": lambda s: _rewrite_meta(s, OUTPUT, lambda m: m.update(hash=1)),
    "meta names another id": lambda s: _rewrite_meta(
        s, OUTPUT, lambda m: m.update(derivation_id=INPUT)),
    "meta hash changed": lambda s: _rewrite_meta(s, OUTPUT, lambda m: m.update(hash="0" * 64)),
    "record deleted": lambda s: os.unlink(s.record_path(OUTPUT)),
    "record truncated": lambda s: _truncate(s.record_path(OUTPUT)),
    "record of another entry": lambda s: Path(s.record_path(OUTPUT)).write_bytes(
        Path(s.record_path(INPUT)).read_bytes()),
    "output deleted, meta kept": lambda s: os.unlink(s.output_path(OUTPUT)),
    "byte flipped in a file output": lambda s: _flip(s.output_path(OUTPUT)),
    "byte flipped in a tree": lambda s: _flip(_in_tree(s, "etc/conf")),
    "file truncated": lambda s: (os.chmod(s.output_path(OUTPUT), 0o644),
                                 _truncate(s.output_path(OUTPUT))),
    "setuid bit added": lambda s: os.chmod(_in_tree(s, "bin/tool"), 0o4555),
    "mode changed": lambda s: os.chmod(_in_tree(s, "etc/conf"), 0o644),
    "execute bit removed": lambda s: os.chmod(_in_tree(s, "bin/tool"), 0o444),
    "mtime changed": lambda s: os.utime(_in_tree(s, "etc/conf"), (EPOCH + 5, EPOCH + 5)),
    "extra file": _add_file,
    "file removed": _remove_file,
    "symlink swapped": _swap_link,
    "file replaced by a directory": _file_to_dir,
    "fifo added": _fifo,
    "input deleted": lambda s: (os.unlink(s.meta_path(INPUT)), os.unlink(
        s.record_path(INPUT)), os.unlink(s.layout.stats_path(INPUT))),
    "file output replaced by a directory": _output_file_to_dir,
    "setuid bit on a file output": lambda s: os.chmod(s.output_path(OUTPUT), 0o4444),
    "xattr added": lambda s: _setxattr(_in_tree(s, "etc/conf")),
    "meta inputs malformed": lambda s: _rewrite_meta(s, OUTPUT, lambda m: m.update(inputs=[])),
}


def test_a_sound_store_verifies(tmp_path: Path) -> None:
    assert populated(tmp_path).verify(record_check=records.check_entry_record) == []


@pytest.mark.parametrize("damage", sorted(CASES))
def test_verify_reports_every_damage_and_repair_fixes_it(tmp_path: Path, damage: str) -> None:
    store = populated(tmp_path)
    CASES[damage](store)
    problems = store.verify(record_check=records.check_entry_record)
    assert problems, damage
    assert {p.derivation_id for p in problems} <= {INPUT, OUTPUT}
    store.repair(problems, record=records.entry_record)
    assert store.verify(record_check=records.check_entry_record) == []
    # What is left is trustworthy, and lookups never crash on what repair removed.
    for entry in store.paths():
        assert store.damage(entry.derivation_id) is None
    assert stat.S_ISDIR(os.lstat(store.root).st_mode)


@pytest.mark.parametrize("stats", ["", "{", "[]", '{"version": 1, "hash": "%s", "nodes": [[1]]}',
                                   '{"version": 1, "hash": "%s", "nodes": [["", 7]]}'])
def test_damaged_stats_mean_a_full_rehash_not_a_crash(tmp_path: Path, stats: str) -> None:
    store = populated(tmp_path)
    for did in (INPUT, OUTPUT):
        entry = store.lookup(did)
        assert entry is not None
        Path(store.layout.stats_path(did)).write_text(stats.replace("%s", entry.hash))
        assert store.damage(did) is None
        assert json.loads(Path(store.layout.stats_path(did)).read_text())["nodes"]
    os.chmod(store.output_path(OUTPUT), 0o644)
    Path(store.output_path(OUTPUT)).write_bytes(b"\x02" * 10000)
    Path(store.layout.stats_path(OUTPUT)).write_text("{")
    assert store.damage(OUTPUT) is not None
