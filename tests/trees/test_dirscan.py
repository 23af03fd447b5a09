"""The compiled directory listing (reprobuild/trees/_dirscan.c) is the Python one
(``directory._scan_python``) in one call: the same names in the same order, the same
lstat values, the same errors; and a tree walked with it is the tree walked without."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprobuild import native
from reprobuild.trees import directory
from reprobuild.trees.directory import tree_from_directory
from tests.trees.test_fast_load import EPOCH, every_kind, full_view

DIRSCAN = native.load("reprobuild.trees._dirscan")
# Without the extension only the test that it is built fails; the others compare it.
compiled = pytest.mark.skipif(DIRSCAN is None, reason="_dirscan.c not built (see above)")
FIELDS = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
          "st_rdev", "st_mtime_ns")


def listing(scan: object, path: bytes) -> list[tuple[bytes, tuple[int, ...]]]:
    assert callable(scan)
    return [(name, tuple(getattr(st, field) for field in FIELDS))
            for name, st in scan(path)]


def both(path: Path) -> list[tuple[bytes, tuple[int, ...]]]:
    """The compiled listing of ``path``, checked equal to the Python one."""
    assert DIRSCAN is not None
    compiled_listing = listing(DIRSCAN.scan, os.fsencode(path))
    assert compiled_listing == listing(directory._scan_python, os.fsencode(path))
    return compiled_listing


def test_the_extension_is_built_in_the_test_environment() -> None:
    assert DIRSCAN is not None, "reprobuild/trees/_dirscan.c was not built: run setup.sh"
    assert directory._DIRSCAN is DIRSCAN


@compiled
def test_every_kind_of_entry_lists_alike(tmp_path: Path) -> None:
    top = every_kind(tmp_path / "t")
    for where in (top, top / "b", top / "b-dir", top / "a"):
        assert both(where)
    entries = dict(both(top / "b-dir"))
    assert entries[b"exec-link"][3] == 3  # st_nlink of a hardlinked file
    assert both(top / "b" / "sticky") == []


@compiled
def test_many_names_in_bytewise_order(tmp_path: Path) -> None:
    """More names and bytes than the first allocations hold; names that sort
    differently as text, by length, or with bytes over 0x7f."""
    names = [b"a", b"a.b", b"a-", b"ab", b"B", b"-", b"\x80", b"\xff\xfe", b"a\xff",
             b"l" * 255] + [b"f%04d" % i for i in range(700, 0, -1)]
    for name in names:
        (tmp_path / os.fsdecode(name)).write_bytes(name[:3])
    listed = both(tmp_path)
    assert [name for name, _ in listed] == sorted(names)


@compiled
def test_times_before_1970_and_after_2262(tmp_path: Path) -> None:
    """st_mtime_ns past what 64-bit nanoseconds hold is the exact integer."""
    old, late = tmp_path / "old", tmp_path / "late"
    old.write_bytes(b"")
    late.write_bytes(b"")
    os.utime(old, ns=(0, -5 * 10**9 + 123))
    os.utime(late, ns=(0, 10_000_000_000 * 10**9 + 456))
    times = {name: values[-1] for name, values in both(tmp_path)}
    assert times[b"old"] == os.lstat(old).st_mtime_ns
    assert times[b"late"] == os.lstat(late).st_mtime_ns


@compiled
@pytest.mark.parametrize("make", ["missing", "file", "nul"])
def test_errors_are_the_python_paths(tmp_path: Path, make: str) -> None:
    assert DIRSCAN is not None
    path = os.fsencode(tmp_path / "x")
    if make == "file":
        Path(os.fsdecode(path)).write_bytes(b"")
    elif make == "nul":
        path += b"\0y"
    errors = []
    for scan in (DIRSCAN.scan, directory._scan_python):
        with pytest.raises((OSError, ValueError)) as caught:
            scan(path)
        errors.append((type(caught.value), getattr(caught.value, "errno", None)))
    assert errors[0] == errors[1]


@compiled
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(names=st.sets(st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")), max_size=30))
def test_any_names_list_alike(tmp_path_factory: pytest.TempPathFactory,
                              names: set[bytes]) -> None:
    top = tmp_path_factory.mktemp("names")
    for name in names:
        (top / os.fsdecode(name)).write_bytes(b"")
    assert [name for name, _ in both(top)] == sorted(names)


@compiled
@pytest.mark.parametrize("kept", [{}, {"preserve_owner": True, "preserve_mtime": True}])
def test_trees_walked_with_and_without_the_extension_are_equal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kept: dict[str, bool]) -> None:
    top = every_kind(tmp_path / "t")
    with_scan = tree_from_directory(top, epoch=EPOCH, **kept)
    monkeypatch.setattr(directory, "_DIRSCAN", None)
    assert full_view(tree_from_directory(top, epoch=EPOCH, **kept)) == full_view(with_scan)
