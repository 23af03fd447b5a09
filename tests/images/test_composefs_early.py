"""Content digests started while the tree loads (reprobuild.images.composefs.early): the
same digests and image bytes as hashing after the load, whoever hashes which file; the
files the child did not do are hashed here, and an error names the tree's path."""

from __future__ import annotations

import io
import mmap
import os
import signal
import time
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.composefs import digests, early, shares
from reprobuild.images.composefs import image as composefs
from reprobuild.images.registry import ImageOptions
from reprobuild.integrity.fsverity import digest_bytes
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.images.test_composefs_digests import pattern

# Inline-sized files (never hashed) and the edges of one block, plus i bytes.
SIZES = (0, 64, 65, 4095, 4096, 4097, 3 * 4096 + 5)
BIG = digests.WHOLE_MAX + 4097  # streamed, not read whole


def make_files(directory: Path, count: int) -> None:
    """``count`` files in a few subdirectories, sizes cycling through SIZES, one file of
    129 blocks and one streamed."""
    for index in range(count):
        sub = directory / f"d{index % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{index:05d}").write_bytes(pattern(SIZES[index % 7] + index, index))
    (directory / "big").write_bytes(pattern(BIG, 99))
    (directory / "mid").write_bytes(pattern(128 * 4096 + 1, 98))


def loaded(directory: Path, watcher: early.EarlyDigests, *, preserve_owner: bool = False,
           read_xattrs: bool = False) -> Tree:
    return tree_from_directory(directory, epoch=0, found=watcher.found,
                               preserve_owner=preserve_owner, read_xattrs=read_xattrs)


def test_digests_found_while_loading_equal_those_hashed_after(tmp_path: Path) -> None:
    make_files(tmp_path, 3 * shares.PARALLEL_MIN_FILES)
    with early.while_loading(processes=2) as watcher:
        tree = loaded(tmp_path, watcher)
        assert watcher.forked
        entries = digests.stored_by_reference(tree)
        with watcher.hashing(entries) as results:
            found = results()
    assert found == digests.content_digests(tree, processes=1)
    assert list(found) == [e.path for e in entries]  # in the tree's order, not by timing
    assert found[b"big"] == digest_bytes(pattern(BIG, 99))


@pytest.mark.parametrize("options", [{}, {"preserve_owner": True, "read_xattrs": True}])
def test_the_image_is_the_same_with_or_without_early_hashing(
        tmp_path: Path, options: dict[str, bool]) -> None:
    source = tmp_path / "src"
    source.mkdir()
    make_files(source, 2 * shares.PARALLEL_MIN_FILES)
    plain = io.BytesIO()
    composefs.write(tree_from_directory(source, epoch=0, **options),  # type: ignore[arg-type]
                    plain, ImageOptions(epoch=0))  # options: the walk's two kinds
    with composefs.while_loading() as watcher:
        tree = loaded(source, watcher, **options)
        streamed = io.BytesIO()
        composefs.write(tree, streamed, ImageOptions(epoch=0), early=watcher)
    assert streamed.getvalue() == plain.getvalue()


def test_few_files_fork_nothing_and_hash_after(tmp_path: Path) -> None:
    make_files(tmp_path, shares.PARALLEL_MIN_FILES // 2)
    with early.while_loading(processes=2) as watcher:
        tree = loaded(tmp_path, watcher)
        assert not watcher.forked
        with watcher.hashing(digests.stored_by_reference(tree)) as results:
            assert results() == digests.content_digests(tree, processes=1)


def test_files_the_loader_did_not_tell_are_hashed_here(tmp_path: Path) -> None:
    make_files(tmp_path, 2 * shares.PARALLEL_MIN_FILES)
    with early.while_loading(processes=2) as watcher:
        tree = loaded(tmp_path, watcher)
        data = b"replaced " * 20
        tree.add(Entry(b"d0/f00000", EntryType.REGULAR, 0o644,
                       content=Content.from_bytes(data)), replace_existing=True)
        tree.add(Entry(b"new", EntryType.REGULAR, 0o644, content=Content.from_bytes(data)))
        with watcher.hashing(digests.stored_by_reference(tree)) as results:
            found = results()
    assert found[b"d0/f00000"] == found[b"new"] == digest_bytes(data)
    assert found == digests.content_digests(tree, processes=1)


def test_a_file_that_shrank_after_it_was_found_is_refused_with_its_path(
        tmp_path: Path) -> None:
    make_files(tmp_path, 2 * shares.PARALLEL_MIN_FILES)
    with early.while_loading(processes=2) as watcher:
        tree = loaded(tmp_path, watcher)
        (tmp_path / "d1" / "f00004").write_bytes(b"y" * 4000)  # was 4100 bytes
        with watcher.hashing(digests.stored_by_reference(tree)) as results, \
                pytest.raises(ImageError, match=r"/d1/f00004: file ended 100 bytes early"):
            results()


def test_a_child_left_when_the_block_fails_is_ended(tmp_path: Path) -> None:
    make_files(tmp_path, 2 * shares.PARALLEL_MIN_FILES)
    with pytest.raises(RuntimeError), early.while_loading(processes=2) as watcher:
        loaded(tmp_path, watcher)
        assert watcher.forked
        pid = watcher._child[0] if watcher._child else 0
        raise RuntimeError("interrupted")
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped


def test_a_child_that_died_leaves_its_files_to_this_process(tmp_path: Path) -> None:
    make_files(tmp_path, 3 * shares.PARALLEL_MIN_FILES)
    tree = tree_from_directory(tmp_path, epoch=0)
    entries = digests.stored_by_reference(tree)
    paths = [(e.content.source.path, e.size) for e in entries]  # type: ignore[union-attr]
    with early.while_loading(processes=2) as watcher:
        for path, size in paths[:shares.PARALLEL_MIN_FILES]:
            watcher.found(path, size)
        assert watcher._child is not None
        pid = watcher._child[0]
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
            time.sleep(0.01)  # dead, not reaped: the records pipe has no reader
        for path, size in paths[shares.PARALLEL_MIN_FILES:]:
            watcher.found(path, size)  # the walk goes on: nothing is sent any more
        with watcher.hashing(entries) as results:
            assert results() == digests.content_digests(tree, processes=1)


def hashed_in_order(tmp_path: Path, stop_at: int) -> tuple[bytes, int]:
    """What the child's part sends for the files of make_files (checked against their
    digests), this process having taken on the files from ``stop_at``; and how many
    files there were."""
    make_files(tmp_path, 40)
    paths = sorted(str(p).encode() for p in tmp_path.rglob("f*") if p.stat().st_size > 64)
    sizes = [os.path.getsize(p) for p in paths]
    marks = memoryview(mmap.mmap(-1, mmap.PAGESIZE)).cast("q")
    marks[0], marks[1] = 0, stop_at
    records, results = os.pipe(), os.pipe()
    os.close(records[1])  # every file is known: the stream ends at once
    early._child_work(paths[:], sizes[:], records[0], results[1], marks)
    with open(results[0], "rb") as pipe:
        sent = pipe.read()
    assert marks[0] == min(stop_at, len(paths))  # how many it took on
    expected = [digest_bytes(Path(os.fsdecode(p)).read_bytes()) for p in paths]
    assert sent == b"".join(expected[:stop_at])
    return sent, len(paths)


@pytest.mark.parametrize("stop_at", [0, 7, 1 << 40])
def test_the_child_stops_where_this_process_has_been(tmp_path: Path, stop_at: int) -> None:
    sent, files = hashed_in_order(tmp_path, stop_at)
    assert len(sent) == 32 * min(stop_at, files)


def test_records_cut_across_reads_are_parsed_whole() -> None:
    records = b"".join(early._RECORD.pack(size, len(path)) + path
                       for size, path in ((65, b"/a"), (1 << 40, b"/b/\xff" * 40)))
    paths: list[bytes] = []
    sizes: list[int] = []
    left = early._parse(records[:15], paths, sizes)
    assert (paths, sizes) == ([b"/a"], [65])
    assert early._parse(left + records[15:], paths, sizes) == b""
    assert (paths, sizes) == ([b"/a", b"/b/\xff" * 40], [65, 1 << 40])
