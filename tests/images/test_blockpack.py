"""The compiled gzip block path (reprobuild/images/squashfs/_blockpack.c) stores every
block as the Python path does (``Compressor.store`` without it: the zstd probe through
python-zstandard, deflate through ctypes or zlib): the same verdicts, the same bytes, from
any thread, and the same images."""

from __future__ import annotations

import random
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from reprobuild import native
from reprobuild.images.squashfs import compressors
from reprobuild.images.squashfs.compressors import PROBE_SAMPLE, make_compressor
from reprobuild.images.squashfs.ondisk import SQUASHFS_COMPRESSED_BIT_BLOCK
from tests.images.squashfs_trees import build, pseudo_random, sample_tree

BLOCKPACK = native.load("reprobuild.images.squashfs._blockpack")
# Without the extension only the test that it is built fails; the others compare it.
compiled = pytest.mark.skipif(BLOCKPACK is None, reason="_blockpack.c not built (see above)")
STORED = SQUASHFS_COMPRESSED_BIT_BLOCK
MiB = 1 << 20


def words(count: int, size: int, seed: int = 5) -> bytes:
    """Random 4-byte words from a set of ``count``: deflate finds their repeats, zstd
    level 1 (5-byte minimum match) cannot, so with 1024 words the probe finds the block
    incompressible although deflate would shrink it by half."""
    rng = random.Random(seed)
    vocabulary = [rng.randbytes(4) for _ in range(count)]
    return b"".join(rng.choice(vocabulary) for _ in range(size // 4))


def samples() -> dict[str, bytes]:
    rng = random.Random(11)
    text = pseudo_random("text", 200_000)
    return {
        "empty": b"",
        "one byte": b"x",
        "two bytes": b"xx",
        "random 3000": rng.randbytes(3000),
        "zeros 128K": bytes(131072),
        "text 128K": text[:131072],
        "random 128K": rng.randbytes(131072),
        "sample size": text[:PROBE_SAMPLE],
        "sample size + 1 random": rng.randbytes(PROBE_SAMPLE + 1),
        # The sample decides alone / the whole block decides after the sample fails:
        "text, random tail": text[:PROBE_SAMPLE] + rng.randbytes(131072 - PROBE_SAMPLE),
        "random head, zero tail": rng.randbytes(PROBE_SAMPLE) + bytes(131072 - PROBE_SAMPLE),
        "words 1024": words(1024, 131072),
        "words 256": words(256, 131072),
        "1 MiB text": (text * 6)[:MiB],
    }


Store = Callable[[bytes, int, bool], tuple[bytes, int]]


def python_store(monkeypatch: pytest.MonkeyPatch) -> Store:
    def store(data: bytes, level: int, probe: bool) -> tuple[bytes, int]:
        with monkeypatch.context() as patch:
            patch.setattr(compressors, "_blockpack", lambda: None)
            return make_compressor("gzip", MiB, level, probe=probe).store(data)
    return store


def test_the_extension_is_built_in_the_test_environment() -> None:
    assert BLOCKPACK is not None, ("reprobuild/images/squashfs/_blockpack.c was not built:"
                                   " run setup.sh")
    assert compressors._blockpack() is BLOCKPACK


@compiled
def test_the_probe_is_the_pinned_wheels_libzstd() -> None:
    assert BLOCKPACK is not None
    major, minor, patch = zstandard.ZSTD_VERSION[:3]
    assert compressors._blockpack() is BLOCKPACK  # bound
    # A second bind keeps the library and names the same version.
    spec_origin = zstandard.__file__  # any path: the bound library is kept
    assert BLOCKPACK.bind_probe(spec_origin) == major * 10000 + minor * 100 + patch
    assert BLOCKPACK.zlib_version() == zlib.ZLIB_RUNTIME_VERSION


@compiled
@pytest.mark.parametrize("level", [1, 6, 9])
@pytest.mark.parametrize("probe", [True, False])
def test_every_sample_is_stored_as_the_python_path_stores_it(
        monkeypatch: pytest.MonkeyPatch, level: int, probe: bool) -> None:
    assert BLOCKPACK is not None
    python = python_store(monkeypatch)
    kinds = set()
    for name, data in samples().items():
        stored, field = BLOCKPACK.compress_gzip(data, level, probe)
        assert (stored, field) == python(data, level, probe), name
        assert (field & ~STORED) == len(stored)
        kinds.add(bool(field & STORED))
        if not field & STORED:
            assert stored == zlib.compress(data, level), name
    assert kinds == {True, False}  # both outcomes were compared


@compiled
def test_the_probes_verdict_decides_a_block_deflate_would_shrink(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert BLOCKPACK is not None
    data = words(1024, 131072)
    assert len(zlib.compress(data, 9)) < len(data) * 0.6
    assert make_compressor("gzip", 131072).incompressible(data)
    assert BLOCKPACK.compress_gzip(data, 9, True) == (data, len(data) | STORED)
    assert python_store(monkeypatch)(data, 9, True) == (data, len(data) | STORED)
    assert BLOCKPACK.compress_gzip(data, 9, False)[0] == zlib.compress(data, 9)


@compiled
@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.one_of(st.binary(max_size=20000),
                                st.builds(bytes, st.integers(0, 40000)),
                                st.builds(lambda n, s: words(64 << (s % 5), n, s),
                                          st.integers(4, 40000), st.integers(0, 99))),
                      min_size=1, max_size=6),
       level=st.sampled_from([1, 9]))
def test_arbitrary_blocks_are_stored_alike(parts: list[bytes], level: int) -> None:
    assert BLOCKPACK is not None
    data = b"".join(parts)[:MiB] or b"\0"
    with pytest.MonkeyPatch.context() as patch:
        expected = python_store(patch)(data, level, True)
    assert BLOCKPACK.compress_gzip(data, level, True) == expected


@compiled
def test_threads_keep_their_own_streams_and_contexts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks at alternating levels from four threads at once, each thread's kept
    deflate stream and zstd context reused and re-made across levels."""
    assert BLOCKPACK is not None
    python = python_store(monkeypatch)
    cases = [(data, level) for data in samples().values() for level in (9, 1)]
    expected = [python(data, level, True) for data, level in cases]
    failures: list[int] = []

    def work(offset: int) -> None:
        for round_ in range(3):
            for i in range(len(cases)):
                at = (i + offset + round_) % len(cases)
                data, level = cases[at]
                if BLOCKPACK.compress_gzip(data, level, True) != expected[at]:
                    failures.append(at)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@compiled
def test_deflate_is_zlib_compress_and_bad_calls_are_refused() -> None:
    assert BLOCKPACK is not None
    for data in (b"", b"a", bytes(70000), pseudo_random("d", 300_000)):
        for level in (1, 9):
            assert BLOCKPACK.deflate(data, level) == zlib.compress(data, level)
    with pytest.raises(ValueError, match="at most 1048576 bytes expected"):
        BLOCKPACK.deflate(bytes(MiB + 1), 9)
    with pytest.raises(ValueError, match="at most 1048576 bytes expected"):
        BLOCKPACK.compress_gzip(bytes(MiB + 1), 9, True)
    assert BLOCKPACK.compress_gzip(b"", 9, True) == (b"", STORED)
    with pytest.raises(ValueError, match="level 0"):
        BLOCKPACK.compress_gzip(b"abc", 0, True)
    with pytest.raises(ValueError, match="level 10"):
        BLOCKPACK.deflate(b"abc", 10)
    with pytest.raises(TypeError):
        BLOCKPACK.compress_gzip(bytearray(b"abc"), 9, True)  # type: ignore[arg-type]


@pytest.mark.parametrize("tail_fragments", [True, False])
def test_gzip_images_are_the_same_with_and_without_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tail_fragments: bool) -> None:
    tree = sample_tree(4096)
    compiled_image = build(tree, tmp_path / "c.sqfs", compress="gzip", block_size=4096,
                           tail_fragments=tail_fragments, threads=2).read_bytes()
    monkeypatch.setattr(compressors, "_blockpack", lambda: None)
    python_image = build(tree, tmp_path / "p.sqfs", compress="gzip", block_size=4096,
                         tail_fragments=tail_fragments, threads=2).read_bytes()
    assert compiled_image == python_image
