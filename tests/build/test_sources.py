"""Sources: .deb unpacking in userspace, path pins, host programs with their ELF closure."""

from __future__ import annotations

import io
import lzma
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from reprobuild.build.elf import elf_closure, elf_interpreter
from reprobuild.build.fetch import unpack_deb
from reprobuild.build.inputs import hash_file_map, host_closure
from reprobuild.build.plan import plan
from reprobuild.build.recipe import load_recipe
from reprobuild.errors import FetchError, RecipeError


def ar_member(name: str, data: bytes) -> bytes:
    header = (f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}`\n").encode()
    assert len(header) == 60
    return header + data + (b"\n" if len(data) % 2 else b"")


def data_tar(members: list[tarfile.TarInfo], contents: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in members:
            data = contents.get(info.name)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def make_deb(path: Path, tar: bytes, compression: str) -> None:
    if compression == "xz":
        payload, name = lzma.compress(tar), "data.tar.xz"
    else:
        payload, name = zstandard.ZstdCompressor().compress(tar), "data.tar.zst"
    path.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
                     + ar_member("control.tar.xz", lzma.compress(b""))
                     + ar_member(name, payload))


def info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
         link: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.mode, member.linkname = kind, mode, link
    return member


@pytest.mark.parametrize("compression", ["xz", "zst"])
def test_unpack_deb(tmp_path: Path, compression: str) -> None:
    tar = data_tar([info("./", tarfile.DIRTYPE, 0o755), info("./bin/", tarfile.DIRTYPE),
                    info("./bin/tool", mode=0o4755), info("./bin/alias", tarfile.SYMTYPE,
                                                          link="tool"),
                    info("./bin/hard", tarfile.LNKTYPE, link="./bin/tool")],
                   {"./bin/tool": b"#!/bin/sh\n"})
    deb = tmp_path / "p.deb"
    make_deb(deb, tar, compression)
    unpack_deb(str(deb), str(tmp_path / "out"))
    out = tmp_path / "out"
    assert (out / "bin" / "tool").read_bytes() == b"#!/bin/sh\n"
    assert os.readlink(out / "bin" / "alias") == "tool"
    assert (out / "bin" / "hard").stat().st_ino == (out / "bin" / "tool").stat().st_ino
    assert not (out / "bin" / "tool").stat().st_mode & 0o4000  # setuid never unpacked


@pytest.mark.parametrize("bad", ["../escape", "/abs"])
def test_unpack_refuses_escaping_members(tmp_path: Path, bad: str) -> None:
    deb = tmp_path / "p.deb"
    make_deb(deb, data_tar([info(bad)], {bad: b"x"}), "xz")
    with pytest.raises(FetchError, match=f"package p.deb: member '{bad}'"):
        unpack_deb(str(deb), str(tmp_path / "out"))


def test_unpack_refuses_device_nodes(tmp_path: Path) -> None:
    deb = tmp_path / "p.deb"
    make_deb(deb, data_tar([info("./dev/null", tarfile.CHRTYPE)], {}), "xz")
    with pytest.raises(FetchError, match="not a file"):
        unpack_deb(str(deb), str(tmp_path / "out"))


def test_path_pin_mismatch_names_both_hashes(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("content")
    (tmp_path / "r.toml").write_text(f'[sources.f]\npath = "f"\nblake3 = "{"0" * 64}"\n')
    with pytest.raises(RecipeError) as exc:
        plan(load_recipe(str(tmp_path / "r.toml")))
    text = str(exc.value)
    assert "0" * 64 in text and "hashes to" in text
    actual = text.split("hashes to ", 1)[1].split(",", 1)[0]
    (tmp_path / "r.toml").write_text(f'[sources.f]\npath = "f"\nblake3 = "{actual}"\n')
    plan(load_recipe(str(tmp_path / "r.toml")))


def test_host_closure_has_loader_and_libraries() -> None:
    tar = "/usr/bin/tar"
    interp = elf_interpreter(tar)
    assert interp is not None
    files = elf_closure(tar)
    assert tar in files and interp in files
    assert any(os.path.basename(f).startswith("libc.so") for f in files)
    closure = host_closure(tar)
    assert closure.hash == hash_file_map(closure.files)
    assert elf_closure("/bin/busybox") == ["/bin/busybox"]  # static: itself alone


def test_missing_host_program(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text('[sources.t]\nhost = "/nonexistent/tool"\n')
    with pytest.raises(RecipeError, match="/nonexistent/tool"):
        plan(load_recipe(str(tmp_path / "r.toml")))
