"""OCI image layouts as input: layers, whiteouts, opaque dirs, hardlinks, digests."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images import tar
from reprobuild.images.registry import FORMATS, ImageOptions, get_format
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.load import load_tree, source_kind
from reprobuild.trees.oci import tree_from_oci
from reprobuild.trees.tree import EntryType, Tree
from tests.archive_helpers import M, compress, dir_, file, hardlink, tar_bytes

EPOCH = 1_700_000_000
LAYER_MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
               "none": "application/vnd.oci.image.layer.v1.tar"}


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _manifest(layout: Path, layers: list[tuple[list[M], str]]) -> dict[str, object]:
    config = _blob(layout, b'{"architecture":"amd64","os":"linux","rootfs":{}}')
    descriptors = []
    for members, method in layers:
        descriptor = _blob(layout, compress(tar_bytes(members), method))
        descriptors.append({"mediaType": LAYER_MEDIA[method], **descriptor})
    manifest = {"schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                "layers": descriptors}
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            **_blob(layout, json.dumps(manifest).encode())}


def make_layout(layout: Path, layers: list[tuple[list[M], str]],
                platforms: list[tuple[str, str]] | None = None) -> Path:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifests = []
    for plat in platforms or [("", "")]:
        descriptor = _manifest(layout, layers)
        if plat[0]:
            descriptor["platform"] = {"os": plat[0], "architecture": plat[1]}
        manifests.append(descriptor)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                   "manifests": manifests}))
    return layout


def layers(mtime: int, methods: tuple[str, str, str] = ("gzip", "zstd", "gzip")
           ) -> list[tuple[list[M], str]]:
    """Three layers exercising whiteouts, an opaque dir and hardlinks across layers."""
    t = {"mtime": mtime}
    lower = [
        dir_("etc", **t), file("etc/a", b"a1", **t), file("etc/b", b"b1", **t),
        dir_("usr", **t), dir_("usr/lib", **t), file("usr/lib/x", b"x", **t),
        dir_("usr/lib/sub", **t), file("usr/lib/sub/deep", b"deep", **t),
        dir_("data", **t), file("data/keep", b"k1", **t),
        dir_("bin", **t), file("bin/tool", b"T", mode=0o755, **t),
        hardlink("bin/tool-link", "bin/tool", **t),
        dir_("opt", **t), dir_("opt/d", **t), file("opt/d/old", b"old", **t),
    ]
    middle = [
        file("etc/.wh.a", **t), file("etc/c", b"c2", **t),
        dir_("usr/lib", mode=0o700, **t), file("usr/lib/.wh..wh..opq", **t),
        dir_("usr/lib/sub", **t), file("usr/lib/sub/new", b"new", **t),
        file("usr/lib/z", b"z", **t),
        file("data/keep", b"k2", mode=0o600, **t),
        dir_("sbin", **t),
        hardlink("sbin/tool", "bin/tool", **t), hardlink("sbin/tool2", "bin/tool", **t),
        file("bin/tool-link", b"NEW", **t),
        file("opt/.wh.d", **t),
        file("var-newest", b"gone", mtime=mtime + 500),
    ]
    upper = [file("bin/.wh.tool", **t), file(".wh.var-newest", **t)]
    return [(lower, methods[0]), (middle, methods[1]), (upper, methods[2])]


def unpacked_by_hand(root: Path, mtime: int) -> Path:
    """The merged root filesystem of :func:`layers`, made directly."""
    def put(rel: str, data: bytes, mode: int = 0o644) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)

    put("etc/b", b"b1")
    put("etc/c", b"c2")
    put("usr/lib/sub/new", b"new")
    put("usr/lib/z", b"z")
    put("data/keep", b"k2", 0o600)
    put("bin/tool-link", b"NEW")
    put("sbin/tool", b"T", 0o755)
    os.link(root / "sbin/tool", root / "sbin/tool2")
    (root / "opt").mkdir()
    (root / "usr/lib").chmod(0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
    root.chmod(0o555)
    # No layer carries ./ : the root is 0555 with the newest mtime after whiteouts.
    os.utime(root, (mtime, mtime))
    return root


def test_layers_merge_like_the_tree_unpacked_by_hand(tmp_path: Path) -> None:
    mtime = 1_600_000_000
    layout = make_layout(tmp_path / "oci", layers(mtime))
    assert source_kind(layout) == "oci"
    merged = load_tree(layout, epoch=EPOCH)
    expected = tree_from_directory(unpacked_by_hand(tmp_path / "root", mtime),
                                   preserve_mtime=True).normalized(epoch=EPOCH)
    assert [d.display() for d in diff_trees(merged, expected)] == []
    # The group that lost its lower primary keeps the old bytes; the replaced path not.
    tool = merged.get(b"sbin/tool")
    assert tool is not None and tool.content is not None and tool.content.read() == b"T"
    assert merged.resolve(merged.get(b"sbin/tool2")).path == b"sbin/tool"  # type: ignore[arg-type]
    link = merged.get(b"bin/tool-link")
    assert link is not None and link.type is EntryType.REGULAR


def test_compression_of_layers_changes_nothing(tmp_path: Path) -> None:
    trees: list[Tree] = []
    images: list[bytes] = []
    for n, methods in enumerate((("gzip", "gzip", "gzip"), ("zstd", "zstd", "zstd"),
                                 ("none", "gzip", "zstd"))):
        layout = make_layout(tmp_path / f"oci{n}", layers(1_600_000_000, methods))
        tree = load_tree(layout, epoch=EPOCH)
        trees.append(tree)
        out = io.BytesIO()
        tar.write(tree, out, ImageOptions(epoch=EPOCH))
        images.append(out.getvalue())
    assert diff_trees(trees[0], trees[1]) == []
    assert diff_trees(trees[0], trees[2]) == []
    assert images[0] == images[1] == images[2]


@pytest.mark.parametrize("fmt", sorted(n for n, f in FORMATS.items() if f.kind == "tree"))
def test_same_image_from_layers_and_from_unpacked_root(tmp_path: Path, fmt: str) -> None:
    # Store semantics for a directory: owners root, mtimes the epoch. Layers whose
    # times are all after the epoch are clamped to the same values.
    writer = get_format(fmt).load()
    mtime = EPOCH + 1000
    layout = make_layout(tmp_path / "oci", layers(mtime))
    root = unpacked_by_hand(tmp_path / "root", mtime)
    outputs = []
    # FAT has no hardlinks: the vfat writer stores each as a copy when asked.
    extra = (("hardlinks", "copy"),) if fmt == "vfat" else ()
    for n, source in enumerate((layout, root)):
        with (tmp_path / f"image{n}").open("w+b") as out:
            writer.write(load_tree(source, epoch=EPOCH), out,
                         ImageOptions(epoch=EPOCH, extra=extra))
        outputs.append((tmp_path / f"image{n}").read_bytes())
    assert outputs[0] == outputs[1]


def test_root_metadata_from_the_layer_that_carries_it(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "oci", [
        ([dir_("./", mode=0o700, uid=5, mtime=1234), file("a", b"1", mtime=99999)], "gzip"),
        ([file("b", b"2", mtime=5)], "gzip")])
    tree = tree_from_oci(layout)
    assert (tree.root.mode, tree.root.uid, tree.root.mtime_ns) == (0o700, 5, 1234 * 10**9)


def test_root_without_dot_member(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "oci", [
        ([file("a", b"1", mtime=100), file("z", b"2", mtime=900)], "gzip"),
        ([file(".wh.z", mtime=1)], "gzip")])
    tree = tree_from_oci(layout)
    # Newest after the whiteout removed z: a's 100 s.
    assert (tree.root.mode, tree.root.uid, tree.root.mtime_ns) == (0o555, 0, 100 * 10**9)


def test_opaque_dir_keeps_its_own_layer(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "oci", [
        ([dir_("d"), file("d/lower", b"l")], "gzip"),
        # The marker comes after this layer's own files: they still survive.
        ([file("d/upper", b"u"), file("d/.wh..wh..opq")], "gzip")])
    tree = tree_from_oci(layout)
    assert [c.name for c in tree.children(b"d")] == [b"upper"]


def test_whiteout_does_not_hide_the_same_layer(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "oci", [
        ([file("f", b"lower")], "gzip"),
        ([file("f", b"upper"), file(".wh.f")], "gzip")])
    entry = tree_from_oci(layout).get(b"f")
    assert entry is not None and entry.content is not None
    assert entry.content.read() == b"upper"


def test_platform_choice(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "oci", [([file("a", b"1")], "gzip")],
                         platforms=[("linux", "arm64"), ("linux", "amd64")])
    assert tree_from_oci(layout).get(b"a") is not None
    assert tree_from_oci(layout, platform=("linux", "arm64")).get(b"a") is not None
    with pytest.raises(ImageError, match="no manifest for linux/riscv64") as info:
        tree_from_oci(layout, platform=("linux", "riscv64"))
    assert "linux/arm64, linux/amd64" in str(info.value)


def test_blob_digest_is_verified(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "oci", [([file("a", b"1")], "gzip")])
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest[7:]).read_bytes())
    layer = manifest["layers"][0]["digest"]
    blob = layout / "blobs/sha256" / layer[7:]
    blob.write_bytes(compress(tar_bytes([file("a", b"evil")]), "gzip"))
    actual = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    with pytest.raises(ImageError) as info:
        load_tree(layout, epoch=EPOCH)
    assert layer in info.value.message and actual in info.value.message


def test_duplicate_in_one_layer_and_hostile_names(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "a", [([file("x", b"1"), file("x", b"2")], "gzip")])
    with pytest.raises(ImageError, match="duplicate member 'x'"):
        tree_from_oci(layout)
    layout = make_layout(tmp_path / "b", [([file("../x", b"1")], "gzip")])
    with pytest.raises(ImageError, match=r"'\.\.'"):
        tree_from_oci(layout)
    layout = make_layout(tmp_path / "c", [([M("lib", b"2", linkname="usr/lib")], "gzip"),
                                          ([file("lib/evil", b"1")], "gzip")])
    with pytest.raises(ImageError, match="symlink"):
        tree_from_oci(layout)


def test_unsupported_media_type(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "oci", [([file("a", b"1")], "gzip")])
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / digest[7:]).read_bytes())
    manifest["layers"][0]["mediaType"] = "application/x-squashfs"
    index["manifests"][0] = {"mediaType": index["manifests"][0]["mediaType"],
                             **_blob(layout, json.dumps(manifest).encode())}
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="unsupported media type"):
        tree_from_oci(layout)


def test_layer_order_matters_only_where_layers_overlap(tmp_path: Path) -> None:
    one = ([file("a", b"1")], "gzip")
    two = ([file("b", b"2")], "zstd")
    over = ([file("a", b"3")], "gzip")
    trees = [tree_from_oci(make_layout(tmp_path / f"oci{n}", order))
             for n, order in enumerate(([one, two], [two, one], [one, over], [over, one]))]
    assert diff_trees(trees[0], trees[1]) == []
    assert [d.kind for d in diff_trees(trees[2], trees[3])] == ["content"]


@pytest.mark.slow
def test_debian_minbase_as_a_layer(debian_minbase_tar: Path, tmp_path: Path) -> None:
    """A real root filesystem as a zstd layer, plus a layer of whiteouts over it."""
    import zstandard

    layout = tmp_path / "oci"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    packed = tmp_path / "layer.tar.zst"
    with debian_minbase_tar.open("rb") as src, packed.open("wb") as dst:
        zstandard.ZstdCompressor(level=1).copy_stream(src, dst)
    digest = hashlib.sha256(packed.read_bytes()).hexdigest()
    packed.rename(layout / "blobs" / "sha256" / digest)
    upper = compress(tar_bytes([file("etc/.wh.hostname"), file("usr/share/doc/.wh..wh..opq"),
                                file("usr/share/doc/README", b"gone", mtime=EPOCH)]), "gzip")
    upper_blob = _blob(layout, upper)
    config = _blob(layout, b"{}")
    manifest = {"schemaVersion": 2, "config": {"mediaType": "x", **config}, "layers": [
        {"mediaType": LAYER_MEDIA["zstd"], "digest": f"sha256:{digest}",
         "size": (layout / "blobs" / "sha256" / digest).stat().st_size},
        {"mediaType": LAYER_MEDIA["gzip"], **upper_blob}]}
    descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                  **_blob(layout, json.dumps(manifest).encode())}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                   "manifests": [descriptor]}))
    merged = load_tree(layout, epoch=EPOCH)
    expected = load_tree(debian_minbase_tar, epoch=EPOCH)
    differences = {(d.path, d.kind) for d in diff_trees(expected, merged)}
    gone = {(e.path, "only-in-a") for e in expected
            if e.path == b"etc/hostname" or e.path.startswith(b"usr/share/doc/")}
    assert gone and differences == gone | {(b"usr/share/doc/README", "only-in-b")}


def test_whiteout_of_a_directory_this_layer_writes_into(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "oci", [
        ([dir_("a"), file("a/lower", b"l"), dir_("a/sub"), file("a/sub/x", b"x")], "gzip"),
        ([file("a/new", b"n"), file(".wh.a"), file("a/sub/y", b"y")], "gzip")])
    tree = tree_from_oci(layout)
    assert sorted(e.path for e in tree if e.path.startswith(b"a")) == [
        b"a", b"a/new", b"a/sub", b"a/sub/y"]
