"""Resource limits of steps and images: recipe keys, ids, and runaway steps end to end."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import tomllib
from pathlib import Path

import pytest

from reprobuild.build import limits, sandboxing
from reprobuild.build.limits import effective
from reprobuild.build.plan import plan
from reprobuild.build.recipe import Recipe, parse_recipe
from reprobuild.errors import ImageError, RecipeError
from reprobuild.images.registry import MAX_IMAGE_SIZE, ImageOptions
from sandbox.spec import SandboxResult
from tests.conftest import Unprivileged, need_tool

BASE = """\
epoch = 1700000000
[sources.bb]
host = "/bin/busybox"
[steps.s]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "echo hi > $out"]
"""


def _recipe(text: str) -> Recipe:
    return parse_recipe(tomllib.loads(text), path="r.toml", directory="/")


def test_step_limits_are_parsed_and_default(tmp_path: Path) -> None:
    recipe = _recipe(BASE + '[steps.s.limits]\nmemory = "8G"\npids = 4096\nlog = "1M"\n')
    step = recipe.steps["s"]
    bounded = effective(step.limits)
    assert bounded.memory == 8 << 30 and bounded.pids == 4096 and bounded.log == 1 << 20
    assert bounded.tmp == limits.DEFAULTS.tmp and bounded.disk == 16 << 30
    plain = effective(_recipe(BASE).steps["s"].limits)
    assert plain == limits.DEFAULTS


@pytest.mark.parametrize("table, key, words", [
    ('memory = "lots"', "limits.memory", "is not like"),
    ("pids = 0", "limits.pids", "whole number"),
    ("pids = true", "limits.pids", "whole number"),
    ('disks = "1G"', "limits.disks", "unknown limit"),
    ('tmp = "min"', "limits.tmp", "must be a size"),
])
def test_bad_limits_name_the_key(table: str, key: str, words: str) -> None:
    with pytest.raises(RecipeError) as caught:
        _recipe(BASE + f"[steps.s.limits]\n{table}\n")
    assert f"[steps.s] {key}:" in caught.value.message and words in caught.value.message


def test_limits_and_timeouts_stay_out_of_derivation_ids() -> None:
    image = '[images.i]\nfrom = "s"\nformat = "tar"\n'
    plain = plan(_recipe(BASE + image))
    raised = plan(_recipe(BASE + '[steps.s.limits]\nmemory = "32G"\ndisk = "1T"\n' + image
                          + 'timeout = "2h"\n[images.i.limits]\nmemory = "16G"\n'))
    assert {k: n.id for k, n in plain.nodes.items()} == {k: n.id for k, n in raised.nodes.items()}


def test_image_timeout_and_limits_reach_the_sandbox(tmp_path: Path) -> None:
    text = BASE + ('[images.i]\nfrom = "s"\nformat = "tar"\ntimeout = "90s"\n'
                   '[images.i.limits]\nmemory = "6G"\n')
    built = plan(_recipe(text))
    node = built.nodes["i"]
    spec = sandboxing.image_spec(node, {"s": (built.nodes["s"], str(tmp_path))},
                                 str(tmp_path), str(tmp_path), epoch=1, cores=1)
    assert spec.timeout == 90.0 and spec.limits.memory == 6 << 30
    default = plan(_recipe(BASE + '[images.i]\nfrom = "s"\nformat = "tar"\n'))
    inputs = {"s": (default.nodes["s"], str(tmp_path))}
    spec = sandboxing.image_spec(default.nodes["i"], inputs, str(tmp_path), str(tmp_path),
                                 epoch=1, cores=1)
    assert spec.timeout == limits.IMAGE_TIMEOUT and spec.limits == limits.DEFAULTS


@pytest.mark.parametrize("size", ['"1000T"', "99999999999999999", '"17T"'])
def test_absurd_image_sizes_are_refused_before_anything_runs(size: str) -> None:
    started = time.monotonic()
    with pytest.raises(RecipeError) as caught:
        _recipe(BASE + f'[images.i]\nfrom = "s"\nformat = "squashfs"\nsize = {size}\n')
    assert "[images.i] size:" in caught.value.message and "16 TiB" in caught.value.message
    assert time.monotonic() - started < 5


def test_image_options_refuse_absurd_sizes_everywhere() -> None:
    with pytest.raises(ImageError):
        ImageOptions(epoch=0, size=MAX_IMAGE_SIZE + 1)
    assert ImageOptions(epoch=0, size=MAX_IMAGE_SIZE).size == MAX_IMAGE_SIZE


@pytest.mark.parametrize("size", ["1000T", "99999999999999999"])
def test_the_image_command_refuses_absurd_sizes(tmp_path: Path, size: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from reprobuild import cli

    (tmp_path / "src").mkdir()
    out = tmp_path / "img"
    code = cli.main(["image", "--format", "squashfs", str(tmp_path / "src"), str(out),
                     "--size", size])
    assert code == 2 and not out.exists()
    assert "16 TiB" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["src"]


def test_a_sized_squashfs_stays_sparse(tmp_path: Path) -> None:
    from reprobuild.images.squashfs import image as squashfs
    from reprobuild.trees.load import load_tree

    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("data\n")
    out = tmp_path / "img"
    with out.open("wb") as f:
        squashfs.write(load_tree(str(source), epoch=0), f, ImageOptions(epoch=0, size=1 << 30))
    st = out.stat()
    assert st.st_size == 1 << 30
    assert st.st_blocks * 512 < 1 << 20  # holes, not a gigabyte of written zeros
    assert squashfs.read(str(out)).get(b"f") is not None


@pytest.mark.parametrize("evidence", ["log", "signal"])
def test_a_file_refused_by_the_kernel_is_named_also_when_the_watcher_saw_it_first(
        evidence: str) -> None:
    """A file stopped at the size limit (EFBIG or SIGXFSZ) while the watcher's next scan
    saw it push /build and $out over the same limit: the file is the cause named."""
    caps = dataclasses.replace(limits.DEFAULTS, disk=32 << 20)
    tail = ["dd: error writing '/output/out/f': File too large"] if evidence == "log" else []
    result = SandboxResult(None, signal.SIGXFSZ if evidence == "signal" else signal.SIGKILL,
                           limit="disk")
    note, hint = limits.failure_note(result, "step", "fill", caps, tail)
    assert note == "; a file passed the size limit disk = 32 MiB"
    assert hint == 'raise it in the recipe: [steps.fill.limits] disk = "64M"'
    many_files = limits.failure_note(result, "step", "fill", caps, ["dd: 4+0 records out"])
    if evidence == "log":  # no refused file: the watcher's total is the cause
        assert many_files[0] == ("; stopped: what /build and $out hold passed its limit"
                                 " disk = 32 MiB")


# -- runaway steps, end to end as an unprivileged uid --------------------------------------
RUNAWAY = """\
epoch = 1700000000
[sources.bb]
host = "/bin/busybox"
[steps.fill]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "mkdir $out; dd if=/dev/zero of=$out/f bs=1M count=100000"]
timeout = "60s"
[steps.fill.limits]
disk = "32M"
[steps.bomb]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "sh -c 'while :; do sleep 100 & done'; exec sleep 100"]
timeout = "60s"
[steps.bomb.limits]
pids = 50
[steps.hogs]
inputs = ["bb"]
builder = ["bb", "sh", "-c", '''for i in 1 2 3 4 5 6 7 8; do
  (x=$(head -c 30000000 /dev/zero | tr '\\0' a); sleep 100; echo ${#x}) & done; wait''']
timeout = "60s"
[steps.hogs.limits]
memory = "128M"
[steps.files]
inputs = ["bb"]
builder = ["bb", "sh", "-c", '''mkdir $out; i=0
  while true; do i=$((i+1)); dd if=/dev/zero of=$out/f$i bs=1M count=4; done''']
timeout = "60s"
[steps.files.limits]
disk = "32M"
[steps.tmp]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "dd if=/dev/zero of=/tmp/f bs=1M count=100 && echo hi > $out"]
[steps.tmp.limits]
tmp = "4M"
[steps.printer]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "i=0; while true; do i=$((i+1)); echo line-$i; done"]
timeout = "3s"
[steps.printer.limits]
log = "64K"
"""

# The bomb forks until the limit refuses it and keeps what it made: busybox sh exits when a
# fork fails, so a bomb of shells (b() { b | b & }) can burn out between two scans of a
# loaded machine and then only time out; here the forking shell dies, its sleepers stay.
EXPECTED = {
    "fill": ("a file passed the size limit disk = 32 MiB",
             '[steps.fill.limits] disk = "64M"'),
    "files": ("what /build and $out hold passed its limit disk = 32 MiB",
              '[steps.files.limits] disk = "64M"'),
    "bomb": ("its number of processes and threads passed its limit pids = 50",
             "[steps.bomb.limits] pids = 100"),
    "hogs": ("its memory passed its limit memory = 128 MiB",
             '[steps.hogs.limits] memory = "256M"'),
    "tmp": ("run out of tmp (limit tmp = 4 MiB)", '[steps.tmp.limits] tmp = "8M"'),
    "printer": ("its log passed the limit log = 64 KiB", '[steps.printer.limits] log = "128K"'),
}


@pytest.mark.userns
@pytest.mark.parametrize("step", sorted(EXPECTED))
def test_a_runaway_step_is_stopped_by_its_limit(unprivileged: Unprivileged, step: str) -> None:
    need_tool("busybox")
    work = unprivileged.scratch(f"runaway-{step}")
    (work / "r.toml").write_text(RUNAWAY)
    os.chmod(work / "r.toml", 0o644)
    store = work / "store"
    started = time.monotonic()
    done = unprivileged.reprobuild("build", "--store", str(store), "--no-out-link",
                                   str(work / "r.toml"), step, cwd=work, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    message, hint = EXPECTED[step]
    assert message in done.stderr and hint in done.stderr, done.stderr
    assert elapsed < 50  # well within the step's timeout (the printer's is 3 s)
    used = sum(p.lstat().st_blocks * 512 for p in store.rglob("*"))
    assert used < 256 << 20  # the store kept no runaway output (removed), and a bounded log
    verify = unprivileged.reprobuild("store", "verify", "--store", str(store), cwd=work)
    assert verify.returncode == 0, verify.stdout + verify.stderr
