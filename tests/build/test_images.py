"""Image steps through the engine: OCI layout sources, spooling on /build, fs-verity digests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from reprobuild.build.inputs import path_hash
from reprobuild.build.plan import plan
from reprobuild.build.recipe import OciSource, load_recipe
from reprobuild.build.sandboxing import image_spec
from reprobuild.errors import RecipeError
from reprobuild.images import tar as tar_image
from reprobuild.images.build import build_image
from reprobuild.images.composefs import image as composefs
from reprobuild.images.erofs import image as erofs
from reprobuild.integrity.fsverity import digest_file
from tests.archive_helpers import M, compress, dir_, file, tar_bytes
from tests.build.test_engine import build, fakecli
from tests.build.test_sandboxed import need_sandbox
from tests.conftest import Unprivileged

EPOCH = 1_700_000_000
LATER = {"mtime": EPOCH + 100}  # clamped to the epoch, as a store directory's times are
LAYER_MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_oci_layout(layout: Path, layers: list[tuple[list[M], str]]) -> Path:
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config = _blob(layout, b'{"architecture":"amd64","os":"linux","rootfs":{}}')
    manifest = {"schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                "layers": [{"mediaType": LAYER_MEDIA[method],
                            **_blob(layout, compress(tar_bytes(members), method))}
                           for members, method in layers]}
    descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                  **_blob(layout, json.dumps(manifest).encode())}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                   "manifests": [descriptor]}))
    return layout


def two_layers() -> list[tuple[list[M], str]]:
    """A gzip layer, then a zstd one that whites out a file, replaces one and adds more.

    Modes are the store's (0444/0555) so the hand-unpacked tree, imported by a path
    source and canonicalised, must give the same image.
    """
    lower = [dir_("etc", 0o555, **LATER), file("etc/keep", b"keep\n", mode=0o444, **LATER),
             file("etc/gone", b"gone\n", mode=0o444, **LATER),
             file("etc/replaced", b"old\n", mode=0o444, **LATER),
             dir_("bin", 0o555, **LATER), file("bin/tool", b"#!tool\n", mode=0o555, **LATER)]
    upper = [file("etc/.wh.gone", b"", **LATER),
             file("etc/replaced", b"new\n", mode=0o444, **LATER),
             dir_("usr", 0o555, **LATER), dir_("usr/share", 0o555, **LATER),
             file("usr/share/doc", b"doc\n", mode=0o444, **LATER)]
    return [(lower, "gzip"), (upper, "zstd")]


def unpacked_by_hand(root: Path) -> Path:
    for rel, data, mode in (("etc/keep", b"keep\n", 0o444), ("etc/replaced", b"new\n", 0o444),
                            ("bin/tool", b"#!tool\n", 0o555),
                            ("usr/share/doc", b"doc\n", 0o444)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    return root


OCI_RECIPE = f"""
epoch = {EPOCH}
[sources.base]
oci = "layout"
[sources.unpacked]
path = "root"
[images.from-oci]
from = "base"
format = "tar"
[images.from-tree]
from = "unpacked"
format = "tar"
"""


def oci_recipe(directory: Path, extra: str = "") -> Path:
    make_oci_layout(directory / "layout", two_layers())
    unpacked_by_hand(directory / "root")
    path = directory / "r.toml"
    path.write_text(OCI_RECIPE + extra)
    return path


def check_same_tar(from_oci: Path, from_tree: Path) -> None:
    assert from_oci.read_bytes() == from_tree.read_bytes()
    tree = tar_image.read(str(from_oci))
    replaced = tree.get(b"etc/replaced")
    assert replaced is not None and replaced.content is not None
    assert replaced.content.read() == b"new\n"
    assert tree.get(b"etc/gone") is None  # the whiteout applied
    assert tree.get(b"usr/share/doc") is not None


def test_oci_source_builds_the_image_of_the_unpacked_tree(tmp_path: Path) -> None:
    step = """
[sources.sh]
host = "/bin/sh"
[steps.manifests]
inputs = ["sh", "base"]
builder = ["sh", "-c", "cat $base/index.json > $out"]
"""
    path = oci_recipe(tmp_path, step)
    recipe = load_recipe(str(path))
    assert isinstance(recipe.sources["base"], OciSource)
    report, _runner = build(str(path), tmp_path / "store",
                            ["from-oci", "from-tree", "manifests"])
    assert report.ok, report.failures
    check_same_tar(Path(report.entries["from-oci"].path),
                   Path(report.entries["from-tree"].path))
    # A step sees the layout itself, as imported.
    manifests = Path(report.entries["manifests"].path).read_text()
    assert manifests == (tmp_path / "layout" / "index.json").read_text()


def test_oci_source_pin_and_layout_check(tmp_path: Path) -> None:
    path = oci_recipe(tmp_path)
    pin = path_hash(str(tmp_path / "layout"))
    path.write_text(path.read_text().replace('oci = "layout"',
                                             f'oci = "layout"\nblake3 = "{pin}"'))
    plan(load_recipe(str(path)), ["from-oci"])  # the right pin passes
    path.write_text(path.read_text().replace(pin, "0" * 64))
    with pytest.raises(RecipeError, match=r"\[sources.base\] blake3: .* hashes to "):
        plan(load_recipe(str(path)), ["from-oci"])
    path.write_text(OCI_RECIPE.replace('oci = "layout"', 'oci = "root"'))
    with pytest.raises(RecipeError, match=r"\[sources.base\] oci: .*root is not an OCI image"):
        plan(load_recipe(str(path)), ["from-oci"])


@pytest.mark.userns
def test_oci_source_in_the_real_sandbox(unprivileged: Unprivileged) -> None:
    need_sandbox()
    work = unprivileged.scratch("oci-source")
    path = oci_recipe(work)
    unprivileged.run(["chmod", "-R", "a+rwX", str(work)], check=False)
    result = unprivileged.reprobuild("build", "--json", "--no-out-link", "--store",
                                     str(work / "store"), str(path), cwd=work)
    assert result.returncode == 0, result.stderr
    rows = {row["target"]: row for row in json.loads(result.stdout)}
    check_same_tar(Path(rows["from-oci"]["path"]), Path(rows["from-tree"]["path"]))


def test_image_step_spools_into_its_scratch_directory(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Compressed layers are spooled under the job's scratch (/build), never $TMPDIR."""
    import reprobuild.trees.tar_reader as tarinput

    layout = make_oci_layout(tmp_path / "layout", two_layers())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tarinput, "_default_spool", None)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "no-such-tmpdir"))
    spooled: list[bytes] = []
    store = tarinput.Spool.store

    def spy(self: tarinput.Spool, *args: object, **kwargs: object) -> object:
        spooled.append(self.directory)
        return store(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tarinput.Spool, "store", spy)
    output = tmp_path / "image.tar"
    build_image({"name": "img", "format": "tar", "kind": "tree", "epoch": EPOCH,
                 "from": str(layout), "options": {}, "files": {}, "output": str(output),
                 "scratch": str(scratch)})
    assert spooled and all(d.startswith(os.fsencode(scratch) + b"/") for d in spooled)
    assert list(scratch.iterdir()) == []  # the spool went with the step
    names = {e.path for e in tar_image.read(str(output))}
    assert b"usr/share/doc" in names and b"etc/gone" not in names


def test_image_spec_gives_the_step_build_as_scratch(tmp_path: Path) -> None:
    path = oci_recipe(tmp_path)
    node = plan(load_recipe(str(path)), ["from-oci"]).nodes["from-oci"]
    spec = image_spec(node, {"base": (node, str(tmp_path / "layout"))}, str(tmp_path / "b"),
                      str(tmp_path / "o"), epoch=EPOCH, cores=1)
    job = json.loads(spec.argv[-1])
    assert job["scratch"] == "/build"
    assert any(m.target == "/build" and m.writable for m in spec.mounts)


DISK_RECIPE = f"""
epoch = {EPOCH}
[sources.files]
path = "files"
[images.root]
from = "files"
format = "erofs"
[images.root-verity]
from = "root"
format = "verity"
[images.root-appended]
from = "root"
format = "verity"
append = true
[images.disk]
format = "gpt"
seed = "test"
partitions = [
  {{ from = "root", type = "root-x86-64", label = "root" }},
  {{ from = "root-verity", type = "root-x86-64-verity", label = "root-verity" }},
]
"""


def test_image_steps_record_the_fsverity_digest_of_the_image_file(tmp_path: Path) -> None:
    (tmp_path / "files" / "etc").mkdir(parents=True)
    (tmp_path / "files" / "etc" / "motd").write_text("sealed\n")
    path = tmp_path / "r.toml"
    path.write_text(DISK_RECIPE)
    targets = ["root", "root-verity", "root-appended", "disk"]
    proc = fakecli("build", "--json", "--no-out-link", "--store", str(tmp_path / "store"),
                   str(path), *targets, cwd=tmp_path)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    rows = {row["target"]: row for row in json.loads(out)}
    root = rows["root"]["path"]
    assert rows["root"]["fsverity"] == erofs.fsverity_digest(root)
    main_files = {"root-verity": "hash", "root-appended": "image", "disk": "disk.raw"}
    for target, name in main_files.items():
        image = os.path.join(rows[target]["path"], name)
        assert rows[target]["fsverity"] == digest_file(image).hex(), target
        meta = json.loads((tmp_path / "store" / "meta" /
                           f"{rows[target]['derivation']}.json").read_text())
        assert meta["fsverity_file"] == name
    # Distinct files, distinct digests: each row names its own image file.
    assert len({rows[t]["fsverity"] for t in targets}) == len(targets)


@pytest.mark.parametrize("many", [0, 300])  # 300: hashed by two processes in the step
def test_a_composefs_image_step_outputs_the_image_and_its_digest_store(
        tmp_path: Path, many: int) -> None:
    (tmp_path / "files" / "etc").mkdir(parents=True)
    (tmp_path / "files" / "etc" / "motd").write_text("composed\n" * 20)
    (tmp_path / "files" / "etc" / "short").write_text("inline\n")
    if many:
        (tmp_path / "files" / "many").mkdir()
    for index in range(many):
        (tmp_path / "files" / "many" / f"f{index:03d}").write_text(f"file {index}\n" * 20)
    path = tmp_path / "r.toml"
    path.write_text(f'epoch = {EPOCH}\n[sources.files]\npath = "files"\n'
                    '[images.root]\nfrom = "files"\nformat = "composefs"\n')
    proc = fakecli("build", "--json", "--no-out-link", "--store", str(tmp_path / "store"),
                   str(path), "root", cwd=tmp_path)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    (row,) = json.loads(out)
    result = Path(row["path"])
    assert sorted(p.name for p in result.iterdir()) == ["image.cfs", "objects"]
    assert row["fsverity"] == composefs.composefs_digest(result / "image.cfs")
    objects = sorted(p for p in (result / "objects").rglob("*") if p.is_file())
    assert len(objects) == 1 + many  # the inline file is in the image
    for each in objects:
        assert each.parent.name + each.name == digest_file(each).hex()
    assert "composed\n" * 20 in [each.read_text() for each in objects]
