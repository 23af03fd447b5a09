"""Trees deeper than Python's recursion limit: hashed, canonicalised and copied."""

from __future__ import annotations

import os
from pathlib import Path

from reprobuild.build.inputs import copy_path
from reprobuild.store import canon

DEPTH = 1500  # above sys.getrecursionlimit(); 3,000 bytes of path, under PATH_MAX


def _deep_tree(top: Path) -> None:
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for _ in range(DEPTH):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    leaf = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"x")
    os.close(leaf)
    os.symlink("f", "link", dir_fd=fd)
    os.close(fd)


def test_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    source = tmp_path / "source"
    copy = tmp_path / "copy"
    try:
        _deep_tree(source)
        copy_path(str(source), str(copy))
        assert canon.hash_path(copy) == canon.hash_path(source)
        canon.canonicalize(copy, epoch=1700000000)
        leaf = os.fsencode(copy) + b"/d" * DEPTH + b"/f"
        assert os.lstat(leaf).st_mode & 0o777 == 0o444
        canon.fsync_tree(copy)
    finally:
        # pytest removes old temporary directories recursively: leave nothing this deep.
        canon.remove_tree(copy)
        canon.remove_tree(source)
    assert not copy.exists() and not source.exists()


def test_the_hash_of_a_small_tree_is_unchanged(tmp_path: Path) -> None:
    """The iterative walk feeds the hasher exactly what the recursive one did."""
    top = tmp_path / "t"
    (top / "b" / "c").mkdir(parents=True)
    (top / "a").write_bytes(b"alpha")
    (top / "b" / "x").write_bytes(b"")
    (top / "b" / "x").chmod(0o755)
    (top / "b" / "c" / "l").symlink_to("../x")
    (top / "z").mkdir()
    assert canon.hash_path(top) == GOLDEN


GOLDEN = "a307f82fa9bec70141627c3e34f764c30d3270f5e20f4438d1b365d39298077d"  # the recursive walk's
