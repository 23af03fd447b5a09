"""The FAT writer against the reference tools: fsck.fat finds nothing, mtools reads back
every file and shows Windows' and Linux's names, our reader reads what mkfs.fat and
mcopy write, the geometry is mkfs.fat's, and ``reprobuild image`` makes one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reprobuild.images.vfat import image as vfat
from reprobuild.images.vfat.geometry import choose
from reprobuild.images.vfat.ondisk import FAT_BOOT_SECTOR, SECTOR
from tests.conftest import need_tool
from tests.images.hostconditions import write_tree
from tests.images.vfat_images import SAMPLE_IDS, SAMPLE_TYPES, TOOL_ENV, write_sample_image
from tests.images.vfat_trees import EPOCH, NAMES, SHORT_ONLY, fat_view, vfat_tree


@pytest.fixture(scope="module", params=SAMPLE_TYPES, ids=SAMPLE_IDS)
def sample_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> Path:
    return write_sample_image(request.param, tmp_path_factory.mktemp("vfat"))


# -- the reference tools --------------------------------------------------------------
@pytest.mark.tool
def test_fsck_fat_finds_nothing(sample_image: Path) -> None:
    need_tool("fsck.fat")
    result = subprocess.run(["fsck.fat", "-n", "-v", str(sample_image)], capture_output=True,
                            text=True, env=TOOL_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines()
                if re.search(r"(?i)wrong|invalid|differ|bad|mismatch|lost|correct", line)]
    assert problems == [], result.stdout


@pytest.mark.tool
def test_mcopy_reads_back_every_file(sample_image: Path, tmp_path: Path) -> None:
    need_tool("mcopy")
    out = tmp_path / "copy"
    out.mkdir()
    subprocess.run(["mcopy", "-s", "-m", "-i", str(sample_image), "::/", str(out)], check=True,
                   capture_output=True, env=TOOL_ENV)
    got = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(out)):
        rel = os.path.relpath(dirpath, os.fsencode(out))
        for name in dirnames:
            got[os.path.normpath(os.path.join(rel, name))] = ("directory", b"", None)
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as stream:
                data = stream.read()
            got[os.path.normpath(os.path.join(rel, name))] = (
                "regular", data, int(os.stat(path).st_mtime))
    want = {path: (kind, data, mtime if kind == "regular" else None)
            for path, (kind, data, mtime) in fat_view(vfat_tree()).items()}
    assert got == want


@pytest.mark.tool
def test_mdir_shows_long_names_and_aliases(sample_image: Path) -> None:
    need_tool("mdir")
    listing = subprocess.run(["mdir", "-i", str(sample_image), "::/"], check=True,
                             capture_output=True, env=TOOL_ENV).stdout.decode()
    assert "Volume in drive : is ESP" in listing
    for name, short in NAMES.items():
        base, ext = short[:8].rstrip(), short[8:].rstrip()
        text = name.decode()
        if name in SHORT_ONLY:
            # No long name: mdir shows the 8.3 name with the NT case bits applied.
            shown_base, shown_ext = text.rsplit(".", 1)
            pattern = rf"^{re.escape(shown_base)}\s+{re.escape(shown_ext)}\s+\d+ [^A-Za-z]*$"
        else:
            pattern = rf"^{re.escape(base)}\s+{re.escape(ext)}\s+\d+ .* {re.escape(text)}$"
        assert re.search(pattern, listing, re.M), (name, short, listing)
    entries = subprocess.run(["mdir", "-i", str(sample_image), "::/loader/entries"],
                             check=True, capture_output=True, env=TOOL_ENV).stdout.decode()
    for number in range(12):
        alias = f"ENTRY-~{number + 1}" if number < 9 else f"ENTRY~{number + 1}"
        assert re.search(rf"^{alias}\s+CON .* entry-{number:02d}-long-name.conf$", entries,
                         re.M), entries


@pytest.mark.tool
@pytest.mark.parametrize("bits", ["12", "16", "32"])
def test_reader_reads_what_mkfs_fat_and_mcopy_write(bits: str, tmp_path: Path) -> None:
    need_tool("mkfs.fat", "mcopy")
    source = tmp_path / "source"
    tree = vfat_tree()
    tree.remove(b"times")  # mcopy has its own ideas about times FAT cannot hold
    write_tree(tree, source)
    image = tmp_path / "reference.img"
    subprocess.run(["mkfs.fat", "-C", "-F", bits, str(image), "40000"], check=True,
                   capture_output=True)
    subprocess.run(["mcopy", "-s", "-m", "-i", str(image),
                    *sorted(str(path) for path in source.iterdir()), "::/"],
                   check=True, capture_output=True, env=TOOL_ENV)
    assert fat_view(vfat.read(image)) == fat_view(tree)


# -- geometry ---------------------------------------------------------------------------
SIZES_KIB = (1024, 3000, 4100, 9000, 20_000, 65_536, 140_000, 270_000, 524_288, 600_000,
             1_048_576, 9_000_000)


@pytest.mark.tool
@pytest.mark.parametrize("bits", [None, 12, 16, 32])
def test_geometry_is_mkfs_fat_s(bits: int | None, tmp_path: Path) -> None:
    need_tool("mkfs.fat")
    for kib in SIZES_KIB:
        image = tmp_path / f"{kib}.img"
        result = subprocess.run(["mkfs.fat", "-C", str(image), str(kib),
                                 *(["-F", str(bits)] if bits else [])], capture_output=True)
        geometry = choose(kib * 1024, fat_bits=bits)
        if result.returncode:
            assert geometry is None, (kib, bits)
            continue
        with image.open("rb") as stream:  # only the boot sector: the image may be 9 GB
            head = stream.read(SECTOR)
        image.unlink()
        (_, _, _, spc, reserved, _, root, total16, _, fat16, spt, heads, _, total32
         ) = FAT_BOOT_SECTOR.unpack_from(head)
        fat_length = fat16 or int.from_bytes(head[36:40], "little")
        theirs = (32 if fat16 == 0 else int(head[57:59]), total16 or total32, spc, reserved,
                  fat_length, root, spt, heads)
        assert geometry is not None, (kib, bits)
        assert (geometry.fat_bits, geometry.total_sectors, geometry.sectors_per_cluster,
                geometry.reserved_sectors, geometry.fat_length, geometry.root_entries,
                geometry.sectors_per_track, geometry.heads) == theirs, (kib, bits)


# -- the command line ----------------------------------------------------------------------
@pytest.mark.tool
def test_reprobuild_image_command(tmp_path: Path) -> None:
    need_tool("fsck.fat")
    source = tmp_path / "source"
    write_tree(vfat_tree(), source)
    out = tmp_path / "esp.img"
    result = subprocess.run(
        [sys.executable, "-m", "reprobuild", "image", "--format", "vfat", "--epoch",
         str(EPOCH), "--label", "ESP", "-o", "fat=16", "-o", "volume_id=ABCD-1234",
         str(source), str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    head = out.read_bytes()[:512]
    assert head[54:62] == b"FAT16   " and head[39:43] == bytes.fromhex("3412cdab")
    assert subprocess.run(["fsck.fat", "-n", str(out)], capture_output=True).returncode == 0
    refused = subprocess.run(
        [sys.executable, "-m", "reprobuild", "image", "--format", "vfat", "-o", "fat=12",
         "--size", "300M", str(source), str(tmp_path / "no.img")], capture_output=True,
        text=True, cwd=tmp_path)
    assert refused.returncode == 2 and "no FAT12 file system fits" in refused.stderr
    assert not (tmp_path / "no.img").exists()
