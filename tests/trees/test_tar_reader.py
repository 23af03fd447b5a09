"""Tar input: every member kind, long names, xattrs, compression, and hostile archives."""

from __future__ import annotations

import base64
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.load import load_tree
from reprobuild.trees.region import FileRegion
from reprobuild.trees.tar_pax import parse_pax_time
from reprobuild.trees.tar_reader import Spool, tree_from_tar
from reprobuild.trees.tree import EntryType, FileSource
from tests.archive_helpers import M, compress, dir_, file, hardlink, symlink, write_tar
from tests.conftest import need_tool

EPOCH = 1_700_000_000


def sample_members() -> list[M]:
    cap = base64.b64encode(b"\x01\x00\x00\x02\x00\x20").decode()
    return [
        dir_("./", mode=0o755, mtime=1_500_000_000),
        dir_("etc", mode=0o755),
        file("etc/shadow", b"root:*:\n", mode=0o640, gid=42),
        file("bin/ping", b"\x7fELF", mode=0o4755,
             pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02 ",
                  "LIBARCHIVE.xattr.user.with%3Dequals": cap}),
        hardlink("bin/ping2", "bin/ping"),
        symlink("bin/sh", "dash"),
        M("dev/console", tarfile.CHRTYPE, mode=0o600, major=5, minor=1),
        M("dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, major=8, minor=0),
        M("run/fifo", tarfile.FIFOTYPE, mode=0o644),
        file("home/big-ids", b"x", uid=4_000_000_000, gid=3_000_000,
             pax={"mtime": "1600000000.123456789"}),
    ]


def test_member_kinds_and_metadata(tmp_path: Path) -> None:
    tree = tree_from_tar(write_tar(tmp_path / "a.tar", sample_members()),
                         implied_mtime_ns=7)
    root = tree.root
    assert (root.mode, root.mtime_ns) == (0o755, 1_500_000_000 * 10**9)
    shadow = tree.get(b"etc/shadow")
    assert shadow is not None and (shadow.mode, shadow.gid) == (0o640, 42)
    assert shadow.content is not None and shadow.content.read() == b"root:*:\n"
    ping = tree.get(b"bin/ping")
    assert ping is not None and ping.mode == 0o4755
    assert dict(ping.xattrs) == {b"security.capability": b"\x01\x00\x00\x02 ",
                                 b"user.with=equals": b"\x01\x00\x00\x02\x00\x20"}
    link = tree.get(b"bin/ping2")
    assert link is not None and link.type is EntryType.HARDLINK and link.target == b"bin/ping"
    sh = tree.get(b"bin/sh")
    assert sh is not None and sh.type is EntryType.SYMLINK and sh.target == b"dash"
    console = tree.get(b"dev/console")
    assert console is not None and console.type is EntryType.CHAR
    assert (console.rdev_major, console.rdev_minor, console.mode) == (5, 1, 0o600)
    sda = tree.get(b"dev/sda")
    assert sda is not None and sda.type is EntryType.BLOCK and sda.gid == 6
    fifo = tree.get(b"run/fifo")
    assert fifo is not None and fifo.type is EntryType.FIFO
    big = tree.get(b"home/big-ids")
    assert big is not None and (big.uid, big.gid) == (4_000_000_000, 3_000_000)
    assert big.mtime_ns == 1_600_000_000_123_456_789
    # Directories the archive implies but does not list: root:root 0755, the given mtime.
    for implied in (b"bin", b"dev", b"run", b"home"):
        entry = tree.get(implied)
        assert entry is not None and entry.type is EntryType.DIRECTORY
        assert (entry.mode, entry.uid, entry.gid, entry.mtime_ns) == (0o755, 0, 0, 7)


def test_uncompressed_members_are_read_in_place(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "a.tar", [file("a", b"hello" * 1000)])
    entry = tree_from_tar(archive).get(b"a")
    assert entry is not None and entry.content is not None
    assert isinstance(entry.content.source, FileRegion)
    assert entry.content.read() == b"hello" * 1000


@pytest.mark.parametrize("method", ["gzip", "xz", "bzip2", "zstd"])
def test_compressed_tars_give_the_same_tree(tmp_path: Path, method: str) -> None:
    plain = write_tar(tmp_path / "a.tar", sample_members())
    packed = tmp_path / f"a.tar.{method}"
    packed.write_bytes(compress(plain.read_bytes(), method))
    spool = Spool(tmp_path / "spool")
    tree = tree_from_tar(packed, spool=spool)
    assert diff_trees(tree_from_tar(plain), tree) == []
    entry = tree.get(b"etc/shadow")
    assert entry is not None and entry.content is not None
    assert isinstance(entry.content.source, FileSource)
    # Content-addressed: the spool file is named by the blake3 of its bytes.
    assert os.path.basename(entry.content.source.path) == entry.content.blake3.hex().encode()


def test_spool_stores_identical_files_once(tmp_path: Path) -> None:
    raw = write_tar(tmp_path / "a.tar", [file("a", b"same"), file("b", b"same"),
                                          file("c", b"other")]).read_bytes()
    packed = tmp_path / "a.tgz"
    packed.write_bytes(compress(raw, "gzip"))
    tree_from_tar(packed, spool=Spool(tmp_path / "spool"))
    assert len(os.listdir(tmp_path / "spool")) == 2


def test_gnu_and_pax_long_names(tmp_path: Path) -> None:
    long_dir = "d" * 120
    long_name = f"{long_dir}/{'f' * 200}"
    long_target = "t" * 300
    members = [file(long_name, b"x"), symlink("l", long_target),
               hardlink("h", long_name)]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        tree = tree_from_tar(write_tar(tmp_path / f"{fmt}.tar", members, fmt))
        assert tree.get(long_name.encode()) is not None
        link = tree.get(b"l")
        assert link is not None and link.target == long_target.encode()
        hard = tree.get(b"h")
        assert hard is not None and hard.target == long_name.encode()


def test_non_utf8_names_survive(tmp_path: Path) -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    tree = tree_from_tar(write_tar(tmp_path / "a.tar", [file(name, b"x")]))
    assert tree.get(b"caf\xe9") is not None


@pytest.mark.tool
def test_gnu_sparse_members_are_expanded(tmp_path: Path) -> None:
    need_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
        f.seek(3 << 20)
        f.write(b"tail")
    for fmt in ("gnu", "pax"):
        archive = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(archive),
                        "-C", str(src), "sparse"], check=True)
        entry = tree_from_tar(archive).get(b"sparse")
        assert entry is not None and entry.content is not None
        assert entry.content.read() == (src / "sparse").read_bytes()


@pytest.mark.tool
def test_a_sparse_member_stays_sparse_in_the_spool(tmp_path: Path) -> None:
    """A tar claiming a GiB of holes costs the spool's disk what its data costs."""
    need_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.truncate(1 << 30)
        f.seek(5 << 20)
        f.write(b"data")
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=pax", "-cf", str(archive), "-C", str(src),
                    "holes"], check=True)
    spool = tmp_path / "spool"
    entry = tree_from_tar(archive, spool=Spool(spool)).get(b"holes")
    assert entry is not None and entry.content is not None
    assert entry.content.size == 1 << 30
    used = sum(p.stat().st_blocks * 512 for p in spool.iterdir())
    assert used < 8 << 20, used  # one chunk of data, not a GiB of zeros


def test_parse_pax_time() -> None:
    assert parse_pax_time("1.5", "x") == 1_500_000_000
    assert parse_pax_time("-1.25", "x") == -1_250_000_000
    assert parse_pax_time("12", "x") == 12_000_000_000
    with pytest.raises(ImageError):
        parse_pax_time("1e9", "x")


HOSTILE: dict[str, tuple[list[M], str]] = {
    "dotdot": ([file("a/../../etc/passwd", b"x")], "contains '..'"),
    "absolute": ([file("/etc/passwd", b"x")], "absolute member name"),
    "through-symlink": ([symlink("etc", "/etc"), file("etc/passwd", b"x")],
                        "which is a symlink"),
    "through-file": ([file("etc", b""), file("etc/passwd", b"x")],
                     "which is a regular file"),
    "duplicate-file": ([file("a", b"1"), file("a", b"2")], "duplicate member"),
    "duplicate-dir": ([dir_("a"), dir_("a")], "duplicate member"),
    "duplicate-root": ([dir_("./"), dir_(".")], "duplicate member"),
    "hardlink-missing": ([hardlink("a", "missing")], "not an earlier member"),
    "hardlink-later": ([hardlink("a", "b"), file("b")], "not an earlier member"),
    "hardlink-dotdot": ([file("a"), hardlink("b", "../a")], "contains '..'"),
    "hardlink-to-dir": ([dir_("d"), hardlink("h", "d")], "points at directory"),
    "unknown-type": ([M("weird", b"Z")], "unsupported type"),
    "root-not-dir": ([file(".", b"")], "names the root"),
    "file-over-implied-dir": ([file("a/b"), file("a")], "duplicate member"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused(tmp_path: Path, case: str) -> None:
    members, message = HOSTILE[case]
    archive = write_tar(tmp_path / "evil.tar", members)
    with pytest.raises(ImageError, match=message.replace("(", r"\(")) as info:
        load_tree(archive, epoch=EPOCH)
    assert "evil.tar" in info.value.message
    assert "member" in info.value.message or "'..'" in info.value.message


def test_hostile_archive_writes_nothing(tmp_path: Path) -> None:
    from reprobuild.images.build import build_tree_image
    from reprobuild.images.registry import ImageOptions

    archive = write_tar(tmp_path / "evil.tar", [file("ok", b"1"), file("../escape", b"x")])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ImageError, match="escape"):
        build_tree_image("tar", str(archive), str(out / "image.tar"), ImageOptions(epoch=EPOCH))
    assert os.listdir(out) == []
    assert not (tmp_path / "escape").exists()


def test_truncated_and_garbage_input(tmp_path: Path) -> None:
    raw = write_tar(tmp_path / "a.tar", [file("a", os.urandom(50_000))]).read_bytes()
    for method in ("none", "gzip", "zstd"):
        cut = tmp_path / f"cut.tar.{method}"
        cut.write_bytes(compress(raw, method)[:20_000])
        with pytest.raises(ImageError, match=f"cut.tar.{method}"):
            load_tree(cut, epoch=EPOCH)
    junk = tmp_path / "junk"
    junk.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ImageError, match="not a readable tar"):
        load_tree(junk, epoch=EPOCH)


def test_load_tree_clamps_to_epoch(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "a.tar", [file("old", mtime=1000),
                                             file("new", mtime=EPOCH + 50)])
    tree = load_tree(archive, epoch=EPOCH)
    old, new = tree.get(b"old"), tree.get(b"new")
    assert old is not None and old.mtime_ns == 1000 * 10**9
    assert new is not None and new.mtime_ns == EPOCH * 10**9
    root = tree.root
    assert root.mtime_ns == EPOCH * 10**9  # implied root: the epoch


@pytest.mark.tool
def test_gnu_tar_archive_with_xattrs(tmp_path: Path) -> None:
    need_tool("tar")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"data")
    os.link(src / "d" / "f", src / "g")
    (src / "s").symlink_to("d/f")
    os.setxattr(src / "d" / "f", "user.test", b"\x00\xffbin")
    archive = tmp_path / "a.tar"
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--format=pax", "-cf",
                    str(archive), "-C", str(src), "."], check=True)
    tree = tree_from_tar(archive)
    f = tree.get(b"d/f")
    assert f is not None and dict(f.xattrs) == {b"user.test": b"\x00\xffbin"}
    g = tree.get(b"g")
    assert g is not None and g.type is EntryType.HARDLINK and g.target == b"d/f"


def test_hardlink_primary_is_first_in_canonical_order(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "a.tar", [file("b/file", b"data", mode=0o600, uid=7),
                                             hardlink("a/link", "b/file")])
    tree = tree_from_tar(archive)
    primary, link = tree.get(b"a/link"), tree.get(b"b/file")
    assert primary is not None and primary.type is EntryType.REGULAR
    assert (primary.mode, primary.uid) == (0o600, 7)
    assert link is not None and link.type is EntryType.HARDLINK and link.target == b"a/link"


def _acl(*entries: tuple[int, int, int]) -> bytes:
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_text_acls_become_posix_acl_xattrs(tmp_path: Path) -> None:
    undefined = 0xFFFFFFFF
    members = [
        file("named", pax={"SCHILY.acl.access":
                           "user::rw-\ngroup:50:r-x\nuser:1000:rwx\ngroup::r--\nmask::rwx\n"
                           "other::r--\n"}),
        file("star", pax={"SCHILY.acl.access": "user::rw-,user:alice:r--:1001,group::r--,"
                                               "mask::r--,other::---"}),
        file("trivial", pax={"SCHILY.acl.access": "user::rw-\ngroup::r--\nother::r--\n"}),
        dir_("dir", pax={"SCHILY.acl.default": "user::rwx\ngroup::r-x\nother::r-x\n"}),
        file("both", pax={"SCHILY.acl.access": "user::rw-\nuser:7:rw-\ngroup::r--\n"
                                               "mask::rw-\nother::r--\n",
                          "SCHILY.xattr.system.posix_acl_access": "binary wins"}),
    ]
    tree = tree_from_tar(write_tar(tmp_path / "a.tar", members))

    def xattrs(path: bytes) -> dict[bytes, bytes]:
        entry = tree.get(path)
        assert entry is not None
        return dict(entry.xattrs)

    assert xattrs(b"named") == {b"system.posix_acl_access": _acl(
        (1, 6, undefined), (2, 7, 1000), (4, 4, undefined), (8, 5, 50), (0x10, 7, undefined),
        (0x20, 4, undefined))}
    assert xattrs(b"star")[b"system.posix_acl_access"] == _acl(
        (1, 6, undefined), (2, 4, 1001), (4, 4, undefined), (0x10, 4, undefined),
        (0x20, 0, undefined))
    assert xattrs(b"trivial") == {}
    assert xattrs(b"dir") == {b"system.posix_acl_default": _acl(
        (1, 7, undefined), (4, 5, undefined), (0x20, 5, undefined))}
    assert xattrs(b"both") == {b"system.posix_acl_access": b"binary wins"}
    named = write_tar(tmp_path / "n.tar", [file("f", pax={
        "SCHILY.acl.access": "user::rw-\nuser:alice:rwx\ngroup::r--\nmask::rwx\nother::r--"})])
    with pytest.raises(ImageError, match="without a numeric id"):
        tree_from_tar(named)


def test_damaged_archives_raise_only_image_errors(tmp_path: Path) -> None:
    """Random damage (bytes, truncation, compression) never escapes as another error."""
    import random

    from tests.archive_helpers import tar_bytes

    base = tar_bytes(sample_members())
    rng = random.Random(5)
    path = tmp_path / "damaged.tar"
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(400):
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[:rng.randrange(len(data))]
        if rng.random() < 0.2:
            data = bytearray(compress(bytes(data), rng.choice(["gzip", "zstd", "xz"])))
            data[rng.randrange(len(data))] ^= 0xFF
        path.write_bytes(data)
        try:
            for entry in tree_from_tar(path, spool=Spool(tmp_path / "spool")):
                if entry.content is not None:
                    entry.content.read()
            outcomes["ok"] += 1
        except ImageError:
            outcomes["refused"] += 1
    assert outcomes["ok"] and outcomes["refused"]


def test_full_spool_is_reported_as_such(tmp_path: Path) -> None:
    packed = tmp_path / "a.tgz"
    packed.write_bytes(compress(write_tar(tmp_path / "a.tar", [file("a", b"x")]).read_bytes(),
                                "gzip"))
    spool = Spool(tmp_path / "spool")
    spool.directory = b"/proc/no-such-dir"
    with pytest.raises(ImageError, match="cannot spool archive contents into /proc"):
        tree_from_tar(packed, spool=spool)
