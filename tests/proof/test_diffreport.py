"""Difference reports for directories, plain files, tree images and GPT disks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from reprobuild.cli import main
from reprobuild.images.registry import get_format
from reprobuild.proof import bytediff, diffreport
from tests.conftest import need, need_tool

EPOCH = 1700000000


def _make_tree(root: Path, *, variant: bool) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "etc" / "hostname").write_bytes(b"builder-a\n" if not variant else b"builder-b\n")
    (root / "etc" / "same").write_bytes(b"same bytes\n" * 10)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755 if not variant else 0o700)
    (root / "bin" / "link").symlink_to("other" if variant else "tool")
    if variant:
        (root / "extra").write_bytes(b"x")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)
    return root


def _kinds(report: diffreport.DiffReport) -> set[tuple[str, str]]:
    return set(report.summary())


EXPECTED = {("/etc/hostname", "content"), ("/bin/tool", "mode"), ("/bin/link", "target"),
            ("/extra", "only-in-b")}


def test_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _make_tree(tmp_path / "a", variant=False)
    b = _make_tree(tmp_path / "b", variant=True)
    report = diffreport.diff_paths(a, b)
    assert not report.identical
    assert _kinds(report) >= EXPECTED
    assert ("/etc/same", "content") not in _kinds(report)
    text = report.render()
    assert "first differing byte at offset 8" in text
    assert "|builder-a.|" in text and "|builder-b.|" in text
    assert main(["diff", str(a), str(b)]) == 1
    assert main(["diff", str(a), str(a)]) == 0
    assert main(["diff", "--json", str(a), str(b)]) == 1
    doc = json.loads(capsys.readouterr().out.split("identical\n")[-1])
    assert {(d["path"], d["kind"]) for d in doc["differences"]} >= EXPECTED


def test_order_hint(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for side, names in ((a, "b\na\nc\n"), (b, "c\na\nb\n")):
        side.mkdir()
        (side / "listing").write_text(names)
        (side / "other").write_text(names.replace("\n", ""))
    text = diffreport.diff_paths(a, b, compare_owner=False).render()
    assert text.count("the same lines in another order") == 1
    assert "/listing: content" in text and "/other: content" in text
    assert diffreport.order_hint(b"a\nb\n", b"a\nc\n") is None


def test_plain_files_hexdump(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    data = bytes(range(256)) * 4
    a.write_bytes(data)
    b.write_bytes(data[:700] + b"\xff" + data[701:] + b"tail")
    report = diffreport.diff_paths(a, b)
    assert report.kind_a == "file" and report.byte_difference is not None
    assert report.byte_difference.offset == 700
    assert (report.byte_difference.size_a, report.byte_difference.size_b) == (1024, 1028)
    text = report.render()
    assert "offset 700 (0x2bc)" in text
    assert "- 000002b0  b0 b1 b2 b3 b4 b5 b6 b7 b8 b9 ba bb bc bd be bf" in text
    assert "+ 000002b0  b0 b1 b2 b3 b4 b5 b6 b7 b8 b9 ba bb ff bd be bf" in text
    # 16 bytes per line, about four lines around the offset.
    assert len(report.byte_difference.dump_a) == bytediff.HEX_LINES
    c = tmp_path / "c.bin"
    c.write_bytes(data)
    assert diffreport.diff_paths(a, c).identical
    # Result links are followed on request (the CLI does); otherwise links compare.
    (tmp_path / "link-b").symlink_to(b)
    (tmp_path / "link-c").symlink_to(c)
    assert diffreport.diff_paths(a, tmp_path / "link-c", follow_symlinks=True).identical
    assert diffreport.diff_paths(tmp_path / "link-b", tmp_path / "link-c").summary() == [
        ("/", "target")]
    assert main(["diff", str(a), str(tmp_path / "link-b")]) == 1
    assert main(["diff", str(a), str(tmp_path / "link-c")]) == 0


def _has_reader(fmt: str) -> bool:
    try:
        module = get_format(fmt).load()
    except ImportError:
        return False
    return hasattr(module, "read")


def _image(kind: str, src: Path, out: Path) -> Path:
    if kind == "tar":
        need_tool("tar")
        subprocess.run(["tar", "--sort=name", "--numeric-owner", "--format=pax",
                        "-cf", str(out), "-C", str(src), "."], check=True)
    elif kind == "cpio":
        need_tool("cpio")
        names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=src, check=True,
                               capture_output=True).stdout
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-O", str(out)], cwd=src,
                       input=b"\n".join(sorted(names.split())) + b"\n", check=True)
    elif kind == "ext4":
        need_tool("mkfs.ext4")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), "-E",
                        "root_owner=0:0", str(out), "4M"], check=True,
                       env={**os.environ, "E2FSPROGS_FAKE_TIME": str(EPOCH)})
    elif kind == "squashfs":
        need_tool("mksquashfs")
        subprocess.run(["mksquashfs", str(src), str(out), "-quiet", "-no-progress",
                        "-all-root", "-mkfs-time", str(EPOCH)], check=True,
                       capture_output=True)
    elif kind == "erofs":
        need_tool("mkfs.erofs")
        subprocess.run(["mkfs.erofs", "--all-root", "-T", str(EPOCH), str(out), str(src)],
                       check=True, capture_output=True)
    return out


def _image_pair(tmp_path: Path, kind: str, make: Callable[[str, Path, Path], Path]
                ) -> tuple[Path, Path]:
    """``kind`` images, made by ``make``, of the tree and of its variant; detected."""
    need(_has_reader(kind), f"no {kind} reader yet (the format module has no read)")
    a = _make_tree(tmp_path / "a", variant=False)
    b = _make_tree(tmp_path / "b", variant=True)
    ia = make(kind, a, tmp_path / f"a.{kind}")
    ib = make(kind, b, tmp_path / f"b.{kind}")
    assert diffreport.detect(ia) == kind
    return ia, ib


@pytest.mark.tool
@pytest.mark.parametrize("kind", ["tar", "cpio", "ext4", "squashfs", "erofs"])
def test_images(tmp_path: Path, kind: str) -> None:
    ia, ib = _image_pair(tmp_path, kind, _image)
    report = diffreport.diff_paths(ia, ib)
    assert report.kind_a == report.kind_b == kind
    assert _kinds(report) >= EXPECTED, report.render()
    assert "first differing byte at offset 8" in report.render()
    # The same tree twice is identical; an image against its own directory compares
    # as trees (owner ignored: the tools above make everything root's).
    assert diffreport.diff_paths(ia, ia).identical


def _write_ours(kind: str, src: Path, out: Path, **options: object) -> Path:
    from reprobuild.images.registry import ImageOptions, get_format
    from reprobuild.trees.directory import tree_from_directory

    module = get_format(kind).load()
    tree = tree_from_directory(src, epoch=EPOCH, preserve_mtime=True)
    with out.open("w+b") as stream:
        module.write(tree, stream, ImageOptions(epoch=EPOCH, **options))  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("kind", ["tar", "cpio", "ext4", "squashfs", "erofs"])
def test_our_images(tmp_path: Path, kind: str) -> None:
    ia, ib = _image_pair(tmp_path, kind, _write_ours)
    report = diffreport.diff_paths(ia, ib)
    assert _kinds(report) >= EXPECTED, report.render()
    assert not {k for _, k in report.summary()} & {"bytes"}
    if kind in ("ext4", "erofs"):
        # Same tree, another UUID: the trees agree, the bytes do not, and the report
        # says so with the offset.
        ic = _write_ours(kind, tmp_path / "a", tmp_path / f"c.{kind}",
                         uuid="01234567-89ab-cdef-0123-456789abcdef")
        other = diffreport.diff_paths(ia, ic)
        assert not other.identical and other.differences == ()
        assert other.byte_difference is not None
        assert "trees are identical, but the image bytes differ" in other.render()


@pytest.mark.tool
def test_images_inside_directories(tmp_path: Path) -> None:
    need(_has_reader("squashfs"), "no squashfs reader yet")
    outputs = []
    for name, variant in (("a", False), ("b", True)):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        _image("squashfs", _make_tree(tmp_path / name, variant=variant), out / "root.img")
        (out / "cmdline").write_text("roothash=1\n")
        outputs.append(out)
    report = diffreport.diff_paths(*outputs, compare_owner=False)
    assert ("/root.img", "content") in report.summary()
    nested = dict(report.parts)["squashfs image /root.img"]
    assert set(nested.summary()) >= EXPECTED
    assert any(p == "squashfs image /root.img:/bin/tool" and k == "mode"
               for p, k in report.summary())


def _gpt_disk(path: Path, part_name: str, payload: bytes, part1_mib: int = 1) -> Path:
    need_tool("sgdisk")
    with path.open("wb") as f:
        f.truncate((part1_mib + 3) << 20)
    subprocess.run(["sgdisk", "-U", "11111111-2222-3333-4444-555555555555",
                    "-n", f"1:2048:+{part1_mib}M", "-c", f"1:{part_name}",
                    "-u", "1:aaaaaaaa-2222-3333-4444-555555555555",
                    "-n", "2:0:+1M", "-c", "2:data",
                    "-u", "2:bbbbbbbb-2222-3333-4444-555555555555", str(path)],
                   check=True, capture_output=True)
    with path.open("r+b") as f:
        f.seek(2048 * 512 + (part1_mib << 20) + 4096)  # inside partition 2
        f.write(payload)
    return path


@pytest.mark.tool
def test_gpt(tmp_path: Path) -> None:
    a = _gpt_disk(tmp_path / "a.img", "root", b"same-start-A")
    b = _gpt_disk(tmp_path / "b.img", "rooty", b"same-start-B")
    assert diffreport.detect(a) == "gpt"
    table = diffreport.read_gpt(a)
    assert [p.name for p in table.entries] == ["root", "data"]
    report = diffreport.diff_paths(a, b)
    kinds = _kinds(report)
    assert ("/gpt/partition1/name", "table") in kinds
    assert ("/gpt/partition1/uuid", "table") not in kinds
    assert any(label.startswith("partition 2") and kind == "bytes" for label, kind in
               ((p.split(":")[0], k) for p, k in kinds)), kinds
    labels = dict(report.parts)
    part2 = next(v for k, v in labels.items() if k.startswith("partition 2"))
    assert part2.byte_difference is not None and part2.byte_difference.offset == 4096 + 11
    part1 = next(v for k, v in labels.items() if k.startswith("partition 1"))
    assert part1.identical
    c = tmp_path / "c.img"
    shutil.copy(a, c)
    assert diffreport.diff_paths(a, c).identical
    # A corrupt table (header CRC) is not fatal: the bytes are compared instead.
    with c.open("r+b") as f:
        f.seek(512 + 40)
        f.write(b"\xff")
    broken = diffreport.diff_paths(a, c)
    assert broken.byte_difference is not None and broken.byte_difference.offset == 552
    assert "cannot read both partition tables" in broken.render()


@pytest.mark.tool
def test_gpt_partitions_compared_as_trees(tmp_path: Path) -> None:
    need(_has_reader("ext4"), "no ext4 reader yet")
    disks = []
    for name, variant in (("a", False), ("b", True)):
        image = _image("ext4", _make_tree(tmp_path / name, variant=variant),
                       tmp_path / f"{name}.ext4")
        disk = _gpt_disk(tmp_path / f"{name}.img", "root", b"", part1_mib=4)
        with disk.open("r+b") as f:
            f.seek(2048 * 512)
            f.write(image.read_bytes())
        disks.append(disk)
    report = diffreport.diff_paths(*disks)
    part1 = next(v for k, v in report.parts if k.startswith("partition 1"))
    assert part1.kind_a == "ext4"
    assert set(part1.summary()) >= EXPECTED, part1.render()
    assert any(p.startswith("partition 1") and p.endswith("/bin/tool") and k == "mode"
               for p, k in report.summary())


@pytest.mark.tool
def test_diffoscope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_tool("diffoscope")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\ntwo\n")
    b.write_text("one\nthree\n")
    assert main(["diff", "--diffoscope", str(a), str(b)]) == 1
    assert "three" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["ext4", "squashfs", "erofs", "cpio", "tar"])
def test_directory_against_its_own_image_is_identical(tmp_path: Path, fmt: str) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "a").write_bytes(b"a\n" * 100)
    (source / "sub" / "l").symlink_to("a")
    (source / "sub").chmod(0o700)
    image = tmp_path / f"image.{fmt}"
    subprocess.run([sys.executable, "-m", "reprobuild", "image", "--format", fmt, "--epoch",
                    "1700000000", str(source), str(image)], check=True, capture_output=True)
    diff = subprocess.run([sys.executable, "-m", "reprobuild", "diff", str(source), str(image)],
                          capture_output=True, text=True, check=False)
    assert diff.returncode == 0, diff.stdout
    assert "identical" in diff.stdout
    exact = diffreport.diff_paths(source, image, exact=True)
    assert not exact.identical  # the directory's own mtimes differ from the epoch
