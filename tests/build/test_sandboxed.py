"""End to end with the real sandbox, as an unprivileged uid: the shipped hello recipe."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.build.test_engine import waited_for_locks
from tests.conftest import REPO, Unprivileged, commands, need, need_tool


def need_sandbox() -> None:
    need(importlib.util.find_spec("sandbox.runner") is not None, "sandbox.runner not written")


def _start_slow_build(unprivileged: Unprivileged, name: str, script: str
                      ) -> tuple[Path, Path, Path, subprocess.Popen[bytes]]:
    """Start ``build`` of one busybox step running ``script`` as the unprivileged uid, in
    its own session; return once the step has written ``$out/a``."""
    need_sandbox()
    work = unprivileged.scratch(name)
    recipe = work / "r.toml"
    recipe.write_text(f'[sources.bb]\nhost = "/bin/busybox"\n[steps.slow]\ninputs = ["bb"]\n'
                      f'builder = ["bb", "sh", "-c", "{script}"]\n')
    os.chmod(recipe, 0o644)
    store = work / "store"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": str(unprivileged.root / "home"), "PYTHONPATH": unprivileged.pythonpath,
           "PYTHONDONTWRITEBYTECODE": "1"}
    argv = unprivileged.command([unprivileged.python, "-m", "reprobuild", "build",
                                 "--no-out-link", "--store", str(store), str(recipe)])
    proc = subprocess.Popen(argv, env=env, cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list((store / "tmp").glob("*/output/out/a")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return work, recipe, store, proc


def _pid_of(cmdline: bytes) -> int | None:
    """A process whose command line is ``cmdline`` (NUL-separated), if one runs."""
    return next((pid for pid, line in commands(cmdline).items() if line == cmdline), None)


def copy_recipes(unprivileged: Unprivileged, name: str) -> Path:
    work = unprivileged.scratch(name)
    shutil.copytree(REPO / "recipes", work / "recipes")
    unprivileged.run(["chmod", "-R", "a+rX", str(work)], check=False)
    return work


@pytest.mark.userns
def test_hello_builds_and_is_a_noop_the_second_time(unprivileged: Unprivileged) -> None:
    need_sandbox()
    work = copy_recipes(unprivileged, "hello")
    if unprivileged.as_root:
        shutil.chown(work / "recipes", 65534, 65534)
    store = str(work / "store")
    first = unprivileged.reprobuild("build", "--json", "--store", store,
                                    "recipes/hello.toml", cwd=work)
    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)
    assert [r["target"] for r in rows] == ["root"]
    image = Path(rows[0]["path"])
    assert Path(work / "result-root").resolve() == image
    second = unprivileged.reprobuild("build", "--json", "--store", store,
                                     "recipes/hello.toml", cwd=work)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == rows
    assert "done" not in second.stderr  # nothing was built again
    verify = unprivileged.reprobuild("store", "verify", "--store", store, cwd=work)
    assert verify.returncode == 0, verify.stderr
    from reprobuild.images.ext4 import image as ext4

    tree = ext4.read(str(image))
    for path, data in ((b"etc/greeting", b"hi\n"), (b"etc/build-epoch", b"1700000000\n")):
        entry = tree.get(path)
        assert entry is not None and entry.content is not None
        assert entry.content.read() == data
    assert tree.get(b"bin/busybox") is not None
    tmp = tree.get(b"tmp")
    assert tmp is not None and tmp.mode == 0o1777


@pytest.mark.userns
def test_step_sees_inputs_read_only_at_fixed_paths(unprivileged: Unprivileged) -> None:
    need_sandbox()
    work = unprivileged.scratch("inputs")
    (work / "files").mkdir()
    (work / "files" / "f").write_text("data\n")
    (work / "r.toml").write_text("""
epoch = 1
[sources.bb]
host = "/bin/busybox"
[sources.files]
path = "files"
[steps.probe]
inputs = ["bb", "files"]
builder = ["bb", "sh", "-c", '''
mkdir $out
echo "$files" > $out/files-var
pwd > $out/cwd
cat /inputs/files/f > $out/copy
if echo x > /inputs/files/f 2>/dev/null; then echo writable; else echo read-only; fi > $out/ro
''']
""")
    unprivileged.run(["chmod", "-R", "a+rwX", str(work)], check=False)
    result = unprivileged.reprobuild("build", "--json", "--store", str(work / "store"),
                                     str(work / "r.toml"), cwd=work)
    assert result.returncode == 0, result.stderr
    out = Path(json.loads(result.stdout)[0]["path"])
    assert (out / "files-var").read_text() == "/inputs/files\n"
    assert (out / "cwd").read_text() == "/build\n"
    assert (out / "copy").read_text() == "data\n"
    assert (out / "ro").read_text() == "read-only\n"


@pytest.mark.tool
def test_hello_in_an_empty_bwrap_root(tmp_path: Path) -> None:
    """The engine's mount layout (host closures, the built-in step's Python) in a real
    empty root, independent of the sandbox package's progress."""
    need_tool("bwrap")
    env = {**os.environ, "PYTHONPATH": str(REPO), "REPROBUILD_TEST_RUNNER": "bwrap"}
    probe = subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"],
                           capture_output=True, check=False)
    need(probe.returncode == 0, f"bwrap cannot run here: {probe.stderr!r}")
    result = subprocess.run([sys.executable, "-m", "tests.build.fakecli", "build", "--json",
                             "--store", str(tmp_path / "store"),
                             str(REPO / "recipes" / "hello.toml")],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    image = json.loads(result.stdout)[0]["path"]
    assert Path(image).read_bytes()[1080:1082] == b"\x53\xef"  # ext4 superblock magic


@pytest.mark.userns
def test_sigkill_of_a_sandboxed_build(unprivileged: Unprivileged) -> None:
    """Killing the engine kills its sandboxes; nothing partial counts; a rebuild works."""
    script = "mkdir $out; echo half > $out/a; sleep 71; echo b > $out/b"
    work, recipe, store, proc = _start_slow_build(unprivileged, "kill", script)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The sandbox dies after the engine, the last of a chain of deaths (the engine's,
    # then its server's): waited for, however slowly a loaded machine gets there.
    deadline = time.monotonic() + 30
    while "sleep 71" in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                       text=True, check=True).stdout:
        # 71: no other test sleeps so; the step sleeps 71 s, so 30 s tell that it lives on.
        assert time.monotonic() < deadline, "the sandbox outlived the engine"
        time.sleep(0.05)
    verify = unprivileged.reprobuild("store", "verify", "--store", str(store), cwd=work)
    assert verify.returncode == 0, verify.stderr
    ls = unprivileged.reprobuild("store", "ls", "--store", str(store), cwd=work)
    assert " slow" not in ls.stdout  # the killed step is not valid
    recipe.write_text(recipe.read_text().replace("sleep 71; ", ""))
    again = unprivileged.reprobuild("build", "--json", "--no-out-link", "--store", str(store),
                                    str(recipe), cwd=work)
    assert again.returncode == 0, again.stderr
    out = Path(json.loads(again.stdout)[0]["path"])
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]


@pytest.mark.userns
def test_sigterm_of_a_sandboxed_build(unprivileged: Unprivileged) -> None:
    """SIGTERM to the engine alone is an interrupt: exit 130, its sandboxes killed, its
    build directories removed."""
    _work, _recipe, store, proc = _start_slow_build(unprivileged, "term",
                                                    "mkdir $out; echo a > $out/a; sleep 61")
    proc.send_signal(signal.SIGTERM)  # the engine only, not its process group
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert "sleep 61" not in ps.stdout
    assert [p.name for p in (store / "tmp").iterdir()] == []


@pytest.mark.userns
def test_two_sandboxed_builders_build_once(unprivileged: Unprivileged) -> None:
    need_sandbox()
    work = unprivileged.scratch("twice")
    recipe = work / "r.toml"
    recipe.write_text('[sources.bb]\nhost = "/bin/busybox"\n[steps.once]\ninputs = ["bb"]\n'
                      'builder = ["bb", "sh", "-c", "sleep 7783; echo x > $out"]\n')
    os.chmod(recipe, 0o644)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": str(unprivileged.root / "home"), "PYTHONPATH": unprivileged.pythonpath,
           "PYTHONDONTWRITEBYTECODE": "1"}
    argv = unprivileged.command([unprivileged.python, "-m", "reprobuild", "build", "--json",
                                 "--no-out-link", "--store", str(work / "store"), str(recipe)])
    procs = [subprocess.Popen(argv, env=env, cwd=work, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    # The step's sleep ends (killed: its shell goes on) only once the other builder waits
    # for a lock, so that one cannot find the output done before it starts.
    try:
        deadline = time.monotonic() + 60
        while not (waited_for_locks(work / "store")
                   and (sleeper := _pid_of(b"sleep\x007783\x00"))):
            assert time.monotonic() < deadline, "the step never ran while the other waited"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        os.kill(sleeper, signal.SIGTERM)
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for proc in procs:  # failed: their sandboxes die with them
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0, 0], results
    assert len({json.loads(out)[0]["path"] for out, _ in results}) == 1
    states = sorted("once: done by another process" in err for _, err in results)
    assert states == [False, True], results
