"""A full disk is named, exits 2, leaves no partial output and a store that verifies.

The store (and an image's output directory) sit on a 16 MiB tmpfs mounted for the test;
builds run unprivileged, as the sandbox always does.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from reprobuild.cli import main
from tests.conftest import NOBODY, Unprivileged

pytestmark = [pytest.mark.root, pytest.mark.userns]

RECIPE = textwrap.dedent("""
    epoch = 1700000000

    [sources.bb]
    host = "/bin/busybox"

    [sources.blob]
    path = "blob"

    [steps.fill]
    inputs = ["bb"]
    builder = ["bb", "sh", "-c", "$bb dd if=/dev/zero of=$out bs=1M count=40"]
    timeout = "1m"

    [steps.nine]
    inputs = ["bb"]
    builder = ["bb", "sh", "-c", "mkdir $out; $bb dd if=/dev/urandom of=$out/r bs=1M count=9"]
    timeout = "1m"

    [images.root]
    from = "nine"
    format = "ext4"
""")


@pytest.fixture()
def small_fs(unprivileged: Unprivileged, tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs the unprivileged uid owns."""
    mount = unprivileged.scratch(f"small-{tmp_path.name}")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=16m,uid={NOBODY},gid={NOBODY},mode=0755",
                    "tmpfs", str(mount)], check=True, capture_output=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def recipe_dir(unprivileged: Unprivileged, name: str) -> Path:
    where = unprivileged.scratch(f"recipe-{name}")
    (where / "recipe.toml").write_text(RECIPE)
    (where / "blob").write_bytes(os.urandom(20 << 20))
    for path in (where / "recipe.toml", where / "blob"):
        os.chmod(path, 0o644)
    return where


@pytest.mark.parametrize("target", ["blob", "fill", "root"])
def test_build_on_a_full_store(unprivileged: Unprivileged, small_fs: Path, target: str) -> None:
    recipe = recipe_dir(unprivileged, target) / "recipe.toml"
    store = small_fs / "store"
    result = unprivileged.reprobuild("build", "--store", str(store), str(recipe), target,
                                     cwd=recipe.parent)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"no space left on {small_fs} while writing the output of {target}" \
        in result.stderr, result.stderr
    assert os.listdir(store / "tmp") == []
    verify = unprivileged.reprobuild("store", "--store", str(store), "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_image_to_a_full_disk(tmp_path: Path, small_fs: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "big").write_bytes(os.urandom(20 << 20))
    output = small_fs / "out.tar"
    assert main(["image", "--format", "tar", str(source), str(output)]) == 2
    err = capsys.readouterr().err
    assert f"no space left on {small_fs} while writing the tar image {output}" in err
    assert os.listdir(small_fs) == []
