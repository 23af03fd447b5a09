"""composefs images against libcomposefs's own tools (Debian unstable's ``composefs``):
identical bytes and digest as mkcomposefs, ``composefs-info dump`` equal to the tree,
the digest store's layout, OCI root rules, and a kernel mount through mount.composefs."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest

from reprobuild.cli import main
from reprobuild.errors import ImageError
from reprobuild.images.build import build_tree_image
from reprobuild.images.composefs import image as composefs
from reprobuild.images.composefs.layout import plan
from reprobuild.images.composefs.read import read_composefs
from reprobuild.images.registry import ImageOptions
from reprobuild.proof import diffreport
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.load import load_tree
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.archive_helpers import M, dir_, file, symlink, tar_bytes
from tests.conftest import ComposefsTools, can_loop_mount, need
from tests.images.composefs_dump import normalise, render
from tests.trees.test_oci import make_layout

OPTIONS = ImageOptions(epoch=0)
FAR_EPOCH = 4_000_000_000  # clamps nothing


def ours(tree: Tree) -> bytes:
    out = io.BytesIO()
    composefs.write(tree, out, OPTIONS)
    return out.getvalue()


def as_found(directory: Path) -> Tree:
    """The directory as mkcomposefs reads it: owners, mtimes and xattrs as found, every
    path its own inode."""
    return tree_from_directory(directory, preserve_owner=True, preserve_mtime=True,
                               read_xattrs=True, detect_hardlinks=False)


def reference(tools: ComposefsTools, source: Path, out: Path) -> tuple[bytes, str]:
    """mkcomposefs's image of ``source`` and the digest it prints."""
    digest = tools.run("mkcomposefs", "--print-digest", source, out).stdout.split()[-1]
    return out.read_bytes(), digest


def _root_only() -> None:
    need(os.geteuid() == 0, "needs root (owners, device nodes, trusted.* xattrs)")


def every_kind(root: Path) -> Path:
    """A directory with every kind of entry composefs distinguishes."""
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "inline64").write_bytes(b"i" * 64)
    (root / "ref65").write_bytes(b"r" * 65)
    (root / "big").write_bytes(bytes(range(256)) * 4000)
    (root / "same1").write_bytes(b"shared content " * 10)
    (root / "same2").write_bytes(b"shared content " * 10)
    (root / "dash").write_bytes(b"-")
    (root / ("n" * 255)).write_bytes(b"long name\n")
    (root / "with space=eq").write_bytes(b"a b\tc\\")
    (root / "link").symlink_to("inline64")
    (root / "longlink").symlink_to("x" * 4000)
    (root / "longestlink").symlink_to("y" * 4095)  # with its inode, more than a block
    os.mkfifo(root / "fifo")
    os.mknod(root / "chr", stat.S_IFCHR | 0o620, os.makedev(4, 64))
    os.mknod(root / "blk", stat.S_IFBLK | 0o600, os.makedev(259, 70000))
    os.mknod(root / "sock", stat.S_IFSOCK | 0o755)
    os.mknod(root / "whiteout", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    os.setxattr(root / "ref65", "user.a", b"1")
    os.setxattr(root / "inline64", "user.a", b"1")
    os.setxattr(root / "big", "trusted.overlay.redirect", b"/user/set")
    os.setxattr(root / "big", "trusted.overlay.overlay.x", b"pre-escaped")
    os.setxattr(root / "big", "security.selinux", b"system_u:object_r:bin_t:s0\0")
    os.setxattr(root / "empty", "trusted.zz", b"=\n\0")
    os.setxattr(root, "security.selinux", b"system_u:object_r:root_t:s0\0")
    os.chown(root / "big", 70000, 80000, follow_symlinks=False)
    os.chown(root / "ref65", 1000, 1000)
    sub = root / "sub"
    sub.mkdir()
    os.setxattr(sub, "trusted.overlay.opaque", b"y")
    (sub / "deeper").mkdir()
    (sub / "deeper" / "f").write_bytes(b"deep")
    many = root / "many"
    many.mkdir()
    for i in range(10_000):
        (many / f"entry-{i:05d}-{'p' * (i % 40)}").write_bytes(b"x" * (i % 3 * 60))
    paths = sorted(Path(d, n) for d, dirs, files in os.walk(root) for n in dirs + files)
    for i, path in enumerate(paths):
        os.utime(path, ns=(0, 1_600_000_000_000_000_000 + i * 1_000_000_007),
                 follow_symlinks=False)
    os.utime(root, ns=(0, 1_500_000_000_123_456_789))
    return root


@pytest.mark.tool
def test_every_kind_of_entry_matches_mkcomposefs(composefs_tools: ComposefsTools,
                                                 tmp_path: Path) -> None:
    _root_only()
    source = every_kind(tmp_path / "src")
    expected, digest = reference(composefs_tools, source, tmp_path / "ref.cfs")
    tree = as_found(source)
    assert ours(tree) == expected
    image = tmp_path / "ours.cfs"
    image.write_bytes(ours(tree))
    assert composefs.composefs_digest(image) == digest
    printed = composefs_tools.run("mkcomposefs", "--print-digest-only", source).stdout
    assert printed.split()[-1] == digest


@pytest.mark.tool
@pytest.mark.slow
def test_debian_minbase_matches_mkcomposefs(composefs_tools: ComposefsTools,
                                            debian_minbase_tar: Path, tmp_path: Path) -> None:
    _root_only()
    root = tmp_path / "minbase"
    root.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-xpf", debian_minbase_tar,
                    "-C", root], check=True)
    expected, digest = reference(composefs_tools, root, tmp_path / "ref.cfs")
    image = tmp_path / "ours.cfs"
    image.write_bytes(ours(as_found(root)))
    assert image.read_bytes() == expected
    assert composefs.composefs_digest(image) == digest
    with composefs.while_loading() as early:  # files hashed while the walk goes on
        tree = tree_from_directory(root, preserve_owner=True, preserve_mtime=True,
                                   read_xattrs=True, detect_hardlinks=False, found=early.found)
        assert early.forked
        out = io.BytesIO()
        composefs.write(tree, out, OPTIONS, early=early)
    assert out.getvalue() == expected


def linked_tree() -> Tree:
    """Hardlinks, a whiteout-free mix of inline and stored files, xattrs and owners."""
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=1_000_000_000))
    t = 2_000_000_005
    tree.add(Entry(b"a", EntryType.DIRECTORY, 0o755, 1, 2, t))
    tree.add(Entry(b"a/file", EntryType.REGULAR, 0o640, 3, 4, t, ((b"user.k", b"v v"),),
                   content=Content.from_bytes(b"content " * 100)))
    tree.add(Entry(b"a/small", EntryType.REGULAR, 0o644, 0, 0, t,
                   content=Content.from_bytes(b"tiny\n")))
    tree.add(Entry(b"a/z-link", EntryType.HARDLINK, 0, target=b"a/file"))
    tree.add(Entry(b"b", EntryType.DIRECTORY, 0o700, 0, 0, t + 1))
    tree.add(Entry(b"b/link1", EntryType.HARDLINK, 0, target=b"a/file"))
    tree.add(Entry(b"b/small-link", EntryType.HARDLINK, 0, target=b"a/small"))
    tree.add(Entry(b"b/sym", EntryType.SYMLINK, 0o777, 0, 0, t, target=b"../a/file"))
    # shallower than its primary: numbered where the primary is, not where met first
    tree.add(Entry(b"top-link", EntryType.HARDLINK, 0, target=b"a/file"))
    return tree


# The composefs digest of linked_tree(): what mkcomposefs 1.0.8 --from-file prints for its
# dump (test_hardlinks_match_mkcomposefs_from_dump checks the bytes against the tool).
LINKED_TREE_DIGEST = "22405e841bd5600272341ca062fb4f2f8cadfe666a3b354b111936b8b4744acf"


def test_golden_composefs_digest(tmp_path: Path) -> None:
    image = tmp_path / "x.cfs"
    image.write_bytes(ours(linked_tree()))
    assert composefs.composefs_digest(image) == LINKED_TREE_DIGEST


@pytest.mark.tool
def test_hardlinks_match_mkcomposefs_from_dump(composefs_tools: ComposefsTools,
                                               tmp_path: Path) -> None:
    tree = linked_tree()
    digests = composefs.content_digests(tree)
    dump = tmp_path / "tree.dump"
    dump.write_text("\n".join(render(tree, digests)) + "\n")
    expected = tmp_path / "ref.cfs"
    printed = composefs_tools.run("mkcomposefs", "--print-digest", "--from-file", dump,
                                  expected).stdout
    assert ours(tree) == expected.read_bytes()
    assert printed.split()[-1] == LINKED_TREE_DIGEST


@pytest.mark.tool
@pytest.mark.parametrize("which", ["every_kind", "linked"])
def test_composefs_info_dump_equals_the_tree(composefs_tools: ComposefsTools,
                                             tmp_path: Path, which: str) -> None:
    if which == "every_kind":
        _root_only()
        tree = as_found(every_kind(tmp_path / "src"))
        tree.remove(b"whiteout")  # read back as what it escapes, not as a device
    else:
        tree = linked_tree()
    image = tmp_path / "ours.cfs"
    image.write_bytes(ours(tree))
    dumped = composefs_tools.run("composefs-info", "dump", image).stdout
    assert normalise(dumped) == render(tree, composefs.content_digests(tree))


def test_digest_store_holds_each_object_once_under_its_digest(tmp_path: Path) -> None:
    tree = linked_tree()
    tree.add(Entry(b"copy", EntryType.REGULAR, 0o600, content=Content.from_bytes(
        b"content " * 100)))
    tree.add(Entry(b"other", EntryType.REGULAR, 0o600, content=Content.from_bytes(b"o" * 99)))
    store = tmp_path / "store"
    with (tmp_path / "one.cfs").open("wb") as out:
        composefs.write_with_store(tree, out, OPTIONS, digest_store=str(store))
    objects = sorted(p for p in store.rglob("*") if p.is_file())
    digests = composefs.content_digests(tree)
    names = sorted({d.hex() for d in digests.values()})
    assert [p.parent.name + p.name for p in objects] == names
    assert all(len(p.parent.name) == 2 and len(p.name) == 62 for p in objects)
    for path in objects:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        content = tree.get(next(k for k, v in digests.items()
                                if v.hex() == path.parent.name + path.name))
        assert content is not None and content.content is not None
        assert path.read_bytes() == content.content.read()
    before = {p: p.stat().st_ino for p in objects}
    second = Tree()
    second.add(Entry(b"again", EntryType.REGULAR, 0o644, content=Content.from_bytes(
        b"content " * 100)))
    second.add(Entry(b"new", EntryType.REGULAR, 0o644, content=Content.from_bytes(b"n" * 70)))
    with (tmp_path / "two.cfs").open("wb") as out:
        composefs.write_with_store(second, out, OPTIONS, digest_store=str(store))
    after = sorted(p for p in store.rglob("*") if p.is_file())
    assert len(after) == len(objects) + 1
    assert all(p.stat().st_ino == ino for p, ino in before.items())  # kept, not rewritten
    assert not [p for p in store.rglob(".tmp-*")]


def test_reprobuild_image_command_writes_image_and_store(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "big").write_bytes(b"b" * 1000)
    (source / "small").write_bytes(b"s")
    code = main(["image", "--format", "composefs", "--epoch", "0", "--digest-store",
                 str(tmp_path / "store"), str(source), str(tmp_path / "x.cfs")])
    assert code == 0, capsys.readouterr().err
    (obj,) = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert obj.read_bytes() == b"b" * 1000
    back = read_composefs(tmp_path / "x.cfs", str(tmp_path / "store"))
    big = back.get(b"big")
    assert big is not None and big.content is not None
    assert big.content.read() == b"b" * 1000


def test_reprobuild_image_writes_the_store_only_for_composefs(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_bytes(b"f" * 100)
    with pytest.raises(ImageError, match="digest store"):
        build_tree_image("erofs", str(source), str(tmp_path / "x.img"), OPTIONS,
                         digest_store=str(tmp_path / "store"))
    build_tree_image("composefs", str(source), str(tmp_path / "x.cfs"), OPTIONS,
                     digest_store=str(tmp_path / "store"))
    assert len([p for p in (tmp_path / "store").rglob("*") if p.is_file()]) == 1


def test_plan_puts_files_over_64_bytes_in_the_store_and_marks_the_root() -> None:
    tree = linked_tree()
    digests = composefs.content_digests(tree)
    layout = plan(tree, lambda entry: digests[entry.path])
    root = layout.root
    assert root.xattrs[b"trusted.overlay.opaque"] == b"y"
    names = [name for name, _, _ in root.children]
    assert names[:2] == [b".", b".."] and b"00" in names and b"ff" in names
    assert len(names) == 2 + 3 + 256
    stored = [n for n in layout.nodes if n.digest is not None]
    assert len(stored) == 1 and stored[0].nlink == 4
    assert stored[0].xattrs[b"trusted.overlay.redirect"].startswith(b"/")
    assert layout.nodes[0] is root and layout.build_time == (1, 0)


def test_options_a_composefs_image_cannot_honour_are_refused() -> None:
    for options in (ImageOptions(epoch=0, size=1 << 20), ImageOptions(epoch=0, uuid="x"),
                    ImageOptions(epoch=0, compress="lz4"),
                    ImageOptions(epoch=0, block_size=1024)):
        with pytest.raises(ImageError, match="composefs"):
            composefs.write(Tree(), io.BytesIO(), options)


def _oci_members(mtime: int) -> list[M]:
    return [dir_("etc", mtime=mtime), file("etc/conf", b"c" * 200, mtime=mtime),
            file("etc/small", b"s", mtime=mtime + 9, uid=5, gid=6),
            symlink("etc/l", "conf", mtime=mtime), dir_("var", mode=0o1777, mtime=mtime)]


@pytest.mark.tool
def test_oci_layout_gives_the_digest_of_its_unpacked_directory(
        composefs_tools: ComposefsTools, tmp_path: Path) -> None:
    _root_only()
    mtime = 1_650_000_000
    members = _oci_members(mtime)
    layout = make_layout(tmp_path / "oci", [(members, "gzip")])
    tree = load_tree(str(layout), epoch=FAR_EPOCH)
    assert (tree.root.mode, tree.root.mtime_ns) == (0o555, (mtime + 9) * 1_000_000_000)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "--numeric-owner", "-xpf", "-", "-C", unpacked],
                   input=tar_bytes(members), check=True)
    os.chmod(unpacked, 0o555)  # composefs's rule for a root no layer describes
    os.utime(unpacked, (mtime + 9, mtime + 9))
    digest = composefs_tools.run("mkcomposefs", "--print-digest-only", unpacked).stdout
    image = tmp_path / "ours.cfs"
    image.write_bytes(ours(tree))
    assert composefs.composefs_digest(image) == digest.split()[-1]
    with_root = make_layout(tmp_path / "oci2", [([dir_(".", mode=0o700, mtime=5),
                                                  *members], "gzip")])
    honoured = load_tree(str(with_root), epoch=FAR_EPOCH).root
    assert (honoured.mode, honoured.mtime_ns) == (0o700, 5_000_000_000)


@pytest.mark.tool
@pytest.mark.root
def test_mount_composefs_reads_back_the_tree(composefs_tools: ComposefsTools,
                                             tmp_path: Path) -> None:
    need(can_loop_mount(), "needs root and loop mounts")
    source = every_kind(tmp_path / "src")
    tree = as_found(source)
    image = tmp_path / "ours.cfs"
    store = tmp_path / "store"
    with image.open("wb") as out:
        composefs.write_with_store(tree, out, OPTIONS, digest_store=str(store))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = composefs_tools.run("mount.composefs", "-o", f"basedir={store}", image, mnt,
                                  check=False)
    need(mounted.returncode == 0, f"the kernel refused the composefs mount: "
                                  f"{mounted.stderr.strip()}")
    try:
        back = as_found(mnt)
        expected = as_found(source)
        for entry in expected:
            got = back.get(entry.path)
            assert got is not None, entry.path
            if entry.path == b"whiteout":  # an overlayfs whiteout for a layer above this one
                assert got.type is EntryType.REGULAR
                assert (b"trusted.overlay.whiteout", b"") in got.xattrs
                continue
            assert (got.type, got.mode, got.uid, got.gid, got.mtime_ns, got.target) == (
                entry.type, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.target)
            if entry.type is EntryType.REGULAR:
                assert got.content is not None and entry.content is not None
                assert got.content.read() == entry.content.read()
            # trusted.* is overlayfs's own namespace here; user.overlay.* marks the
            # directory holding the escaped whiteout for overlayfs's userxattr mode.
            def visible(xattrs: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
                return [(n, v) for n, v in xattrs
                        if not n.startswith((b"trusted.", b"user.overlay."))]
            assert visible(got.xattrs) == visible(entry.xattrs)
        assert len(back) == len(expected)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_an_image_reads_back_as_its_tree_with_bytes_from_the_store(tmp_path: Path) -> None:
    tree = linked_tree()
    tree.add(Entry(b"a/esc", EntryType.REGULAR, 0o600, 7, 8, 9,
                   ((b"trusted.overlay.redirect", b"/mine"), (b"user.x", b"y")),
                   content=Content.from_bytes(b"escaped xattrs " * 9)))
    image = tmp_path / "image.cfs"
    with image.open("wb") as out:
        composefs.write_with_store(tree, out, OPTIONS, digest_store=str(tmp_path / "objects"))
    back = composefs.read(image)
    assert diff_trees(tree, back) == []
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ImageError, match="does not hold"):
        read_composefs(image, str(tmp_path / "elsewhere"))


def test_a_whiteout_reads_back_as_a_whiteout(tmp_path: Path) -> None:
    tree = linked_tree()
    tree.add(Entry(b"b/gone", EntryType.CHAR, 0o644, mtime_ns=2_000_000_005))
    image = tmp_path / "image.cfs"
    with image.open("wb") as out:
        composefs.write_with_store(tree, out, OPTIONS, digest_store=str(tmp_path / "objects"))
    back = composefs.read(image)
    gone = back.get(b"b/gone")
    assert gone is not None and gone.type is EntryType.CHAR
    assert (gone.rdev_major, gone.rdev_minor) == (0, 0)
    assert b"00" not in back  # the root's own whiteouts are composefs's, not the tree's


def test_diff_tells_two_composefs_images_apart_by_their_files(tmp_path: Path) -> None:
    images = []
    for name, text in (("a", b"first " * 20), ("b", b"second " * 20)):
        tree = linked_tree()
        tree.add(Entry(b"changed", EntryType.REGULAR, 0o644, content=Content.from_bytes(text)))
        (tmp_path / name).mkdir()
        image = tmp_path / name / "image.cfs"
        with image.open("wb") as out:
            composefs.write_with_store(tree, out, OPTIONS,
                                       digest_store=str(tmp_path / name / "objects"))
        images.append(image)
    assert diffreport.detect(images[0]) == "composefs"
    report = diffreport.diff_paths(images[0], images[1])
    assert [(d.path, d.kind) for d in report.differences] == [(b"changed", "size"),
                                                              (b"changed", "content")]
