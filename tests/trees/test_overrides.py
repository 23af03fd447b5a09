"""Recipe file overrides: owners, modes, xattrs, new device nodes, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from reprobuild.errors import RecipeError
from reprobuild.trees.overrides import apply_overrides, load_overrides_file, parse_mode
from reprobuild.trees.tree import Content, Entry, EntryType, Tree

WHERE = "recipe.toml [images.root.files]"


def base_tree() -> Tree:
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"etc", EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"etc/shadow", EntryType.REGULAR, 0o644, content=Content.from_bytes(b"s")))
    tree.add(Entry(b"usr", EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"usr/ping", EntryType.REGULAR, 0o755, content=Content.from_bytes(b"p")))
    tree.add(Entry(b"usr/ping6", EntryType.HARDLINK, 0o755, target=b"usr/ping"))
    return tree


def test_metadata_overrides() -> None:
    tree = apply_overrides(base_tree(), {
        "/etc/shadow": {"mode": "0640", "gid": 42, "uid": 0, "mtime": 12},
        "/usr/ping6": {"mode": 0o4755,
                       "xattrs": {"security.capability": "base64:AQAAAg==",
                                  "user.hex": "hex:00ff", "user.text": "héllo"}},
        "/": {"mode": "0555"},
    }, where=WHERE)
    shadow = tree.get(b"etc/shadow")
    assert shadow is not None and (shadow.mode, shadow.gid, shadow.mtime_ns) == (
        0o640, 42, 12 * 10**9)
    # A hardlink's overrides change the inode: every path of the group.
    for path in (b"usr/ping", b"usr/ping6"):
        entry = tree.resolve(tree.get(path))  # type: ignore[arg-type]
        assert entry.mode == 0o4755
        assert entry.xattrs == ((b"security.capability", b"\x01\x00\x00\x02"),
                                (b"user.hex", b"\x00\xff"), (b"user.text", "héllo".encode()))
    assert tree.root.mode == 0o555


def test_input_tree_is_unchanged() -> None:
    tree = base_tree()
    apply_overrides(tree, {"/etc/shadow": {"mode": "0600"}}, where=WHERE)
    entry = tree.get(b"etc/shadow")
    assert entry is not None and entry.mode == 0o644


def test_creating_special_entries() -> None:
    tree = apply_overrides(base_tree(), {
        "/dev/console": {"type": "char", "major": 5, "minor": 1, "mode": "0600"},
        "/dev": {"type": "dir", "mode": "0755"},
        "/dev/loop0": {"type": "block", "major": 7, "minor": 0, "gid": 6},
        "/dev/initctl": {"type": "fifo"},
        "/dev/stdin": {"type": "symlink", "target": "/proc/self/fd/0"},
        "/etc": {"type": "dir", "mode": "0700"},
    }, where=WHERE)
    console = tree.get(b"dev/console")
    assert console is not None and console.type is EntryType.CHAR
    assert (console.rdev_major, console.rdev_minor, console.mode) == (5, 1, 0o600)
    loop = tree.get(b"dev/loop0")
    assert loop is not None and loop.type is EntryType.BLOCK and loop.gid == 6
    fifo = tree.get(b"dev/initctl")
    assert fifo is not None and fifo.type is EntryType.FIFO and fifo.mode == 0o644
    stdin = tree.get(b"dev/stdin")
    assert stdin is not None and stdin.target == b"/proc/self/fd/0"
    etc = tree.get(b"etc")
    assert etc is not None and etc.mode == 0o700 and tree.get(b"etc/shadow") is not None


def test_replacing_a_placeholder_file_by_a_device() -> None:
    tree = apply_overrides(base_tree(), {"/etc/shadow": {"type": "char", "major": 1,
                                                         "minor": 3}}, where=WHERE)
    entry = tree.get(b"etc/shadow")
    assert entry is not None and entry.type is EntryType.CHAR


@pytest.mark.parametrize(("table", "message"), [
    ({"/etc/shadow": {"mdoe": "0640"}}, "(?s)unknown key 'mdoe'.*did you mean 'mode'"),
    ({"/etc/shadow": {"xattr": {}}}, "did you mean 'xattrs'"),
    ({"/dev/console": {"type": "char", "major": 5, "minor": 1}}, "parent directory /dev"),
    ({"/nothing": {"mode": "0644"}}, "no such path"),
    ({"etc/shadow": {"mode": "0644"}}, "absolute paths"),
    ({"/../x": {"type": "dir"}}, "'..'"),
    ({"/etc/shadow": {"mode": "0999"}}, "octal"),
    ({"/etc/shadow": {"mode": 0o17777}}, "0 to 4095"),
    ({"/etc/shadow": {"uid": -1}}, "uid must be"),
    ({"/etc/shadow": {"gid": "42"}}, "gid must be"),
    ({"/etc/shadow": {"xattrs": {"security.capability": "base64:!!"}}}, "does not decode"),
    ({"/etc/shadow": {"xattrs": {"noprefix": "x"}}}, "bad xattr name"),
    ({"/x": {"type": "socket"}}, "type must be one of"),
    ({"/x": {"type": "char"}}, "needs major and minor"),
    ({"/x": {"type": "symlink"}}, "needs target"),
    ({"/x": {"type": "dir", "major": 1}}, "major and minor need"),
    ({"/etc": {"type": "fifo"}}, "cannot replace the directory"),
    ({"/usr/ping": {"type": "fifo"}}, "hardlinked"),
    ({"/etc/shadow": "0640"}, "must be a table"),
])
def test_errors_name_the_table_path_and_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        apply_overrides(base_tree(), table, where=WHERE)  # type: ignore[arg-type]
    assert WHERE in str(info.value)


def test_parse_mode() -> None:
    assert parse_mode("0640", "m") == 0o640
    assert parse_mode("4755", "m") == 0o4755
    assert parse_mode("0o755", "m") == 0o755
    assert parse_mode(420, "m") == 0o644


def test_load_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "files.toml"
    path.write_text('"/etc/shadow" = { mode = "0640", gid = 42 }\n'
                    '"/dev/console" = { type = "char", major = 5, minor = 1 }\n')
    table = load_overrides_file(path)
    assert table["/etc/shadow"] == {"mode": "0640", "gid": 42}
    bad = tmp_path / "bad.toml"
    bad.write_text('"/etc/shadow" = "0640"\n')
    with pytest.raises(RecipeError, match="must be a table"):
        load_overrides_file(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("= nope")
    with pytest.raises(RecipeError, match=r"broken\.toml: not valid TOML"):
        load_overrides_file(broken)
    with pytest.raises(RecipeError, match="does not exist"):
        load_overrides_file(tmp_path / "missing.toml")


def test_new_entries_take_the_epoch_as_mtime_unless_given() -> None:
    tree = apply_overrides(base_tree(), {
        "/dev": {"type": "dir"},
        "/dev/console": {"type": "char", "major": 5, "minor": 1, "mode": "0600"},
        "/dev/null": {"type": "char", "major": 1, "minor": 3, "mtime": 7},
    }, where=WHERE, epoch=1700000000)
    console, null = tree.get(b"dev/console"), tree.get(b"dev/null")
    assert console is not None and null is not None
    assert console.mtime_ns == 1700000000 * 10**9
    assert null.mtime_ns == 7 * 10**9
    assert (console.rdev_major, console.rdev_minor, console.mode) == (5, 1, 0o600)
