"""The content digests of composefs images (reprobuild.images.composefs.digests): equal
to ``fsverity digest`` of each file whatever its size and source, and the same in one
process as shared among forked children."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.composefs import digests, shares
from reprobuild.integrity.fsverity import digest_bytes, digest_file
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Content, Entry, EntryType, Tree

# Every edge of the digester: one block, its edge, two blocks, one hash block of
# leaves (128 data blocks) and one more, and a file streamed instead of read whole.
SIZES = (65, 100, 4095, 4096, 4097, 8192, 12289, 128 * 4096, 128 * 4096 + 1,
         129 * 4096 + 7, 1 << 20, digests.WHOLE_MAX, digests.WHOLE_MAX + 4097)


def pattern(size: int, seed: int) -> bytes:
    block = bytes((seed * 7 + i) % 251 for i in range(4096))
    return (block * (size // 4096 + 1))[:size]


def tree_of(directory: Path, sizes: list[int]) -> Tree:
    for index, size in enumerate(sizes):
        (directory / f"f{index:05d}").write_bytes(pattern(size, index))
    return tree_from_directory(directory, epoch=0)


def test_every_size_gives_the_fsverity_digest(tmp_path: Path) -> None:
    tree = tree_of(tmp_path, list(SIZES))
    found = digests.content_digests(tree, processes=1)
    assert len(found) == len(SIZES)
    for index, size in enumerate(SIZES):
        path = tmp_path / f"f{index:05d}"
        assert found[os.fsencode(path.name)] == digest_file(path), size


def test_inline_sized_files_have_no_digest(tmp_path: Path) -> None:
    tree = tree_of(tmp_path, [0, 1, 64, 65])
    assert sorted(digests.content_digests(tree)) == [b"f00003"]


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_forked_children_give_the_same_digests(tmp_path: Path, processes: int) -> None:
    sizes = [65 + (i * 977) % 70_000 for i in range(3 * shares.PARALLEL_MIN_FILES)]
    tree = tree_of(tmp_path, sizes)
    alone = digests.content_digests(tree, processes=1)
    assert digests.content_digests(tree, processes=processes) == alone
    assert alone[b"f00007"] == digest_file(tmp_path / "f00007")


def test_shares_cover_every_file_once_in_order(tmp_path: Path) -> None:
    tree = tree_of(tmp_path, [100 + i for i in range(10)] + [5 << 20])
    entries = digests.stored_by_reference(tree)
    assert len(shares.shares(entries[:10], 3)) == 3
    assert shares.shares([], 2) == [[]]
    for count in (1, 2, 3, 4):
        runs = shares.shares(entries, count)
        assert 1 <= len(runs) <= count and all(runs)
        assert [e.path for run in runs for e in run] == [e.path for e in entries]


def test_shares_no_process_can_be_forked_for_are_done_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tree_of(tmp_path, [100 + i for i in range(2 * shares.PARALLEL_MIN_FILES)])
    alone = digests.content_digests(tree, processes=1)

    def no_fork() -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    assert digests.content_digests(tree, processes=3) == alone


CHILD_SLEEP = 60


def test_children_are_ended_when_this_process_fails(tmp_path: Path) -> None:
    tree = tree_of(tmp_path, [100] * (2 * shares.PARALLEL_MIN_FILES))
    entries = digests.stored_by_reference(tree)
    here = os.getpid()
    pids = tmp_path / "pids"

    def work(run: Sequence[Entry]) -> bytes:
        if os.getpid() == here:
            raise ValueError("this process failed")
        with open(pids, "a") as out:
            out.write(f"{os.getpid()}\n")
        time.sleep(CHILD_SLEEP)
        return b""

    start = time.monotonic()
    with pytest.raises(ValueError, match="this process failed"):
        shares.in_processes(entries, work, processes=3)
    # Ended, not waited out: back long before a child would have finished its work.
    assert time.monotonic() - start < CHILD_SLEEP / 2
    children = [int(line) for line in pids.read_text().split()] if pids.exists() else []
    for pid in children:  # ended and waited for: no such process any more
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_contents_held_in_memory_are_digested_too() -> None:
    data = pattern(10_000, 3)
    tree = Tree()
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644, content=Content.from_bytes(data)))
    assert digests.content_digests(tree) == {b"f": digest_bytes(data)}


def test_a_head_start_lightens_the_first_share_only(tmp_path: Path) -> None:
    tree = tree_of(tmp_path, [1000] * 40)
    entries = digests.stored_by_reference(tree)
    even = shares.shares(entries, 2)
    lighter = shares.shares(entries, 2, head_start=10 * (1000 + shares.FILE_COST))
    assert [len(run) for run in even] == [20, 20]
    assert [len(run) for run in lighter] == [15, 25]
    assert all(shares.shares(entries, 3, head_start=1 << 40))  # never an empty share


def test_hashing_started_before_other_work_gives_the_same_digests(tmp_path: Path) -> None:
    sizes = [65 + (i * 977) % 70_000 for i in range(2 * shares.PARALLEL_MIN_FILES)]
    tree = tree_of(tmp_path, sizes)
    alone = digests.content_digests(tree, processes=1)
    entries = digests.stored_by_reference(tree)
    with digests.hashing(entries, processes=2, head_start=1 << 20) as results:
        (tmp_path / "f00000").write_bytes(b"x" * 65)  # after the fork: not seen by the child
        found = results()
    assert found[b"f00001"] == alone[b"f00001"]
    assert found[b"f00000"] == digest_bytes(b"x" * 65)  # the first share is hashed here
    assert found == {**alone, b"f00000": digest_bytes(b"x" * 65)}


def test_a_file_that_shrank_is_refused_with_its_path(tmp_path: Path) -> None:
    tree = tree_of(tmp_path, [100, 5000])
    (tmp_path / "f00001").write_bytes(b"y" * 4000)
    with pytest.raises(ImageError, match=r"/f00001: file ended 1000 bytes early"):
        digests.content_digests(tree, processes=1)
