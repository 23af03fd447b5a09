"""Each format refuses times it cannot store, naming its range, before writing a byte."""

from __future__ import annotations

import io

import pytest

from reprobuild.build.recipe import parse_recipe
from reprobuild.errors import ImageError, RecipeError
from reprobuild.images.registry import ImageOptions, get_format
from reprobuild.trees.tree import Content, Entry, EntryType, Tree

NS = 1_000_000_000


def tree(mtime: int = 1_000_000) -> Tree:
    out = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=1_000_000 * NS))
    out.add(Entry(b"f", EntryType.REGULAR, 0o644, mtime_ns=mtime * NS,
                  content=Content.from_bytes(b"x")))
    return out


def write(fmt: str, epoch: int, mtime: int = 1_000_000) -> bytes:
    output = io.BytesIO()
    get_format(fmt).load().write(tree(mtime), output, ImageOptions(epoch=epoch))
    return output.getvalue()


@pytest.mark.parametrize("epoch", [1 << 34, 10**11, (1 << 63) - 1])
def test_ext4_refuses_epochs_past_2446(epoch: int) -> None:
    with pytest.raises(ImageError, match=r"ext4 stores times .* to 15032385535 \(2446"):
        write("ext4", epoch)


def test_ext4_keeps_times_up_to_its_limit_and_refuses_before_1901() -> None:
    assert write("ext4", 15032385535)
    with pytest.raises(ImageError, match=r"/f has mtime -2147483649, before"):
        write("ext4", 1000, mtime=-(1 << 31) - 1)


@pytest.mark.parametrize("epoch", [1 << 32, (1 << 63) - 1])
def test_squashfs_refuses_times_past_32_bits(epoch: int) -> None:
    with pytest.raises(ImageError, match="32-bit"):
        write("squashfs", epoch)
    with pytest.raises(ImageError, match="mtime -1 does not fit"):
        write("squashfs", 1000, mtime=-1)


def test_erofs_refuses_times_past_64_bits() -> None:
    assert write("erofs", (1 << 63) - 1)
    with pytest.raises(ImageError, match=r"EROFS stores times from"):
        write("erofs", 1 << 63)
    with pytest.raises(ImageError, match=r"before what the image can hold"):
        write("erofs", 1000, mtime=-(1 << 63) - 1)


def test_cpio_refuses_times_past_8_hex_digits() -> None:
    with pytest.raises(ImageError, match="mtime 4294967296 does not fit"):
        write("cpio", 1 << 33, mtime=1 << 32)
    with pytest.raises(ImageError, match="mtime -1 does not fit"):
        write("cpio", 1000, mtime=-1)


@pytest.mark.parametrize("mtime", [-(1 << 40), (1 << 40)])
def test_tar_holds_any_time_in_pax(mtime: int) -> None:
    data = write("tar", 1 << 41, mtime=mtime)
    assert b" mtime=%d\n" % mtime in data


def test_recipe_epoch_past_what_the_store_can_set_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"epoch: 9223372036854775808 is later than"):
        parse_recipe({"epoch": 1 << 63}, path="r.toml", directory="/tmp")
    assert parse_recipe({"epoch": 9223372036}, path="r.toml", directory="/tmp").epoch
