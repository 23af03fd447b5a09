"""The store: canonical outputs, content hashes, atomic registration, verify and gc."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from reprobuild.errors import BuildError
from reprobuild.proof import records
from reprobuild.store.store import Store, canon

EPOCH = 1700000000


def make_output(store: Store, files: dict[str, str | None]) -> str:
    out = os.path.join(store.new_build_dir("t"), "out")
    os.makedirs(out)
    for rel, text in files.items():
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if text is None:
            os.makedirs(path, exist_ok=True)
        else:
            Path(path).write_text(text)
    return out


def register(store: Store, did: str, out: str) -> str:
    return store.register(did, out, derivation={"id": did}, inputs={}, epoch=EPOCH,
                          record=records.entry_record).hash


def test_canonical_modes_times_and_hash(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    out = make_output(store, {"a": "x", "bin/tool": "#!/bin/sh\n", "d": None})
    os.chmod(os.path.join(out, "bin/tool"), 0o6751)
    os.chmod(os.path.join(out, "a"), 0o1600)
    Path(out, "link").symlink_to("a")
    digest = register(store, "1" * 64, out)
    final = store.output_path("1" * 64)
    for rel, mode in (("", 0o555), ("a", 0o444), ("bin/tool", 0o555), ("d", 0o555)):
        st = os.lstat(os.path.join(final, rel))
        assert stat.S_IMODE(st.st_mode) == mode, rel
        assert st.st_mtime_ns == EPOCH * 10**9
    assert os.lstat(os.path.join(final, "link")).st_mtime_ns == EPOCH * 10**9
    # The same content built elsewhere, in another order, with other modes: same hash.
    other = make_output(store, {"d": None, "bin/tool": "#!/bin/sh\n", "a": "x"})
    os.chmod(os.path.join(other, "bin/tool"), 0o700)
    Path(other, "link").symlink_to("a")
    assert register(store, "2" * 64, other) == digest
    assert store.lookup("1" * 64) is not None
    assert [e.derivation_id for e in store.paths()] == ["1" * 64, "2" * 64]


def test_hash_sensitivity(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    hashes = set()
    for i, files in enumerate([{"a": "x"}, {"a": "y"}, {"b": "x"}, {"a": "x", "c": None}]):
        hashes.add(register(store, str(i) * 64, make_output(store, files)))
    exe = make_output(store, {"a": "x"})
    os.chmod(os.path.join(exe, "a"), 0o755)
    hashes.add(register(store, "9" * 64, exe))
    assert len(hashes) == 5


def test_special_files_are_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    out = make_output(store, {})
    os.mkfifo(os.path.join(out, "fifo"))
    with pytest.raises(BuildError, match="fifo at fifo"):
        register(store, "3" * 64, out)
    assert store.lookup("3" * 64) is None


def test_verify_names_changed_outputs(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    register(store, "4" * 64, make_output(store, {"a": "x"}))
    register(store, "5" * 64, make_output(store, {"a": "x"}))
    assert store.verify() == []
    victim = os.path.join(store.output_path("5" * 64), "a")
    os.chmod(victim, 0o644)
    Path(victim).write_text("tampered")
    problems = store.verify()
    assert [p.derivation_id for p in problems] == ["5" * 64]
    assert "content changed" in problems[0].message


def test_output_without_metadata_is_not_valid(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    did = "6" * 64
    os.makedirs(store.output_path(did))  # as left by a build killed before its metadata
    assert store.lookup(did) is None
    assert store.verify() == []
    register(store, did, make_output(store, {"a": "fresh"}))  # replaced, not merged
    assert os.listdir(store.output_path(did)) == ["a"]


def test_gc_keeps_roots_and_their_inputs(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    ids = {n: n * 64 for n in "abcd"}
    for n in "abcd":
        out = make_output(store, {"f": n})
        inputs = {"dep": {"derivation": ids["a"], "hash": ""}} if n == "b" else {}
        store.register(ids[n], out, derivation={}, inputs=inputs, epoch=0)
    link = str(tmp_path / "result-b")
    store.make_result_link(link, ids["b"])
    result = store.gc(keep=[ids["c"]])
    assert sorted(result.kept) == [ids["a"], ids["b"], ids["c"]]
    assert list(result.deleted) == [ids["d"]]
    assert store.lookup(ids["d"]) is None and not os.path.exists(store.output_path(ids["d"]))
    os.unlink(link)  # the root goes with its link
    result = store.gc()
    assert store.paths() == []


def test_mark_unreproducible(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    register(store, "7" * 64, make_output(store, {"a": "x"}))
    store.mark_unreproducible("7" * 64, {"round": 1, "paths": ["/a"]})
    meta = store.metadata("7" * 64)
    assert meta is not None and meta["unreproducible"]["paths"] == ["/a"]


def test_remove_tree_handles_read_only_dirs(tmp_path: Path) -> None:
    d = tmp_path / "ro" / "inner"
    d.mkdir(parents=True)
    (d / "f").write_text("x")
    os.chmod(d, 0o555)
    os.chmod(d.parent, 0o555)
    canon.remove_tree(str(tmp_path / "ro"))
    assert not (tmp_path / "ro").exists()
