"""fs-verity digests against ``fsverity digest`` over edge sizes and every option."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reprobuild.errors import ImageError
from reprobuild.integrity import blockhash, fsverity
from tests.conftest import need_tool

SIZES = [0, 1, 4095, 4096, 4097, 3 * 1024 * 1024 + 17]
OPTIONS = [
    ("sha256", 4096, b""),
    ("sha256", 1024, b""),
    ("sha512", 4096, b""),
    ("sha512", 1024, b"\x01\x02\x03"),
    ("sha256", 4096, bytes(range(32))),
    ("sha256", 1024, b"salt"),
]


def pattern(size: int) -> bytes:
    """Deterministic, non-repeating content."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


def reference(path: Path, algorithm: str, block_size: int, salt: bytes) -> str:
    need_tool("fsverity")
    cmd = ["fsverity", "digest", str(path), f"--hash-alg={algorithm}",
           f"--block-size={block_size}"]
    if salt:
        cmd.append(f"--salt={salt.hex()}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out.split()[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("fsverity")
    made = {}
    for size in SIZES:
        path = root / f"f{size}"
        path.write_bytes(pattern(size))
        made[size] = path
    return made


@pytest.mark.tool
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("algorithm", "block_size", "salt"), OPTIONS)
def test_digest_equals_fsverity_tool(files: dict[int, Path], size: int, algorithm: str,
                                     block_size: int, salt: bytes) -> None:
    path = files[size]
    expected = reference(path, algorithm, block_size, salt)
    kwargs = {"algorithm": algorithm, "block_size": block_size, "salt": salt}
    data = path.read_bytes()
    assert fsverity.format_digest(fsverity.digest_file(path, **kwargs), algorithm) == expected
    assert fsverity.format_digest(fsverity.digest_bytes(data, **kwargs), algorithm) == expected
    chunks = [data[i:i + 700001] for i in range(0, len(data), 700001)]
    assert fsverity.format_digest(fsverity.digest_chunks(chunks, **kwargs),
                                  algorithm) == expected


@pytest.mark.tool
def test_threaded_file_digest_equals_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    # Shrink the segments so a small file takes the multi-threaded path.
    monkeypatch.setattr(blockhash, "SEGMENT_SIZE", 64 * 1024)
    monkeypatch.setattr(blockhash, "THREADED_MIN", 0)
    path = tmp_path / "big"
    path.write_bytes(pattern(5 * 1024 * 1024 + 4097))
    ours = fsverity.digest_file(path, threads=3)
    assert fsverity.format_digest(ours) == reference(path, "sha256", 4096, b"")


def test_empty_file_has_zero_root_hash() -> None:
    p = fsverity.params()
    assert fsverity.root_hash_from_leaves(b"", p) == b"\0" * 32
    desc = fsverity.descriptor(0, b"\0" * 32, p)
    assert len(desc) == 256
    assert fsverity.digest_bytes(b"") == hashlib.sha256(desc).digest()


def test_one_bit_changes_digest() -> None:
    data = bytearray(pattern(10000))
    before = fsverity.digest_bytes(data)
    data[9999] ^= 1
    assert fsverity.digest_bytes(data) != before


@pytest.mark.parametrize(("algorithm", "block_size", "salt"), [
    ("md5", 4096, b""), ("sha256", 512, b""), ("sha256", 3000, b""),
    ("sha256", 4096, b"x" * 33)])
def test_bad_parameters_are_refused(algorithm: str, block_size: int, salt: bytes) -> None:
    with pytest.raises(ImageError):
        fsverity.digest_bytes(b"abc", algorithm=algorithm, block_size=block_size, salt=salt)


@pytest.mark.tool
def test_cli_prints_like_fsverity(files: dict[int, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from reprobuild.cli import main

    need_tool("fsverity")
    paths = [str(files[0]), str(files[4097])]
    args = ["--hash-alg=sha512", "--block-size=1024", "--salt=0a0b"]
    assert main(["fsverity", "digest", *paths, *args]) == 0
    expected = subprocess.run(["fsverity", "digest", *paths, *args], check=True,
                              capture_output=True, text=True).stdout
    assert capsys.readouterr().out == expected


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=20000), cuts=st.lists(st.integers(0, 20000), max_size=6),
       block_size=st.sampled_from([1024, 4096]), salt=st.binary(max_size=32))
def test_streaming_equals_whole(data: bytes, cuts: list[int], block_size: int,
                                salt: bytes) -> None:
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    kwargs = {"block_size": block_size, "salt": salt}
    batch = fsverity._BATCH
    fsverity._BATCH = 3000  # exercise the batching with small inputs
    try:
        streamed = fsverity.digest_chunks(chunks, **kwargs)
    finally:
        fsverity._BATCH = batch
    assert streamed == fsverity.digest_bytes(data, **kwargs)
