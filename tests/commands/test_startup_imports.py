"""What a command imports: only what the chosen command and format need.

Each case runs the command line in a fresh interpreter and reads ``sys.modules`` after
it: the modules a command must not load (Dask, the cloud and crypto libraries, the
build engine, readers it has no input for) are a deny-list, and a module the command
does need is checked too, so that the probe is known to have seen a real run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
from reprobuild.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""
HEAVY = ("dask", "distributed", "boto3", "botocore", "cryptography", "urllib3", "elftools",
         "msgpack", "reprobuild.build", "reprobuild.cache", "reprobuild.distributed",
         "reprobuild.proof", "reprobuild.store")
TAR_IMAGE_NEVER = (*HEAVY, "reprobuild.trees.overrides", "tomllib", "traceback",
                   "difflib", "reprobuild.images.ext4", "reprobuild.images.squashfs",
                   "reprobuild.images.composefs")
# A directory source needs neither the tar nor the OCI reader, nor what they load; a
# plain archive needs no compressor; shutil (loaded by tempfile) loads bz2 and lzma.
DIRECTORY_SOURCE_NEVER = ("tarfile", "lzma", "bz2", "gzip", "zstandard", "shutil",
                          "tempfile", "reprobuild.trees.oci", "reprobuild.trees.tar_reader")
HELP_NEVER = (*TAR_IMAGE_NEVER, "reprobuild.images.build", "reprobuild.trees.load",
              "reprobuild.trees.tree", "reprobuild.trees.tar_reader", "blake3",
              "zstandard")


def imported(*argv: str) -> tuple[int, list[str]]:
    """The exit code of ``reprobuild ARGV`` and every module loaded by its end."""
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True,
                            text=True, check=True, timeout=120)
    found = json.loads(result.stdout.splitlines()[-1])
    return found["code"], found["modules"]


def loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that are one of ``names`` or inside one."""
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def test_a_tar_image_loads_the_tar_writer_and_nothing_heavy(tmp_path: Path) -> None:
    source = tmp_path / "tree"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "hostname").write_text("box\n")
    code, modules = imported("image", "--format", "tar", str(source),
                             str(tmp_path / "out.tar"))
    assert code == 0 and (tmp_path / "out.tar").stat().st_size > 0
    assert "reprobuild.images.tar" in modules and "reprobuild.trees.directory" in modules
    assert loaded(modules, TAR_IMAGE_NEVER) == []


@pytest.mark.parametrize("fmt", ["tar", "cpio", "erofs", "composefs", "vfat"])
def test_an_image_of_a_directory_loads_no_archive_reader(tmp_path: Path, fmt: str) -> None:
    source = tmp_path / "tree"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "hostname").write_text("box\n")
    output = tmp_path / f"out.{fmt}"
    code, modules = imported("image", "--format", fmt, str(source), str(output))
    assert code == 0 and output.stat().st_size > 0
    assert "reprobuild.trees.directory" in modules
    assert loaded(modules, DIRECTORY_SOURCE_NEVER) == []
    # The archives hash no file's bytes (erofs and vfat derive their UUIDs with blake3).
    assert ("blake3" in modules) == (fmt in ("erofs", "vfat"))
    # The partial image was renamed into place: nothing else is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tree", output.name])


def test_an_image_of_a_tar_still_loads_the_tar_reader(tmp_path: Path) -> None:
    source = tmp_path / "tree"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "hostname").write_text("box\n")
    assert imported("image", "--format", "tar", str(source), str(tmp_path / "a.tar"))[0] == 0
    code, modules = imported("image", "--format", "cpio", str(tmp_path / "a.tar"),
                             str(tmp_path / "b.cpio"))
    assert code == 0 and (tmp_path / "b.cpio").stat().st_size > 0
    assert "reprobuild.trees.tar_reader" in modules


@pytest.mark.parametrize("argv", [("image", "--help"), ("--help",), ("image",)])
def test_help_and_usage_errors_load_only_the_command_line(argv: tuple[str, ...]) -> None:
    code, modules = imported(*argv)
    assert code in (0, 2)
    assert "argparse" in modules and "reprobuild.cli" in modules
    assert loaded(modules, HELP_NEVER) == []


def test_top_level_help_loads_no_command() -> None:
    _, modules = imported("--help")
    assert [m for m in modules if m.startswith("reprobuild.")] == ["reprobuild.cli",
                                                                   "reprobuild.errors"]
