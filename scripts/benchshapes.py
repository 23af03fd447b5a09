"""The three tree shapes every image benchmark runs on, each as a tar and as a directory.

* ``minbase``: Debian bookworm minbase (~170 MB, ~8.7k entries), the test fixture's
  mmdebstrap tar (``$REPROBUILD_TEST_CACHE/bookworm-minbase.tar``) when present;
* ``devel``: minbase + python3, perl, gcc, g++, git, vim-nox, python3-numpy (~670 MB,
  ~23k entries), made with ``mmdebstrap --format=tar``;
* ``small-files``: 100,000 files of 100 bytes in 1,000 directories, generated
  (deterministic: the same bytes on every run and host).

Everything is made once and cached under ``$REPROBUILD_BENCH_CACHE`` (default
``/var/tmp/reprobuild-bench-cache``): ``NAME.tar`` and the unpacked ``NAME.d``. A cache
entry is renamed into place only when complete, so an interrupted run leaves nothing
that a later one trusts. Debian trees come from the host's own apt sources.

    python3 scripts/benchshapes.py [SHAPE ...]   # make (or find) and print the paths
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import blake3

CACHE = Path(os.environ.get("REPROBUILD_BENCH_CACHE", "/var/tmp/reprobuild-bench-cache"))
TEST_CACHE = Path(os.environ.get("REPROBUILD_TEST_CACHE", "/var/tmp/reprobuild-test-cache"))
SHAPES = ("minbase", "devel", "small-files")
DEVEL_PACKAGES = ("python3", "perl", "gcc", "g++", "git", "vim-nox", "python3-numpy")
SMALL_DIRS = 1_000
SMALL_FILES_PER_DIR = 100
SMALL_FILE_SIZE = 100
EPOCH = 1_700_000_000


@dataclass(frozen=True)
class Shape:
    """One benchmark tree: its name, the tar and the same tree unpacked."""

    name: str
    tar: Path
    directory: Path

    @property
    def entries(self) -> int:
        """Entries of the directory, the root included."""
        count = 1
        for _dirpath, dirs, files in os.walk(self.directory):
            count += len(dirs) + len(files)
        return count


def shape(name: str) -> Shape:
    """The cached shape ``name`` (made first when missing)."""
    if name not in SHAPES:
        raise SystemExit(f"benchshapes: unknown shape {name!r} (one of {', '.join(SHAPES)})")
    CACHE.mkdir(parents=True, exist_ok=True)
    if name == "small-files":
        directory = _small_files_directory(CACHE / "small-files.d")
        tar = _tar_of_directory(directory, CACHE / "small-files.tar")
        return Shape(name, tar, directory)
    tar = _debian_tar(name)
    return Shape(name, tar, _unpacked(tar, CACHE / f"{name}.d"))


def _valid_tar(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with tarfile.open(path, "r:") as archive:
            return archive.next() is not None
    except (tarfile.TarError, OSError, EOFError):
        return False


def _debian_tar(name: str) -> Path:
    if name == "minbase" and _valid_tar(TEST_CACHE / "bookworm-minbase.tar"):
        return TEST_CACHE / "bookworm-minbase.tar"
    target = CACHE / f"bookworm-{name}.tar"
    if _valid_tar(target):
        return target
    sources = next((Path(p) for p in ("/etc/apt/sources.list.d/debian.sources",
                                      "/etc/apt/sources.list") if Path(p).exists()), None)
    if sources is None or shutil.which("mmdebstrap") is None:
        raise SystemExit("benchshapes: needs mmdebstrap and the host's apt sources")
    # mmdebstrap picks the output format from the extension: the partial name ends in .tar.
    partial = CACHE / f"bookworm-{name}.{os.getpid()}.partial.tar"
    argv = ["mmdebstrap", "--variant=minbase", "--format=tar", "--quiet"]
    if name == "devel":
        argv.append("--include=" + ",".join(DEVEL_PACKAGES))
    argv += ["bookworm", str(partial), "-"]  # "-": the apt sources on stdin
    print(f"benchshapes: making {target} with mmdebstrap (minutes)", file=sys.stderr)
    with sources.open("rb") as stdin:
        result = subprocess.run(argv, stdin=stdin, check=False)
    if result.returncode != 0 or not _valid_tar(partial):
        partial.unlink(missing_ok=True)
        raise SystemExit(f"benchshapes: mmdebstrap failed for {name}")
    partial.rename(target)
    return target


def _unpacked(tar: Path, directory: Path) -> Path:
    """``tar`` unpacked at ``directory`` (device nodes only when running as root)."""
    if directory.is_dir():
        return directory
    partial = directory.with_name(f"{directory.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    argv = ["tar", "-xf", str(tar), "-C", str(partial), "--numeric-owner"]
    if os.getuid() != 0:
        argv += ["--exclude=./dev/*", "--no-same-owner"]
    subprocess.run(argv, check=True)
    partial.rename(directory)
    return directory


def small_file_bytes(index: int) -> bytes:
    """The 100 bytes of small file number ``index`` (blake3 XOF of the index)."""
    return blake3.blake3(index.to_bytes(4, "little")).digest(length=SMALL_FILE_SIZE)


def _small_files_directory(directory: Path) -> Path:
    if directory.is_dir():
        return directory
    partial = directory.with_name(f"{directory.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for d in range(SMALL_DIRS):
        sub = partial / f"d{d:03d}"
        sub.mkdir()
        for f in range(SMALL_FILES_PER_DIR):
            index = d * SMALL_FILES_PER_DIR + f
            (sub / f"f{f:02d}").write_bytes(small_file_bytes(index))
    for path in (partial, *partial.iterdir()):
        os.chmod(path, 0o755)
    partial.rename(directory)
    return directory


def _tar_of_directory(directory: Path, target: Path) -> Path:
    """A reproducible pax tar of ``directory`` (the flags of FORMATS.md)."""
    if _valid_tar(target):
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    subprocess.run(["tar", "--sort=name", "--format=pax", "--numeric-owner", "--owner=0",
                    "--group=0", f"--mtime=@{EPOCH}",
                    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                    "-cf", str(partial), "-C", str(directory), "."], check=True)
    partial.rename(target)
    return target


def add_shape_option(parser: argparse.ArgumentParser) -> None:
    """``--shape NAME`` (repeatable; all three when not given)."""
    parser.add_argument("--shape", action="append", choices=SHAPES,
                        help="benchmark tree shape (repeatable; default: all three)")


def chosen(args: argparse.Namespace) -> list[Shape]:
    """The shapes ``--shape`` asked for (all when none), made or found in the cache."""
    return [shape(name) for name in (args.shape or SHAPES)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="*", help=f"any of {', '.join(SHAPES)} (default: all)")
    args = parser.parse_args()
    for name in args.shapes or SHAPES:
        found = shape(name)
        print(f"{name}: tar {found.tar}, directory {found.directory}, "
              f"{found.entries} entries")


if __name__ == "__main__":
    main()
