"""The canonical pax tar writer: GNU tar agrees, round trips, bytes independent of the host."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images import tar
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.load import load_tree
from reprobuild.trees.tree import BytesSource, Content, Entry, EntryType, Tree
from tests.conftest import REPO, need, need_tool
from tests.images.archive_trees import CAP_NET_RAW, EPOCH, NS, sample_tree
from tests.images.hostconditions import (
    Condition,
    images_in_process,
    run_under,
    small_source,
    write_tree,
)

OPTIONS = ImageOptions(epoch=EPOCH)


def tar_of(tree: Tree, options: ImageOptions = OPTIONS) -> bytes:
    out = io.BytesIO()
    tar.write(tree, out, options)
    return out.getvalue()


def members_of(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.getmembers()


def test_round_trip(tmp_path: Path) -> None:
    tree = sample_tree()
    path = tmp_path / "t.tar"
    path.write_bytes(tar_of(tree))
    assert [d.display() for d in diff_trees(tree, tar.read(path))] == []


def test_layout_of_the_archive() -> None:
    data = tar_of(sample_tree())
    assert len(data) % 10240 == 0
    assert data[-1024:] == bytes(1024)
    first = data[:512]
    assert first[:2] == b"./" and first[257:265] == b"ustar\x0000"
    assert first[265:329] == bytes(64)  # uname and gname empty
    names = [m.name for m in members_of(data)]
    expected = [n.decode().rstrip("/") for n in tar.iter_member_names(sample_tree())]
    assert names == expected


def pax_records(data: bytes) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Member name -> its pax records in order, parsed by hand (raw bytes)."""
    out: dict[bytes, list[tuple[bytes, bytes]]] = {}
    offset, pending = 0, None
    while data[offset:offset + 512] != bytes(512):
        header = data[offset:offset + 512]
        size = int(header[124:135], 8)
        body = data[offset + 512:offset + 512 + size]
        offset += 512 + (-(-size // 512) * 512 if header[156:157] in b"0x" else 0)
        if header[156:157] == b"x":
            assert header[100:108] == b"0000644\0" and header[136:148] == b"%011o\0" % EPOCH
            pending = []
            while body:
                length = int(body.split(b" ", 1)[0])
                key, _, value = body[:length].split(b" ", 1)[1][:-1].partition(b"=")
                pending.append((key, value))
                body = body[length:]
            continue
        out[header[:100].rstrip(b"\0")] = pending or []
        pending = None
    return out


def test_pax_headers_only_where_needed() -> None:
    simple = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
    simple.add(Entry(b"a", EntryType.REGULAR, 0o644, mtime_ns=5 * NS,
                     content=Content.from_bytes(b"x")))
    simple.add(Entry(b"b", EntryType.SYMLINK, 0o777, target=b"t" * 100))
    simple.add(Entry(b"f" * 98, EntryType.REGULAR, 0o644))  # "./" + 98 = 100 bytes
    assert b"PaxHeader" not in tar_of(simple)
    records = pax_records(tar_of(sample_tree()))
    assert records[b"./bin/ping"] == [(b"SCHILY.xattr.security.capability", CAP_NET_RAW),
                                      (b"SCHILY.xattr.user.note", b"n")]
    assert records[b"./bin/ping6"] == []  # a link member: xattrs go with the data
    assert records[b"./home/user/file"] == [(b"mtime", b"1699999995.123456789")]
    assert records[b"./usr/big-ids"] == [(b"uid", b"3000000"), (b"gid", b"2500000")]
    assert records[b"./usr/caf\xc3\xa9"] == [(b"path", b"./usr/caf\xc3\xa9")]
    assert records[b"./etc/shadow"] == []
    assert [k for k, _ in records[b"./usr/long-link"]] == [b"linkpath"]
    data = tar_of(sample_tree())
    assert b"./usr/PaxHeaders/long-link\0" in data
    # A size of 8 GiB or more (planned only: nothing is read).
    big = Tree()
    big.add(Entry(b"big", EntryType.REGULAR, 0o644, uid=3_000_000, mtime_ns=NS // 2,
                  content=Content(8 << 30, BytesSource(b""))))
    member = tar.plan(big, OPTIONS)[1]
    assert b"15 uid=3000000\n19 size=8589934592\n13 mtime=0.5\n" in member.header


def test_pax_header_names() -> None:
    assert tar.pax_header_name(b"./") == b"./PaxHeaders/."
    assert tar.pax_header_name(b"./a") == b"./PaxHeaders/a"
    assert tar.pax_header_name(b"./d/e/") == b"./d/PaxHeaders/e"
    assert len(tar.pax_header_name(b"./" + b"x" * 300)) == 100


def test_mtimes_are_clamped_to_the_epoch() -> None:
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=(EPOCH + 99) * NS))
    members = members_of(tar_of(tree))
    assert members[0].mtime == EPOCH and members[0].pax_headers == {}


def test_refusals() -> None:
    tree = Tree()
    tree.add(Entry(b"sock", EntryType.SOCKET, 0o755))
    with pytest.raises(ImageError, match="/sock: tar cannot store a socket"):
        tar_of(tree)
    with pytest.raises(ImageError, match="no size"):
        tar_of(Tree(), ImageOptions(epoch=0, size=1 << 20))
    with pytest.raises(ImageError, match="cannot be compressed with 'xz'"):
        tar_of(Tree(), ImageOptions(epoch=0, compress="xz"))


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_compressed_output(tmp_path: Path, compress: str) -> None:
    import gzip

    import zstandard

    tree = sample_tree()
    options = ImageOptions(epoch=EPOCH, compress=compress)
    packed = tar_of(tree, options)
    assert packed == tar_of(tree, options)
    plain = (gzip.decompress(packed) if compress == "gzip"
             else zstandard.ZstdDecompressor().stream_reader(io.BytesIO(packed)).read())
    assert plain == tar_of(tree)
    path = tmp_path / "t.tar.z"
    path.write_bytes(packed)
    assert diff_trees(tree, tar.read(path)) == []
    assert "compressor" in tar.identity(options) and tar.identity(OPTIONS) == {}


def test_bytes_are_stable_across_python_versions() -> None:
    # Our own header code: this digest changes only with a deliberate format change
    # (which must bump tar.VERSION).
    digest = hashlib.sha256(tar_of(sample_tree())).hexdigest()
    assert (tar.VERSION, digest) == ("2", GOLDEN_SHA256)


GOLDEN_SHA256 = "361174141cdb7e69ad25a6f50e235726237606b0ae3324ca8b4b9ecaa821eeee"


@pytest.mark.tool
def test_gnu_tar_lists_the_tree(tmp_path: Path) -> None:
    need_tool("tar")
    path = tmp_path / "t.tar"
    tree = sample_tree()
    path.write_bytes(tar_of(tree))
    listing = subprocess.run(["tar", "--numeric-owner", "--utc", "-tvf", str(path)],
                             check=True, capture_output=True).stdout.decode("utf-8", "replace")
    lines = listing.splitlines()
    assert len(lines) == len(tree)
    for line, entry in zip(lines, tree, strict=True):
        perms, owner = line.split()[:2]
        resolved = tree.resolve(entry)
        assert owner == f"{resolved.uid}/{resolved.gid}", line
        assert perms[0] == {EntryType.REGULAR: "-", EntryType.DIRECTORY: "d",
                            EntryType.SYMLINK: "l", EntryType.HARDLINK: "h",
                            EntryType.CHAR: "c", EntryType.BLOCK: "b",
                            EntryType.FIFO: "p"}[entry.type], line
        assert perms[1:] == stat.filemode(resolved.st_mode)[1:], line


@pytest.mark.tool
def test_gnu_tar_extracts_the_tree(tmp_path: Path) -> None:
    need_tool("tar")
    need(os.geteuid() == 0, "extracting owners and devices needs root")
    path = tmp_path / "t.tar"
    tree = sample_tree()
    path.write_bytes(tar_of(tree))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*",
                    "-xpf", str(path), "-C", str(out)], check=True)
    back = tree_from_directory(out, preserve_owner=True, preserve_mtime=True,
                               read_xattrs=True)
    assert [d.display() for d in diff_trees(tree, back)] == []


# GNU tar's reproducible mode, exactly as the README gives it (a test below checks that).
GNU_TAR_FLAGS = ["--sort=name", "--format=pax", "--numeric-owner", f"--mtime=@{EPOCH}",
                 "--clamp-mtime",
                 "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime"]
GNU_TAR_XATTR_FLAGS = ["--xattrs", "--xattrs-include=*"]
# A directory source: owners root and every mtime the epoch (so no --clamp-mtime).
GNU_TAR_DIRECTORY_FLAGS = [f for f in GNU_TAR_FLAGS if f != "--clamp-mtime"] + \
    ["--owner=0", "--group=0"]
GNU_TAR_CREATE = ["tar", *GNU_TAR_FLAGS, *GNU_TAR_XATTR_FLAGS]


def gnu_tar(flags: list[str], root: Path, out: Path) -> bytes:
    # A foreign TZ and locale and a PID that differs per run: none may show in the bytes.
    env = {**os.environ, "TZ": "Asia/Kolkata", "LC_ALL": "C.UTF-8"}
    subprocess.run(["tar", *flags, "-cf", str(out), "-C", str(root), "."], check=True,
                   env=env)
    return out.read_bytes()


@pytest.mark.tool
@pytest.mark.parametrize("xattrs", [True, False])
def test_identical_to_gnu_tar_on_the_unpacked_tree(tmp_path: Path, xattrs: bool) -> None:
    """GNU tar's reproducible mode on the tree unpacked as root gives our very bytes
    (``--xattrs --xattrs-include='*'`` when the tree has xattrs)."""
    need_tool("tar")
    need(os.geteuid() == 0, "unpacking owners and devices needs root")
    tree = sample_tree(xattrs=xattrs)
    write_tree(tree, tmp_path / "root")
    flags = GNU_TAR_FLAGS + (GNU_TAR_XATTR_FLAGS if xattrs else [])
    assert gnu_tar(flags, tmp_path / "root", tmp_path / "gnu.tar") == tar_of(tree)


@pytest.mark.tool
def test_identical_to_gnu_tar_on_a_directory_source(tmp_path: Path) -> None:
    """``reprobuild image --format tar DIR`` equals GNU tar with ``--owner=0 --group=0``
    and ``--mtime`` without ``--clamp-mtime`` (a directory's mtimes all become the epoch)."""
    need_tool("tar")
    source = tmp_path / "src"
    (source / "bin").mkdir(parents=True)
    (source / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (source / "bin" / "tool").chmod(0o755)
    (source / "bin" / "sh").symlink_to("tool")
    (source / "etc").mkdir()
    (source / "etc" / "motd").write_text("hello\n")
    (source / "etc" / "secret").write_text("s\n")
    (source / "etc" / "secret").chmod(0o600)
    (source / "usr" / ("d" * 90) / ("e" * 90)).mkdir(parents=True)
    (source / "usr" / ("d" * 90) / ("e" * 90) / ("f" * 120)).write_text("long name\n")
    (source / "usr" / "caf\u00e9").write_text("utf-8 name\n")
    (source / "usr" / "big").write_bytes(bytes(range(256)) * 300)
    os.utime(source / "etc" / "motd", (EPOCH + 10**6, EPOCH + 10**6))  # later than the epoch
    ours = tmp_path / "ours.tar"
    result = subprocess.run([sys.executable, "-m", "reprobuild", "image", "--format", "tar",
                             "--epoch", str(EPOCH), str(source), str(ours)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    gnu = gnu_tar(GNU_TAR_DIRECTORY_FLAGS, source, tmp_path / "gnu.tar")
    assert gnu == ours.read_bytes()


def test_readme_gives_the_tested_gnu_tar_flags() -> None:
    text = (REPO / "README.md").read_text().replace("\\\n", " ").replace("`", "")
    readme = " ".join(text.split())
    flags = " ".join(GNU_TAR_FLAGS).replace(f"@{EPOCH}", "@N")
    assert f"tar {flags} --xattrs --xattrs-include='*'" in readme
    assert "--owner=0 --group=0 and no --clamp-mtime" in readme


def test_host_conditions_give_identical_bytes() -> None:
    images = images_in_process("tar", tar_of, epoch=EPOCH)
    assert len(images) >= 3
    assert all(image == images[0] for image in images)


def test_command_under_other_environments(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    small_source(source, Condition())
    outputs = []
    for n, env in enumerate(({"TZ": "UTC", "LANG": "C.UTF-8"},
                             {"TZ": "Asia/Kolkata", "LANG": "fr_FR.UTF-8", "LC_ALL": "C"})):
        out = tmp_path / f"out{n}.tar"
        cwd = tmp_path / f"cwd{n}"
        cwd.mkdir()
        result = run_under(["python", "-m", "reprobuild", "image", "--format", "tar",
                            "--epoch", str(EPOCH), str(source), str(out)],
                           Condition(env=env), cwd=cwd)
        assert result.returncode == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.slow
@pytest.mark.tool
def test_debian_minbase(debian_minbase_tar: Path, tmp_path: Path) -> None:
    need_tool("tar")
    tree = load_tree(debian_minbase_tar, epoch=EPOCH)
    path = tmp_path / "minbase.tar"
    with path.open("wb") as f:
        tar.write(tree, f, OPTIONS)
    assert [d.display() for d in diff_trees(tree, tar.read(path))] == []
    listing = subprocess.run(["tar", "--numeric-owner", "-tvf", str(path)], check=True,
                             capture_output=True).stdout.splitlines()
    assert len(listing) == len(tree)
    names = subprocess.run(["tar", "-tf", str(path)], check=True,
                           capture_output=True).stdout.splitlines()
    assert names == list(tar.iter_member_names(tree))
    # GNU tar in reproducible mode, on the tree unpacked as root, writes the same bytes.
    if os.geteuid() == 0:
        root = tmp_path / "root"
        root.mkdir()
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf",
                        str(debian_minbase_tar), "-C", str(root)], check=True)
        subprocess.run([*GNU_TAR_CREATE, "-cf", str(tmp_path / "gnu.tar"), "-C", str(root),
                        "."], check=True)
        assert hashlib.sha256((tmp_path / "gnu.tar").read_bytes()).digest() == \
            hashlib.sha256(path.read_bytes()).digest()


def test_write_directory_helper_round_trips(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root for owners and devices")
    tree = sample_tree()
    write_tree(tree, tmp_path / "root")
    back = tree_from_directory(tmp_path / "root", preserve_owner=True, preserve_mtime=True,
                               read_xattrs=True)
    assert diff_trees(tree, back) == []
