"""dm-verity hash trees against ``veritysetup format`` and ``veritysetup verify``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reprobuild.errors import ImageError, VerifyError
from reprobuild.integrity import verity
from tests.conftest import need_tool
from tests.patterns import pattern

UUID = "0f1e2d3c-4b5a-4968-8776-655443322110"


def veritysetup_format(data: Path, hash_file: Path, *, algorithm: str, data_block_size: int,
                       hash_block_size: int, salt: bytes, hash_offset: int = 0) -> str:
    need_tool("veritysetup")
    cmd = ["veritysetup", "format", str(data), str(hash_file), f"--hash={algorithm}",
           f"--data-block-size={data_block_size}", f"--hash-block-size={hash_block_size}",
           f"--uuid={UUID}", f"--salt={salt.hex() if salt else '-'}"]
    if hash_offset:
        blocks = data.stat().st_size // data_block_size if data != hash_file else \
            hash_offset // data_block_size
        cmd += [f"--hash-offset={hash_offset}", f"--data-blocks={blocks}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("Root hash"))


CASES = [
    # algorithm, data block, hash block, data blocks, salt
    ("sha256", 4096, 4096, 1, b""),
    ("sha256", 4096, 4096, 129, bytes(range(32))),
    ("sha256", 4096, 4096, 16385, b"\x00\x11\x22\x33"),
    ("sha256", 512, 512, 300, b"salt"),
    ("sha256", 1024, 4096, 2000, b"\xff" * 256),
    ("sha256", 4096, 1024, 40, b"\x01"),
    ("sha1", 4096, 4096, 129, b"\x02\x03"),
    ("sha1", 512, 512, 1000, b""),
    ("sha1", 1024, 1024, 257, bytes(range(17))),
    ("sha512", 4096, 4096, 65, b"\x09" * 32),
    ("sha512", 512, 512, 333, b""),
    ("sha512", 1024, 4096, 1, b"x"),
]


@pytest.mark.tool
@pytest.mark.parametrize(("algorithm", "data_block_size", "hash_block_size", "blocks", "salt"),
                         CASES)
def test_hash_file_is_byte_identical_to_veritysetup(
        tmp_path: Path, algorithm: str, data_block_size: int, hash_block_size: int,
        blocks: int, salt: bytes) -> None:
    data = tmp_path / "data"
    data.write_bytes(pattern(blocks * data_block_size))
    kwargs = {"algorithm": algorithm, "data_block_size": data_block_size,
              "hash_block_size": hash_block_size, "salt": salt}
    expected_root = veritysetup_format(data, tmp_path / "ref", **kwargs)  # type: ignore[arg-type]
    result = verity.format(data, tmp_path / "ours", uuid=UUID, **kwargs)  # type: ignore[arg-type]
    assert result.root_hash_hex == expected_root
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "ref").read_bytes()
    assert result.hash_size == (tmp_path / "ours").stat().st_size
    subprocess.run(["veritysetup", "verify", str(data), str(tmp_path / "ours"), expected_root],
                   check=True, capture_output=True)
    verity.verify(data, tmp_path / "ref", expected_root)


@pytest.mark.tool
def test_appended_hash_tree_matches_veritysetup(tmp_path: Path) -> None:
    payload = pattern(300 * 4096, seed=1)
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    ours.write_bytes(payload)
    ref.write_bytes(payload)
    offset = len(payload)
    expected_root = veritysetup_format(ref, ref, algorithm="sha256", data_block_size=4096,
                                       hash_block_size=4096, salt=b"\x42",
                                       hash_offset=offset)
    result = verity.format(ours, ours, salt=b"\x42", uuid=UUID, hash_offset=offset,
                           data_blocks=300)
    assert result.root_hash_hex == expected_root
    assert ours.read_bytes() == ref.read_bytes()
    subprocess.run(["veritysetup", "verify", str(ours), str(ours), expected_root,
                    f"--hash-offset={offset}"], check=True, capture_output=True)
    verity.verify(ours, ours, expected_root, hash_offset=offset)


def test_flipped_data_bit_names_the_block(tmp_path: Path) -> None:
    data, hash_file = tmp_path / "data", tmp_path / "hash"
    data.write_bytes(pattern(500 * 4096, seed=2))
    result = verity.format(data, hash_file)
    verity.verify(data, hash_file, result.root_hash_hex)
    with data.open("r+b") as f:
        f.seek(377 * 4096 + 1234)
        byte = f.read(1)
        f.seek(377 * 4096 + 1234)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(VerifyError, match=r"data block 377 \(bytes 1544192\.\.1548287\)"):
        verity.verify(data, hash_file, result.root_hash_hex)


def test_flipped_hash_bit_names_the_hash_block(tmp_path: Path) -> None:
    data, hash_file = tmp_path / "data", tmp_path / "hash"
    data.write_bytes(pattern(500 * 4096, seed=3))
    result = verity.format(data, hash_file)
    layout = verity.plan(algorithm="sha256", data_block_size=4096, hash_block_size=4096,
                         data_blocks=500)
    assert layout.level_blocks == (4, 1)
    leaf_block = layout.level_start[0] + 2
    raw = bytearray(hash_file.read_bytes())
    raw[leaf_block * 4096 + 7] ^= 1
    hash_file.write_bytes(bytes(raw))
    with pytest.raises(VerifyError, match=rf"hash block {leaf_block} \(level 0\)"):
        verity.verify(data, hash_file, result.root_hash)
    with pytest.raises(VerifyError, match="root hash"):
        verity.verify(data, hash_file, b"\0" * 32)


@pytest.mark.tool
def test_veritysetup_rejects_our_tree_after_a_flip(tmp_path: Path) -> None:
    need_tool("veritysetup")
    data, hash_file = tmp_path / "data", tmp_path / "hash"
    data.write_bytes(pattern(64 * 4096, seed=4))
    result = verity.format(data, hash_file)
    ok = subprocess.run(["veritysetup", "verify", str(data), str(hash_file),
                         result.root_hash_hex], capture_output=True)
    assert ok.returncode == 0
    with data.open("r+b") as f:
        f.seek(10)
        f.write(b"\xaa")
    bad = subprocess.run(["veritysetup", "verify", str(data), str(hash_file),
                          result.root_hash_hex], capture_output=True)
    assert bad.returncode != 0


def test_salt_and_uuid_derive_from_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(pattern(8 * 4096, seed=5))
    b.write_bytes(pattern(8 * 4096, seed=6))
    first = verity.format(a, tmp_path / "ha")
    again = verity.format(a, tmp_path / "ha2")
    other = verity.format(b, tmp_path / "hb")
    assert (first.salt, first.uuid, first.root_hash) == (again.salt, again.uuid,
                                                         again.root_hash)
    assert (tmp_path / "ha").read_bytes() == (tmp_path / "ha2").read_bytes()
    assert first.salt != other.salt and first.uuid != other.uuid
    assert len(first.salt) == 32


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x" * 5000)
    with pytest.raises(ImageError, match="not a multiple"):
        verity.format(data, tmp_path / "hash")
    with pytest.raises(ImageError, match="algorithm"):
        verity.format(data, tmp_path / "hash", algorithm="md5", data_blocks=1)
    with pytest.raises(ImageError, match="overlaps"):
        verity.format(data, data, data_blocks=1, hash_offset=0)
    with pytest.raises(ImageError, match="block size"):
        verity.plan(algorithm="sha256", data_block_size=3000, hash_block_size=4096,
                    data_blocks=1)


def test_cli_format_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reprobuild.cli import main

    data, hash_file = tmp_path / "data", tmp_path / "hash"
    data.write_bytes(pattern(40 * 4096, seed=7))
    assert main(["verity", "format", str(data), str(hash_file), "--salt", "00ff",
                 "--uuid", UUID]) == 0
    root = capsys.readouterr().out.strip()
    assert root == verity.format(data, tmp_path / "again", salt=b"\x00\xff",
                                 uuid=UUID).root_hash_hex
    assert main(["verity", "verify", str(data), str(hash_file), root]) == 0
    with data.open("r+b") as f:
        f.seek(39 * 4096)
        f.write(b"\x01")
    capsys.readouterr()
    assert main(["verity", "verify", str(data), str(hash_file), root]) == 1
    assert "data block 39 " in capsys.readouterr().err
