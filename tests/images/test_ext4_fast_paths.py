"""The fast paths of tree ingestion and of the ext4 writer give the bytes of the general
paths, on generated trees.

Fast paths: tar headers parsed without tarfile, whole-file reads for the content scan and
the write (with and without the small-file cache), one-run block allocations. The
general paths are forced by patching the switches: tarfile for every member, every file
streamed in chunks, every allocation through the reserved-block walk. Trees come as a
directory, as a tar of it and in memory; each is written with the UUID and hash seed
derived from the content (every byte hashed) and given (nothing hashed).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprobuild.images.ext4 import allocate, prepare, write
from reprobuild.images.ext4 import image as ext4
from reprobuild.images.registry import ImageOptions
from reprobuild.trees import tar_reader
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.load import load_tree
from reprobuild.trees.tar_headers import GiveUp
from reprobuild.trees.tree import Content, Entry, Tree

EPOCH = 1_700_000_000
UUID = "6a7e0c52-61d4-4f0e-9c3b-2f0a8f5d1e42"
BLOCK = 4096


def _no_fast_headers(*args: object) -> Iterator[object]:
    raise GiveUp
    yield  # a generator, like tar_reader._fast_members


def _walk_only(self: allocate.Allocator, count: int, *,
               contiguous: bool = False) -> list[tuple[int, int]]:
    return self._allocate(count, contiguous=contiguous)


@contextmanager
def general_paths() -> Iterator[None]:
    """Every fast path switched off."""
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(tar_reader, "_fast_members", _no_fast_headers))
        stack.enter_context(mock.patch.object(prepare, "WHOLE_READ_MAX", -1))
        stack.enter_context(mock.patch.object(write, "WHOLE_READ_MAX", -1))
        stack.enter_context(mock.patch.object(allocate.Allocator, "allocate", _walk_only))
        yield


def content_bytes(size: int, zero_blocks: frozenset[int], seed: int) -> bytes:
    """``size`` bytes, all-zero in the given 4 KiB blocks, else a pattern."""
    out = bytearray((i * 131 + seed) % 251 + 1 for i in range(min(size, 4 * BLOCK)))
    while len(out) < size:
        out += out[: size - len(out)]
    for block in zero_blocks:
        out[block * BLOCK: (block + 1) * BLOCK] = bytes(len(out[block * BLOCK:
                                                                 (block + 1) * BLOCK]))
    return bytes(out)


SIZES = st.sampled_from([0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 5 * BLOCK + 7,
                         40 * BLOCK + 3])
FILE = st.tuples(st.integers(0, 5), SIZES, st.frozensets(st.integers(0, 41), max_size=6),
                 st.integers(0, 250), st.sampled_from([0o644, 0o755, 0o4755]))


def make_directory(root: Path, files: list[tuple[int, int, frozenset[int], int, int]],
                   links: list[int], wide: int) -> None:
    for d in range(6):
        (root / f"d{d}").mkdir()
    for i in range(wide):  # a directory big enough for an htree
        (root / "d5" / f"entry-{i:05d}-{'x' * (i % 30)}").write_bytes(b"")
    for i, (d, size, zeros, seed, mode) in enumerate(files):
        path = root / f"d{d}" / f"f{i}"
        path.write_bytes(content_bytes(size, zeros, seed))
        os.chmod(path, mode)
    for n, i in enumerate(links):
        if files:
            target = root / f"d{files[i % len(files)][0]}" / f"f{i % len(files)}"
            os.link(target, root / f"d{n % 5}" / f"hard{n}")
            (root / f"d{n % 5}" / f"sym{n}").symlink_to("t" * (1 + 37 * n % 90))


def make_tar(root: Path, path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(os.listdir(root)):
            archive.add(root / name, arcname=name, recursive=True)


def in_memory(tree: Tree) -> Tree:
    """The same tree with every file's bytes held in memory."""
    out = Tree(tree.root)
    for entry in tree:
        if entry.path:
            content = entry.content
            if content is not None:
                content = Content.from_bytes(content.read())
            out.add(Entry(entry.path, entry.type, entry.mode, entry.uid, entry.gid,
                          entry.mtime_ns, entry.xattrs, content, entry.target))
    return out


def images(tree: Tree, out: Path) -> list[bytes]:
    result = []
    for options in (ImageOptions(epoch=EPOCH),
                    ImageOptions(epoch=EPOCH, uuid=UUID, extra=(("hash_seed", UUID),))):
        with out.open("wb") as output:
            ext4.write(tree, output, options)
        result.append(out.read_bytes())
    return result


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FILE, max_size=14), st.lists(st.integers(0, 20), max_size=4),
       st.sampled_from([0, 300]))
def test_fast_paths_give_the_general_paths_bytes(
        files: list[tuple[int, int, frozenset[int], int, int]], links: list[int],
        wide: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        root.mkdir()
        make_directory(root, files, links, wide)
        archive = Path(tmp) / "tree.tar"
        make_tar(root, archive)
        out = Path(tmp) / "image"
        for source in (root, archive):
            fast_tree = load_tree(str(source), epoch=EPOCH)
            fast = images(fast_tree, out)
            fast_memory = images(in_memory(fast_tree), out)
            with general_paths():
                general_tree = load_tree(str(source), epoch=EPOCH)
                general = images(general_tree, out)
                general_memory = images(in_memory(general_tree), out)
            assert diff_trees(fast_tree, general_tree) == []
            assert fast == general, source.name
            assert fast_memory == general_memory == fast, source.name


def test_small_file_cache_does_not_change_bytes(tmp_path: Path) -> None:
    """Files kept from the scan, files read again and files streamed give one image."""
    root = tmp_path / "tree"
    root.mkdir()
    make_directory(root, [(i % 5, size, frozenset({1}), i, 0o644) for i, size in
                          enumerate([0, 10, BLOCK, 2 * BLOCK, 50 * BLOCK, 300 * BLOCK])],
                   [1, 2], 0)
    tree = load_tree(str(root), epoch=EPOCH)
    out = tmp_path / "image"
    default = images(tree, out)
    with mock.patch.object(prepare, "CACHE_PER_ENTRY", 0):
        assert images(tree, out) == default
    with mock.patch.object(prepare, "WHOLE_READ_MAX", 2 * BLOCK), \
            mock.patch.object(write, "WHOLE_READ_MAX", 0):
        assert images(tree, out) == default


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40)), min_size=1, max_size=8),
       st.lists(st.tuples(st.integers(0, 60), st.booleans()), max_size=40))
def test_one_run_allocations_match_the_reserved_walk(
        gaps: list[tuple[int, int]], requests: list[tuple[int, bool]]) -> None:
    reserved, start = [], 0
    for gap, count in gaps:
        start += gap
        reserved.append((start, count))
        start += count
    fast = allocate.Allocator(list(reserved))
    walk = allocate.Allocator(list(reserved))
    for count, contiguous in requests:
        got = fast.allocate(count, contiguous=contiguous)
        assert got == walk._allocate(count, contiguous=contiguous)
        assert fast.cursor == walk.cursor
    assert fast.merged_used() == walk.merged_used()
