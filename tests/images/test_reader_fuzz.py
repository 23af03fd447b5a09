"""Every image reader survives damaged images: only ReprobuildError, bounded memory.

Each format's small valid image is mutated with a fixed seed (see
:mod:`tests.images.reader_fuzz`) and read back in a subprocess whose address space is
capped; a traceback, a MemoryError or a hang is a failure that names the mutation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.images.reader_fuzz import VARIANTS

QUICK = 400  # mutants per variant in the default run: about a second or two each
QUICK_DIFF = 150
LONG = 5000


def run_fuzzer(variant: str, count: int, seed: int, *extra: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.images.reader_fuzz", variant, "--count", str(count),
         "--seed", str(seed), *extra], cwd=REPO, capture_output=True, text=True, timeout=900,
        check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary: dict[str, object] = json.loads(result.stdout)
    return summary


def _report(summary: dict[str, object]) -> str:
    crashes = summary["crashes"]
    assert isinstance(crashes, list)
    return "\n".join(f"{c['mutation']}: {c['error']}\n{c['where']}" for c in crashes[:5])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mutated_images_give_only_clean_errors(variant: str) -> None:
    summary = run_fuzzer(variant, QUICK, seed=1)
    assert summary["crashes"] == [], _report(summary)
    assert summary["mutants"] == QUICK


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_diff_against_mutated_images_gives_only_clean_errors(variant: str) -> None:
    summary = run_fuzzer(variant, QUICK_DIFF, 3, "--via-diff")
    assert summary["crashes"] == [], _report(summary)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mutated_images_long_run(variant: str) -> None:
    summary = run_fuzzer(variant, LONG, seed=2)
    assert summary["crashes"] == [], _report(summary)
    summary = run_fuzzer(variant, LONG // 5, 4, "--via-diff")
    assert summary["crashes"] == [], _report(summary)


CRAFTED_EXT4 = """
import struct, sys
from tests.images.reader_fuzz import build_image, limit_memory
from pathlib import Path
from reprobuild.errors import ReprobuildError
from reprobuild.images.ext4.read import read_image
image = build_image("ext4", Path(sys.argv[1]))
data = bytearray(image.read_bytes())
# s_blocks_count_lo = 2^32 - 1, s_blocks_per_group = 1: four billion block groups
struct.pack_into("<I", data, 1024 + 4, 0xFFFFFFFF)
struct.pack_into("<I", data, 1024 + 32, 1)
image.write_bytes(data)
limit_memory(64 << 20)
try:
    read_image(image)
except ReprobuildError as exc:
    print(exc)
"""


def test_crafted_ext4_group_count_is_refused_within_bounded_memory(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CRAFTED_EXT4, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "block groups do not fit in the image" in result.stdout


CRAFTED_TAR = """
import io, os, sys, tarfile
from tests.images.reader_fuzz import limit_memory
from reprobuild.errors import ReprobuildError
from reprobuild.trees.tar_reader import tree_from_tar
path = os.path.join(sys.argv[1], "a.tar")
with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
    info = tarfile.TarInfo("x" * 150)  # a long name: a pax header comes first
    info.size = 5
    archive.addfile(info, io.BytesIO(b"hello"))
raw = bytearray(open(path, "rb").read())
raw[124:136] = b"77777777777\\0"  # the pax header claims 8 GiB
raw[148:156] = b" " * 8
raw[148:156] = b"%06o\\0 " % sum(raw[:512])
open(path, "wb").write(raw)
limit_memory(64 << 20)
try:
    tree_from_tar(path)
except ReprobuildError as exc:
    print(exc)
"""


def test_tar_header_claiming_gigabytes_is_refused_within_bounded_memory(tmp_path: Path
                                                                         ) -> None:
    result = subprocess.run([sys.executable, "-c", CRAFTED_TAR, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not a readable tar archive" in result.stdout
