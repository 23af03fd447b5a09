"""Boot tests: the [tests.NAME] tables, QEMU's command line, and booting the shipped disk."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from reprobuild.build.boottests import BootTest, Corruption
from reprobuild.build.recipe import load_recipe
from reprobuild.errors import BootTestError, RecipeError
from reprobuild.images.gpt import image as gpt
from reprobuild.images.registry import ImageOptions
from reprobuild.proof import boottest
from tests.conftest import BootableDisk, need_tool

HEAD = """
[steps.kernel]
builder = ["/bin/true"]
[steps.initrd]
builder = ["/bin/true"]
[images.disk]
format = "gpt"
partitions = [{ from = "initrd", type = "linux-generic" }]
"""


def load(tmp_path: Path, tests: str) -> dict[str, BootTest]:
    path = tmp_path / "r.toml"
    path.write_text(HEAD + tests)
    return dict(load_recipe(str(path)).tests)


def test_tables_parse(tmp_path: Path) -> None:
    tests = load(tmp_path, """
[tests.direct]
kernel = "kernel/boot/vmlinuz"
initrd = "initrd"
cmdline = "console=ttyS0 roothash=@disk"
expect = ["a", "b"]
timeout = "30s"
[tests.uefi]
disk = "disk"
corrupt = { partition = "root", offset = 1024 }
memory = "1G"
expect = ["c"]
""")
    direct, uefi = tests["direct"], tests["uefi"]
    assert direct.direct and not uefi.direct
    assert direct.timeout == 30 and direct.expect == ("a", "b")
    assert direct.inputs() == ["kernel", "initrd", "disk"]
    assert uefi.corrupt == Corruption("root", 1024) and uefi.memory == 1 << 30
    assert uefi.timeout == 120


@pytest.mark.parametrize(("body", "message"), [
    ('kernel = "kernel"\nexpect = ["x"]', "`kernel` and `initrd` go together"),
    ('expect = ["x"]', "nothing to boot"),
    ('disk = "disk"\ncmdline = "x"\nexpect = ["x"]', "only a direct boot takes a command"),
    ('disk = "disk"\nexpect = []', "expect: must be a non-empty list"),
    ('disk = "dsk"\nexpect = ["x"]', "'dsk' names no source, step or image"),
    ('disk = "disk"\nexpects = ["x"]', "(?s)unknown key 'expects'.*did you mean 'expect'"),
    ('kernel = "kernel"\ninitrd = "initrd"\ncmdline = "@nope"\nexpect = ["x"]',
     "@nope names no image"),
    ('kernel = "kernel"\ninitrd = "initrd"\ncorrupt = { partition = "r", offset = 1 }\n'
     'expect = ["x"]', "no `disk` to corrupt"),
    ('disk = "disk"\ntimeout = "soon"\nexpect = ["x"]', r"\[tests\.t\]"),
])
def test_table_errors_name_the_test_and_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load(tmp_path, "[tests.t]\n" + body + "\n")


def test_console_wants_the_lines_in_order() -> None:
    console = boottest._Console(["first", "second"])
    assert not console.feed(b"\x1b[=3h\x1b[2Jsecond\r\nfir")
    assert not console.feed(b"st line\r\n")
    assert console.missing() == ("second",)
    assert console.feed(b"then the second\n")
    assert console.lines == ["second", "first line", "then the second"]


def test_qemu_command_is_unprivileged_tcg_with_a_read_only_disk() -> None:
    direct = BootTest("d", ("x",), kernel="k/vmlinuz", initrd="i")
    argv = boottest.qemu_command(direct, kernel="/s/vmlinuz", initrd="/s/i", cmdline="quiet",
                                 disk="/s/disk.raw", vars_copy=None)
    assert argv[:1] == [boottest.QEMU] and argv[3:5] == ["-accel", "tcg"]
    assert argv[argv.index("-append") + 1] == "quiet"
    assert argv[-1] == "if=virtio,format=raw,readonly=on,file=/s/disk.raw"
    uefi = boottest.qemu_command(BootTest("u", ("x",), disk="disk"), kernel=None, initrd=None,
                                 cmdline="", disk="/s/disk.raw", vars_copy="/w/VARS.fd")
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={boottest.OVMF_CODE}" in uefi
    assert "if=pflash,format=raw,unit=1,file=/w/VARS.fd" in uefi and "-kernel" not in uefi


def _gpt_with(tmp_path: Path) -> Path:
    data = tmp_path / "root.img"
    data.write_bytes(bytes(range(256)) * 16)
    out = tmp_path / "disk"
    gpt.build({"r": str(data)}, {"partitions": [{"from": "r", "type": "root-x86-64",
                                                  "label": "root"}]},
              ImageOptions(epoch=0), str(out))
    return out


def test_corrupt_copy_inverts_one_byte_of_the_partition(tmp_path: Path) -> None:
    out = _gpt_with(tmp_path)
    original = (out / "disk.raw").read_bytes()
    copy = tmp_path / "copy.raw"
    at = boottest.corrupt_copy(str(out / "disk.raw"), "root", 7, str(copy))
    changed = copy.read_bytes()
    assert at == 1 << 20 | 7 and changed[at] == original[at] ^ 0xFF == 7 ^ 0xFF
    assert changed[:at] == original[:at] and changed[at + 1:] == original[at + 1:]
    with pytest.raises(BootTestError, match="no partition labelled 'home'"):
        boottest.corrupt_copy(str(out / "disk.raw"), "home", 0, str(copy))
    with pytest.raises(BootTestError, match="beyond partition 'root'"):
        boottest.corrupt_copy(str(out / "disk.raw"), "root", 1 << 30, str(copy))
    assert boottest.disk_file(str(out)) == str(out / "disk.raw")
    test = BootTest("t", ("x",), disk="disk/disk.raw", corrupt=Corruption("root", 7))
    argv = boottest.prepare(test, {"disk": str(out)}, str(tmp_path))
    assert argv[-1].endswith(f"file={tmp_path / 'corrupted.raw'}")
    assert (tmp_path / "corrupted.raw").read_bytes() == changed
    with pytest.raises(BootTestError, match=r"'disk/disk\.img' is not a file of the built"):
        boottest.prepare(BootTest("t", ("x",), disk="disk/disk.img"), {"disk": str(out)},
                         str(tmp_path))


def test_missing_qemu_is_an_environment_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BootTestError, match="qemu-system-x86_64 is not installed"):
        boottest.boot(BootTest("d", ("x",), disk="disk"), [boottest.QEMU])


@pytest.mark.tool
def test_qemu_refusing_its_command_line_is_an_environment_error() -> None:
    need_tool("qemu-system-x86_64")
    with pytest.raises(BootTestError,
                       match=r"QEMU failed \(status 1\): qemu-system-x86_64: unsupported"):
        boottest.boot(BootTest("d", ("reprobuild: booted",), disk="disk", timeout=60),
                      [boottest.QEMU, "-machine", "no-such-machine", "-display", "none"])


def _test_json(disk: BootableDisk, recipe: str, *names: str) -> tuple[int, list[dict[str,
                                                                                  object]], str]:
    result = disk.reprobuild("test", "--json", "--store", disk.store, recipe, *names)
    rows = json.loads(result.stdout) if result.stdout.strip() else []
    return result.returncode, rows, result.stderr


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.tool
def test_shipped_disk_boots_directly_and_through_uefi(bootable_disk: BootableDisk) -> None:
    """Both boots of recipes/bootable-disk.toml reach the verified root (TCG, uid 65534)."""
    need_tool("qemu-system-x86_64")
    assert os.path.isfile(boottest.OVMF_CODE), "ovmf is installed by scripts/setup.sh"
    code, rows, stderr = _test_json(bootable_disk, "recipes/bootable-disk.toml")
    assert code == 0, (stderr, rows)
    assert [row["test"] for row in rows] == ["direct", "uefi"]
    assert all(row["ok"] and row["missing"] == [] for row in rows)
    print("boot seconds (TCG):", {row["test"]: row["seconds"] for row in rows})


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.tool
def test_one_flipped_byte_of_the_root_fails_with_the_verity_error(
        bootable_disk: BootableDisk) -> None:
    need_tool("qemu-system-x86_64")
    recipes = bootable_disk.work / "recipes"
    tampered = recipes / "tampered.toml"
    tampered.write_text((recipes / "bootable-disk.toml").read_text() + """
[tests.tampered]
disk = "disk"
corrupt = { partition = "root", offset = 1024 }
expect = ["reprobuild: booted the verified root of bootable-disk"]
timeout = "2m"
""")
    tampered.chmod(tampered.stat().st_mode | stat.S_IROTH)
    result = bootable_disk.reprobuild("test", "--store", bootable_disk.store,
                                      "recipes/tampered.toml", "tampered")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "test tampered: FAILED" in result.stderr
    assert "not seen: 'reprobuild: booted the verified root" in result.stderr
    assert "device-mapper: verity" in result.stderr and "is corrupted" in result.stderr
    unknown = bootable_disk.reprobuild("test", "--store", bootable_disk.store,
                                       "recipes/tampered.toml", "tamperd")
    assert unknown.returncode == 2 and "tampered" in unknown.stderr
