"""GPT disks: layout plan, sgdisk/sfdisk checks, verity pairs, read-back and kernel mount."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images import registry
from reprobuild.images import verity as verity_image
from reprobuild.images.gpt import image as gpt
from reprobuild.images.gpt import layout as gpt_layout
from reprobuild.images.registry import ImageOptions
from reprobuild.integrity import verity
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.conftest import REPO, Unprivileged, need, need_tool
from tests.patterns import pattern

OPTIONS = ImageOptions(epoch=1700000000)
MiB = 1 << 20


def sample_tree() -> Tree:
    tree = Tree()
    tree.add(Entry(b"etc", EntryType.DIRECTORY, 0o755, mtime_ns=1700000000 * 10**9))
    tree.add(Entry(b"etc/hostname", EntryType.REGULAR, 0o644, mtime_ns=1700000000 * 10**9,
                   content=Content.from_bytes(b"sealed\n")))
    tree.add(Entry(b"bin", EntryType.DIRECTORY, 0o755, mtime_ns=1700000000 * 10**9))
    tree.add(Entry(b"bin/tool", EntryType.REGULAR, 0o755, mtime_ns=1700000000 * 10**9,
                   content=Content.from_bytes(pattern(300_000, 1))))
    tree.add(Entry(b"bin/link", EntryType.SYMLINK, 0o777, mtime_ns=1700000000 * 10**9,
                   target=b"tool"))
    return tree


def filesystem_image(tmp_path: Path, tree: Tree) -> tuple[Path, str]:
    """An image of ``tree`` from our EROFS writer, or mkfs.ext4 -d when it is missing."""
    image = tmp_path / "root.img"
    try:
        from reprobuild.images.erofs import image as erofs
    except ImportError:
        erofs = None  # type: ignore[assignment]
    if erofs is not None:
        with image.open("wb") as f:
            erofs.write(tree, f, OPTIONS)
        size = image.stat().st_size
        if size % 4096:
            with image.open("r+b") as f:
                f.truncate(-(-size // 4096) * 4096)
        return image, "erofs"
    need_tool("mkfs.ext4")
    src = tmp_path / "src"
    for entry in tree:
        path = src / entry.path.decode()
        if entry.type is EntryType.DIRECTORY:
            path.mkdir(parents=True, exist_ok=True)
        elif entry.type is EntryType.SYMLINK:
            assert entry.target is not None
            path.symlink_to(entry.target.decode())
        else:
            assert entry.content is not None
            path.write_bytes(entry.content.read())
            path.chmod(entry.mode)
    with image.open("wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(src), str(image)], check=True)
    return image, "ext4"


def sealed_disk(tmp_path: Path, data: Path, *, seed: str | None = "appliance-1",
                kind: str = "root") -> Path:
    verity_dir = tmp_path / "verity-out"
    verity_image.build({kind: str(data)}, {"from": kind, "format": "verity"}, OPTIONS,
                       str(verity_dir))
    table: dict[str, object] = {"format": "gpt", "partitions": [
        {"from": kind, "type": f"{kind}-x86-64", "label": kind, "read-only": True},
        {"from": f"{kind}-verity", "type": f"{kind}-x86-64-verity", "label": f"{kind}-verity",
         "read-only": True},
        {"type": "esp", "label": "ESP", "size": "4M", "no-auto": True},
        {"type": "home", "label": "home", "size": "1M", "growfs": True},
    ]}
    if seed is not None:
        table["seed"] = seed
    out = tmp_path / "disk"
    gpt.build({kind: str(data), f"{kind}-verity": str(verity_dir)}, table, OPTIONS, str(out))
    return out


def test_registry_lists_gpt_and_verity() -> None:
    assert registry.get_format("gpt").kind == "disk"
    assert registry.get_format("verity").kind == "disk"
    assert gpt.inputs_of({"partitions": [{"from": "a", "type": "esp"}, {"type": "swap",
                                                                          "size": 4096},
                                         {"from": "b", "type": "home"},
                                         {"from": "a", "type": "srv"}]}) == ["a", "b"]
    with pytest.raises(ImageError, match="unknown key"):
        gpt.inputs_of({"partitions": [{"from": "a", "typo": "esp"}]})


def test_an_esp_must_hold_a_fat_file_system(tmp_path: Path) -> None:
    """Firmware takes an ESP of anything else for a broken one: refused, naming the input."""
    data = tmp_path / "data.img"
    data.write_bytes(pattern(MiB, 5))
    table = {"format": "gpt", "partitions": [{"from": "esp", "type": "esp"}]}
    with pytest.raises(ImageError, match="'esp' is not a FAT file system") as raised:
        gpt.build({"esp": str(data)}, table, OPTIONS, str(tmp_path / "bad"))
    assert raised.value.hint is not None and "vfat" in raised.value.hint
    fat = bytearray(MiB)  # a FAT16 boot sector's signature and type string suffice
    fat[54:59], fat[510:512] = b"FAT16", b"\x55\xaa"
    data.write_bytes(bytes(fat))
    gpt.build({"esp": str(data)}, table, OPTIONS, str(tmp_path / "good"))
    assert (tmp_path / "good" / "disk.raw").stat().st_size > MiB
    assert not (tmp_path / "good" / "disk.roothash").exists()


def test_plan_aligns_partitions_and_places_backup() -> None:
    specs = [gpt_layout.PartitionSpec("a", gpt_layout.PARTITION_TYPES["esp"], str(uuid.UUID(
        int=1)), content_size=MiB + 1),
             gpt_layout.PartitionSpec("b", gpt_layout.PARTITION_TYPES["swap"], str(uuid.UUID(
                 int=2)), content_size=0, size=3 * MiB)]
    layout = gpt_layout.plan(specs, disk_guid=str(uuid.UUID(int=3)))
    first, second = layout.partitions
    assert (first.first_lba, first.last_lba) == (2048, 2048 + 4096 - 1)
    assert (second.first_lba, second.last_lba) == (2048 * 3, 2048 * 6 - 1)
    assert layout.size == 7 * MiB
    assert layout.first_usable_lba == 34
    assert layout.last_usable_lba == layout.total_lbas - 34
    big = gpt_layout.plan(specs, disk_guid=str(uuid.UUID(int=3)), sector_size=4096)
    assert big.first_usable_lba == 6 and big.partitions[0].first_lba == 256
    with pytest.raises(ImageError, match="too small"):
        gpt_layout.plan(specs, disk_guid=str(uuid.UUID(int=3)), disk_size=6 * MiB)


def test_headers_carry_valid_crcs_and_parse_back() -> None:
    specs = [gpt_layout.PartitionSpec("ünïcode", gpt_layout.type_guid("root-arm64"),
                                      "01234567-89ab-cdef-0123-456789abcdef", 4096,
                                      attributes=1 << 60)]
    layout = gpt_layout.plan(specs, disk_guid="fedcba98-7654-3210-fedc-ba9876543210")
    entries = gpt_layout.entry_array(layout)
    head = (gpt_layout.protective_mbr(layout) + gpt_layout.header(layout, entries, primary=True)
            + entries)
    assert head[450] == 0xEE and head[510:512] == b"\x55\xaa"
    # Mixed-endian GUID: the first three fields little endian.
    assert entries[16:20] == bytes.fromhex("67452301")
    table = gpt_layout.parse(head, 512, "test")
    (entry,) = table.entries
    assert entry.name == "ünïcode"
    assert entry.uuid == "01234567-89ab-cdef-0123-456789abcdef"
    assert entry.type_guid == "b921b045-1df0-41c3-af44-4c6f280d3fae"
    assert table.disk_guid == "fedcba98-7654-3210-fedc-ba9876543210"
    corrupt = bytearray(head)
    corrupt[512 + 40] ^= 1
    with pytest.raises(ImageError, match="CRC"):
        gpt_layout.parse(bytes(corrupt), 512, "test")
    with pytest.raises(ImageError, match="36"):
        gpt_layout.encode_name("x" * 37)


@pytest.mark.tool
def test_sgdisk_and_sfdisk_accept_a_sealed_disk(tmp_path: Path) -> None:
    need_tool("sgdisk", "sfdisk")
    data = tmp_path / "root.img"
    data.write_bytes(pattern(3 * MiB, 2))
    out = sealed_disk(tmp_path, data)
    disk = out / "disk.raw"
    check = subprocess.run(["sgdisk", "-v", str(disk)], capture_output=True, text=True)
    assert check.returncode == 0 and "No problems found" in check.stdout, check.stdout
    listed = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], check=True,
                                       capture_output=True, text=True).stdout)
    table = listed["partitiontable"]
    assert table["label"] == "gpt"
    assert table["id"].lower() == gpt_layout.derive_guid("appliance-1", "disk")
    parts = table["partitions"]
    root_hash = bytes.fromhex((tmp_path / "verity-out" / "roothash").read_text().strip())
    assert [p["type"].lower() for p in parts] == [
        gpt_layout.PARTITION_TYPES[n] for n in ("root-x86-64", "root-x86-64-verity", "esp",
                                                "home")]
    assert [p["name"] for p in parts] == ["root", "root-verity", "ESP", "home"]
    assert parts[0]["uuid"].lower() == str(uuid.UUID(bytes=root_hash[:16]))
    assert parts[1]["uuid"].lower() == str(uuid.UUID(bytes=root_hash[16:]))
    assert parts[2]["uuid"].lower() == gpt_layout.derive_guid("appliance-1",
                                                              "partition\0ESP")
    assert [p.get("attrs") for p in parts] == ["GUID:60", "GUID:60", "GUID:63", "GUID:59"]
    assert [p["start"] for p in parts] == [2048, 2048 * 4, 2048 * 5, 2048 * 9]
    assert (out / "cmdline").read_text() == f"roothash={root_hash.hex()}\n"
    # systemd-dissect's sidecar convention: NAME.raw beside NAME.roothash.
    assert (out / "disk.roothash").read_text() == root_hash.hex() + "\n"
    assert not (out / "disk.usrhash").exists()
    summary = json.loads((out / "disk.json").read_text())
    assert summary["partitions"][1]["type"] == "root-x86-64-verity"


@pytest.mark.tool
def test_partitions_read_back_and_verity_checks_out(tmp_path: Path) -> None:
    need_tool("veritysetup")
    data = tmp_path / "usr.img"
    data.write_bytes(pattern(2 * MiB, 3))
    out = sealed_disk(tmp_path, data, kind="usr", seed=None)
    assert (out / "cmdline").read_text().startswith("usrhash=")
    assert (out / "cmdline").read_text() == f"usrhash={(out / 'disk.usrhash').read_text()}"
    tree = gpt.read(out)
    names = [e.path for e in tree if e.path]
    assert names == [b"1-usr", b"2-usr-verity", b"3-ESP", b"4-home"]
    usr = tree.get(b"1-usr")
    hashes = tree.get(b"2-usr-verity")
    assert usr is not None and usr.content is not None
    assert hashes is not None and hashes.content is not None
    assert usr.content.read() == data.read_bytes()  # partition is exactly the image
    extracted = tmp_path / "usr-part"
    hash_part = tmp_path / "hash-part"
    extracted.write_bytes(usr.content.read())
    hash_part.write_bytes(hashes.content.read())
    root_hash = (tmp_path / "verity-out" / "roothash").read_text().strip()
    verity.verify(extracted, hash_part, root_hash)
    subprocess.run(["veritysetup", "verify", str(extracted), str(hash_part), root_hash],
                   check=True, capture_output=True)


def test_verity_pair_must_match_its_data(tmp_path: Path) -> None:
    data = tmp_path / "root.img"
    other = tmp_path / "other.img"
    data.write_bytes(pattern(MiB, 4))
    other.write_bytes(pattern(MiB, 5))
    verity_image.build({"root": str(other)}, {"from": "root", "format": "verity"}, OPTIONS,
                       str(tmp_path / "v"))
    table = {"format": "gpt", "partitions": [
        {"from": "root", "type": "root-x86-64"},
        {"from": "v", "type": "root-x86-64-verity"}]}
    with pytest.raises(ImageError, match="hash tree of other data"):
        gpt.build({"root": str(data), "v": str(tmp_path / "v")}, table, OPTIONS,
                  str(tmp_path / "disk"))


def test_same_disk_from_different_places(tmp_path: Path) -> None:
    disks = []
    for attempt, umask in ((1, 0o022), (2, 0o077)):
        place = tmp_path / f"build{attempt}" / "deeper"
        place.mkdir(parents=True)
        data = place / f"image-{attempt}.img"
        data.write_bytes(pattern(MiB, 6))
        old = os.umask(umask)
        try:
            out = sealed_disk(place, data, seed=None)
        finally:
            os.umask(old)
        disks.append(((out / "disk.raw").read_bytes(), (out / "disk.json").read_text(),
                      (out / "cmdline").read_text()))
    assert disks[0] == disks[1]


@pytest.mark.root
def test_kernel_mounts_a_partition_read_back_from_the_disk(
        tmp_path: Path, mount_image: Callable[..., Path]) -> None:
    tree = sample_tree()
    image, fstype = filesystem_image(tmp_path, tree)
    out = sealed_disk(tmp_path, image)
    listed = gpt.read_table(out)
    root = listed.entries[0]
    mounted = mount_image(out / "disk.raw", fstype, offset=root.first_lba * 512)
    back = tree_from_directory(mounted, epoch=1700000000)
    if fstype == "ext4":
        back.remove(b"lost+found")
    differences = diff_trees(tree.normalized(epoch=1700000000), back, compare_mtime=False,
                             compare_root=False)
    assert differences == []


@pytest.mark.tool
def test_verity_image_output(tmp_path: Path) -> None:
    need_tool("veritysetup")
    data = tmp_path / "root.img"
    data.write_bytes(pattern(MiB, 7))
    out = tmp_path / "v"
    table = {"from": "root", "format": "verity", "hash-algorithm": "sha512",
             "data-block-size": 1024, "salt": "abcd"}
    options = ImageOptions(epoch=0, uuid="11111111-2222-4333-8444-555555555555")
    assert verity_image.inputs_of(table) == ["root"]
    verity_image.build({"root": str(data)}, table, options, str(out))
    root_hash = (out / "roothash").read_text()
    assert root_hash.endswith("\n") and len(root_hash.strip()) == 128
    info = json.loads((out / "verity.json").read_text())
    assert info["salt"] == "abcd" and info["uuid"] == options.uuid
    assert info["data_blocks"] == 1024 and info["hash_algorithm"] == "sha512"
    subprocess.run(["veritysetup", "verify", str(data), str(out / "hash"), root_hash.strip()],
                   check=True, capture_output=True)
    assert [e.path for e in verity_image.read(out) if e.path] == [b"hash", b"roothash",
                                                                   b"verity.json"]
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 5000)
    with pytest.raises(ImageError, match="not a multiple"):
        verity_image.build({"root": str(odd)}, {"from": "root"}, OPTIONS, str(tmp_path / "o"))


@pytest.mark.root
@pytest.mark.tool
def test_4k_sector_disk_on_a_4k_loop_device(tmp_path: Path) -> None:
    need_tool("sgdisk", "sfdisk", "losetup")
    data = tmp_path / "data.img"
    data.write_bytes(pattern(MiB, 8))
    out = tmp_path / "disk"
    gpt.build({"data": str(data)}, {"format": "gpt", "seed": "s", "sector-size": 4096,
                                    "partitions": [{"from": "data", "type": "srv"}]},
              OPTIONS, str(out))
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", "--sector-size",
                           "4096", str(out / "disk.raw")], capture_output=True, text=True)
    need(loop.returncode == 0, f"no 4K-sector loop device: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        check = subprocess.run(["sgdisk", "-v", device], capture_output=True, text=True)
        assert "No problems found" in check.stdout, check.stdout
        listed = json.loads(subprocess.run(["sfdisk", "--json", device], check=True,
                                           capture_output=True, text=True).stdout)
        (part,) = listed["partitiontable"]["partitions"]
        assert listed["partitiontable"]["sectorsize"] == 4096
        assert part["start"] == 256 and part["name"] == "data"
        assert part["type"].lower() == gpt_layout.PARTITION_TYPES["srv"]
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def test_recipe_mistakes_surface_from_inputs_of() -> None:
    with pytest.raises(ImageError, match="unknown partition type 'root-x86'"):
        gpt.inputs_of({"partitions": [{"from": "a", "type": "root-x86"}]})
    with pytest.raises(ImageError, match="read-only must be true or false"):
        gpt.inputs_of({"partitions": [{"from": "a", "type": "esp", "read-only": "yes"}]})
    with pytest.raises(ImageError, match="type` is required"):
        gpt.inputs_of({"partitions": [{"from": "a"}]})
    with pytest.raises(ImageError, match="needs `partitions`"):
        gpt.inputs_of({"seed": "x"})


def test_shipped_sealed_disk_recipe_loads() -> None:
    from reprobuild.build.recipe import load_recipe

    recipe = load_recipe(str(Path(__file__).resolve().parents[2] / "recipes" /
                             "sealed-disk.toml"))
    disk = recipe.images["disk"]
    assert disk.kind == "disk" and disk.inputs == ("root", "root-verity")
    assert recipe.images["root-verity"].inputs == ("root",)
    assert recipe.images["root"].format == "erofs"


def test_recipe_error_names_the_partition(tmp_path: Path) -> None:
    from reprobuild.build.recipe import load_recipe
    from reprobuild.errors import RecipeError

    path = tmp_path / "r.toml"
    path.write_text('epoch = 1\n[steps.s]\nbuilder = ["/bin/true"]\n[images.disk]\nformat = "gpt"\n'
                    'partitions = [{ from = "s", type = "rot-x86-64" }]\n')
    with pytest.raises(RecipeError, match=r"images\.disk.*rot-x86-64"):
        load_recipe(str(path))


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.tool
def test_shipped_sealed_disk_builds_reproducibly(unprivileged: Unprivileged) -> None:
    """The shipped recipe, end to end as an unprivileged uid (fetches busybox-static)."""
    import importlib.util
    import shutil

    need(importlib.util.find_spec("sandbox.runner") is not None, "sandbox not written")
    need_tool("sgdisk", "apt-get")
    work = unprivileged.scratch("sealed")
    shutil.copytree(REPO / "recipes", work / "recipes")
    unprivileged.run(["chmod", "-R", "a+rwX", str(work)], check=False)
    store = str(work / "store")
    built = unprivileged.reprobuild("build", "--json", "--store", store,
                                    "recipes/sealed-disk.toml", "disk", cwd=work, timeout=900)
    need("could not fetch" not in built.stderr.lower(), "no network to fetch busybox-static")
    assert built.returncode == 0, built.stderr
    rows = {row["target"]: row for row in json.loads(built.stdout)}
    disk = Path(rows["disk"]["path"])
    check = subprocess.run(["sgdisk", "-v", str(disk / "disk.raw")], capture_output=True,
                           text=True)
    assert "No problems found" in check.stdout
    table = gpt.read_table(disk)
    assert [e.name for e in table.entries] == ["root", "root-verity"]
    root_hash = (disk / "cmdline").read_text().strip().removeprefix("roothash=")
    assert table.entries[0].uuid == str(uuid.UUID(hex=root_hash[:32]))
    again = unprivileged.reprobuild("check", "--store", store, "recipes/sealed-disk.toml",
                                    "disk", cwd=work, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr


@pytest.mark.tool
def test_verity_image_appended_to_the_data(tmp_path: Path) -> None:
    need_tool("veritysetup")
    data = tmp_path / "root.img"
    data.write_bytes(pattern(3 * 4096 + 512 * 3, 9))  # whole 512-byte blocks only
    out = tmp_path / "v"
    table = {"from": "root", "format": "verity", "append": True, "data-block-size": 512}
    verity_image.build({"root": str(data)}, table, OPTIONS, str(out))
    info = json.loads((out / "verity.json").read_text())
    assert info["hash_offset"] == 4 * 4096
    combined = (out / "image").read_bytes()
    assert combined[:data.stat().st_size] == data.read_bytes()
    assert combined[info["hash_offset"]:][:8] == b"verity\0\0"
    root_hash = (out / "roothash").read_text().strip()
    subprocess.run(["veritysetup", "verify", str(out / "image"), str(out / "image"), root_hash,
                    f"--hash-offset={info['hash_offset']}"], check=True, capture_output=True)
    assert not (out / "hash").exists()
    disk = tmp_path / "disk"
    gpt.build({"v": str(out)}, {"format": "gpt", "partitions": [
        {"from": "v", "type": "root-x86-64"}]}, OPTIONS, str(disk))
    (part,) = gpt.read(disk).children(b"")
    assert part.content is not None and part.content.read()[:len(combined)] == combined
    assert (disk / "cmdline").read_text() == ""
