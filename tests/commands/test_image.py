"""`reprobuild image`: directory, tar and OCI sources, overrides, no partial output."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprobuild.cli import main
from reprobuild.errors import ImageError
from reprobuild.images import cpio, tar
from reprobuild.images.build import build_tree_image
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.load import load_tree
from reprobuild.units import parse_duration, parse_size
from tests.archive_helpers import file, write_tar
from tests.trees.test_oci import layers, make_layout

EPOCH = 1_700_000_000


def source_dir(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "shadow").write_bytes(b"root:*:\n")
    (root / "bin").mkdir()
    (root / "bin" / "ping").write_bytes(b"\x7fELF")
    return root


def test_directory_to_tar_equals_the_library(tmp_path: Path) -> None:
    src = source_dir(tmp_path / "src")
    out = tmp_path / "out.tar"
    assert main(["image", "--format", "tar", "--epoch", str(EPOCH), str(src), str(out)]) == 0
    expected = io.BytesIO()
    tar.write(load_tree(src, epoch=EPOCH), expected, ImageOptions(epoch=EPOCH))
    assert out.read_bytes() == expected.getvalue()
    assert sorted(os.listdir(tmp_path)) == ["out.tar", "src"]


def test_overrides_file(tmp_path: Path) -> None:
    src = source_dir(tmp_path / "src")
    files = tmp_path / "files.toml"
    files.write_text('"/etc/shadow" = { mode = "0640", gid = 42 }\n'
                     '"/bin/ping" = { mode = "4755" }\n'
                     '"/dev" = { type = "dir" }\n'
                     '"/dev/console" = { type = "char", major = 5, minor = 1, mode = "0600" }\n')
    out = tmp_path / "out.cpio"
    assert main(["image", "-t", "cpio", "--epoch", str(EPOCH), "--files", str(files),
                 str(src), str(out)]) == 0
    tree = cpio.read(out)
    shadow, ping, console = (tree.get(p) for p in (b"etc/shadow", b"bin/ping", b"dev/console"))
    assert shadow is not None and (shadow.mode, shadow.gid) == (0o640, 42)
    assert ping is not None and ping.mode == 0o4755
    assert console is not None and (console.rdev_major, console.rdev_minor) == (5, 1)


def test_tar_and_oci_sources(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "in.tar", [file("a", b"1"), file("b/c", b"2")])
    assert main(["image", "-t", "tar", "--epoch", str(EPOCH), str(archive),
                 str(tmp_path / "a.tar")]) == 0
    assert tar.read(tmp_path / "a.tar").get(b"b/c") is not None
    layout = make_layout(tmp_path / "oci", layers(EPOCH - 10))
    assert main(["image", "-t", "tar", "--epoch", str(EPOCH), str(layout),
                 str(tmp_path / "oci.tar")]) == 0
    assert tar.read(tmp_path / "oci.tar").get(b"sbin/tool2") is not None


def test_epoch_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = write_tar(tmp_path / "in.tar", [file("a", b"1", mtime=EPOCH + 100)])
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
    assert main(["image", "-t", "tar", str(archive), str(tmp_path / "o.tar")]) == 0
    entry = tar.read(tmp_path / "o.tar").get(b"a")
    assert entry is not None and entry.mtime_ns == EPOCH * 10**9


def test_failure_leaves_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = write_tar(tmp_path / "evil.tar", [file("a", b"1"), file("../b", b"2")])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.tar").write_bytes(b"previous")
    code = main(["image", "-t", "tar", str(archive), str(out_dir / "old.tar")])
    assert code == 2
    assert "contains '..'" in capsys.readouterr().err
    assert os.listdir(out_dir) == ["old.tar"]
    assert (out_dir / "old.tar").read_bytes() == b"previous"
    # A writer failure (a socket in tar) also removes the partial file.
    src = tmp_path / "src"
    src.mkdir()
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "sock"))
        assert main(["image", "-t", "tar", str(src), str(out_dir / "new.tar")]) == 2
    assert os.listdir(out_dir) == ["old.tar"]


def test_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["image", "-t", "tar", "--size", "lots", str(tmp_path), str(tmp_path / "o")])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["image", "-t", "ntfs", str(tmp_path), str(tmp_path / "o")])
    assert main(["image", "-t", "tar", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    with pytest.raises(ImageError, match="made from other images"):
        build_tree_image("gpt", str(tmp_path), str(tmp_path / "o"), ImageOptions(epoch=0))


def test_units() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("512KiB") == 512 << 10
    assert parse_size("4096") == 4096
    assert parse_size(100) == 100
    assert parse_size("min") is None
    for bad in ("", "0", "-1M", "1.5G", "12X", 0, True):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
    assert parse_duration("30s") == 30.0
    assert parse_duration("5m") == 300.0
    assert parse_duration("1h") == 3600.0
    assert parse_duration(7) == 7.0
    for bad in ("0s", "1d", "", -3):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_platform_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = make_layout(tmp_path / "oci", [([file("a", b"1")], "gzip")],
                         platforms=[("linux", "arm64"), ("linux", "s390x")])
    out = tmp_path / "o.tar"
    assert main(["image", "-t", "tar", str(layout), str(out)]) == 2
    assert "no manifest for linux/amd64" in capsys.readouterr().err
    assert main(["image", "-t", "tar", "--platform", "linux/s390x", str(layout), str(out)]) == 0
    assert tar.read(out).get(b"a") is not None
    with pytest.raises(SystemExit):
        main(["image", "-t", "tar", "--platform", "arm64", str(layout), str(out)])


def test_same_bytes_as_another_user(tmp_path: Path, unprivileged: object) -> None:
    """Another uid, umask, HOME and working directory: the same image bytes."""
    from tests.conftest import Unprivileged

    assert isinstance(unprivileged, Unprivileged)
    scratch = unprivileged.scratch("image-uid")
    src = source_dir(scratch / "src")
    for path in [src, *src.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for fmt in ("tar", "cpio"):
        mine = tmp_path / f"mine.{fmt}"
        assert main(["image", "-t", fmt, "--epoch", str(EPOCH), str(src), str(mine)]) == 0
        theirs = scratch / f"theirs.{fmt}"
        result = unprivileged.reprobuild("image", "-t", fmt, "--epoch", str(EPOCH), str(src),
                                         str(theirs), env={"TZ": "Pacific/Chatham"},
                                         cwd=scratch)
        assert result.returncode == 0, result.stderr
        assert theirs.read_bytes() == mine.read_bytes()


def test_output_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = source_dir(tmp_path / "src")
    assert main(["image", "-t", "tar", str(src), str(tmp_path / "no" / "o.tar")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["image", "-t", "tar", str(src), str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


FREEZE_PROBE = """
import gc, sys
from reprobuild.cli import main
sys.argv = ["reprobuild", *sys.argv[1:]]
code = main()  # the process's own command line, as the console script runs it
print(code, gc.get_freeze_count())
"""


def test_the_image_command_leaves_its_objects_to_the_exit(tmp_path: Path) -> None:
    """Run as the process's command (argv from sys.argv), the image command freezes
    what is left, so the interpreter's last collection does not walk it; called with an
    argument list (in a process that goes on), it leaves the collector as it was."""
    source = tmp_path / "tree"
    source.mkdir()
    (source / "file").write_bytes(b"x" * 100)
    result = subprocess.run([sys.executable, "-c", FREEZE_PROBE, "image", "--format",
                             "composefs", str(source), str(tmp_path / "a.cfs")],
                            capture_output=True, text=True, check=True)
    code, frozen = result.stdout.split()[-2:]
    assert code == "0" and int(frozen) > 0
    before = gc.get_freeze_count()
    assert main(["image", "--format", "composefs", str(source), str(tmp_path / "b.cfs")]) == 0
    assert gc.get_freeze_count() == before
    assert (tmp_path / "a.cfs").read_bytes() == (tmp_path / "b.cfs").read_bytes()
