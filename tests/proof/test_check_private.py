"""`reprobuild check` on a recipe only its owner can read, and rebuilds that cannot run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from reprobuild.errors import BuildError, ReprobuildError
from reprobuild.proof import check
from tests.conftest import Unprivileged, need, need_tool
from tests.proof.test_check import SAFE, _recipe, fake_engine

PRIVATE_RECIPE = """\
epoch = 1700000000
[sources.bb]
host = "/bin/busybox"
[sources.files]
path = "files"
[steps.copy]
inputs = ["bb", "files"]
builder = ["bb", "sh", "-c", "mkdir $out; cat $files/a $files/b > $out/ab"]
"""


@pytest.mark.userns
@pytest.mark.parametrize("chosen", ["uid", "all"])
def test_check_as_root_in_a_private_directory(unprivileged: Unprivileged, chosen: str) -> None:
    """The uid-65534 rebuild gets a copy of what it needs: identical, exit 0."""
    need(os.geteuid() == 0, "needs root (the uid variation switches to 65534)")
    need_tool("busybox", "setpriv")
    private = Path(tempfile.mkdtemp(prefix="reprobuild-private-"))  # mode 0700
    try:
        assert private.stat().st_mode & 0o777 == 0o700
        (private / "files").mkdir()
        (private / "files" / "a").write_text("a\n")
        (private / "files" / "b").write_text("b\n")
        (private / "r.toml").write_text(PRIVATE_RECIPE)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": str(private), "PYTHONPATH": unprivileged.pythonpath,
               "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run(
            [unprivileged.python, "-m", "reprobuild", "check", "--store",
             str(private / "store"), "--json", "--variations", chosen,
             str(private / "r.toml")],
            env=env, cwd=private, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["identical"]
        assert "uid" in doc["rounds"][0]["variations"]
        assert [o["name"] for o in doc["rounds"][0]["outputs"]] == ["copy"]
    finally:
        shutil.rmtree(private)


def test_a_rebuild_that_fails_is_an_error_not_a_verdict(tmp_path: Path) -> None:
    engine = fake_engine(lambda env, cwd, umask, inp: b"x")
    calls: list[list[str]] = []

    def failing_rebuild(argv: list[str], env: Mapping[str, str], cwd: str,
                        umask: int | None) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if len(calls) == 1:
            return engine(argv, env, cwd, umask)  # the reference build works
        return subprocess.CompletedProcess(argv, 1, "", "reprobuild: error: leaky failed "
                                                        "with exit status 1")

    with pytest.raises(ReprobuildError) as caught:
        check.run_check(_recipe(tmp_path), [], str(tmp_path / "store"), chosen=SAFE,
                        runner=failing_rebuild)
    assert not isinstance(caught.value, BuildError)
    assert caught.value.exit_code == 2
    assert "could not be completed" in caught.value.message
    assert "nothing was compared" in (caught.value.hint or "")


@pytest.mark.userns
def test_check_exits_2_when_the_rebuild_cannot_run(unprivileged: Unprivileged) -> None:
    """reprobuild itself lies in the 0700 directory: uid 65534 cannot even start it."""
    need(os.geteuid() == 0, "needs root (the uid variation switches to 65534)")
    need_tool("busybox", "setpriv")
    private = Path(tempfile.mkdtemp(prefix="reprobuild-private-"))
    try:
        (private / "files").mkdir()
        (private / "files" / "a").write_text("a\n")
        (private / "files" / "b").write_text("b\n")
        (private / "r.toml").write_text(PRIVATE_RECIPE)
        shutil.copytree(unprivileged.root / "src", private / "src")
        site = unprivileged.pythonpath.split(":")[1]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": str(private), "PYTHONPATH": f"{private / 'src'}:{site}",
               "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run(
            [unprivileged.python, "-m", "reprobuild", "check", "--store",
             str(private / "store"), "--variations", "uid", str(private / "r.toml")],
            env=env, cwd=private, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "could not be completed" in done.stderr
        assert "NOT reproducible" not in done.stdout
    finally:
        shutil.rmtree(private)
