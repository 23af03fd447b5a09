"""The command line as a new user meets it: usage errors, hints, --json, result links."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprobuild import cli
from tests.conftest import REPO, Unprivileged

HEADER = """\
epoch = 1700000000
[sources.sh]
host = "/bin/sh"
"""
DEB = """
[sources.pkg]
deb = "busybox-static"
version = "1:1.35.0-4+deb12u1+b1"
sha256 = "%s"
""" % ("ab" * 32)


def recipe(directory: Path, body: str) -> str:
    path = directory / "recipe.toml"
    path.write_text(HEADER + body)
    return str(path)


def step(name: str, script: str, inputs: tuple[str, ...] = ("sh",)) -> str:
    return (f'[steps.{name}]\ninputs = {json.dumps(list(inputs))}\n'
            f'builder = ["sh", "-c", {json.dumps(script)}]\n')


def fakecli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """The CLI with the engine tests' fake runner (no namespaces)."""
    return subprocess.Popen([sys.executable, "-m", "tests.build.fakecli", *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = fakecli(*args, cwd=cwd)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def usage(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


def test_build_without_arguments_names_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage(capsys, "build")
    last = err.strip().splitlines()[-1]
    assert "RECIPE" in last and "TARGET" not in last, err


@pytest.mark.parametrize(("command", "jobs"), [("build", "-1"), ("build", "two"),
                                             ("shell", "0")])
def test_jobs_must_be_a_positive_integer(capsys: pytest.CaptureFixture[str], command: str,
                                         jobs: str) -> None:
    """``build -j 0`` is allowed: it builds nothing and only substitutes (tests/cache)."""
    extra = ["step"] if command == "shell" else []
    err = usage(capsys, command, "-j", jobs, "recipe.toml", *extra)
    assert "-j/--jobs" in err and ("positive integer" in err or "not an integer" in err), err


def test_check_rounds_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert "positive integer" in usage(capsys, "check", "--rounds", "0", "recipe.toml")


def test_shell_help_names_a_step_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["shell", "--help"])
    help_text = capsys.readouterr().out
    assert "STEP" in help_text and "image" not in help_text.split("positional", 1)[1]


def test_shell_refuses_an_image_clearly(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("s", "echo x > $out")
                  + '[images.img]\nfrom = "s"\nformat = "tar"\n')
    code, _, err = run("shell", "--store", str(tmp_path / "store"), path, "img", cwd=tmp_path)
    assert code == 2
    assert "img is an image, not a step" in err and "steps: s" in err


def test_failure_hint_keeps_the_store(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("bad", "exit 3"))
    store = str(tmp_path / "my store")
    code, _, err = run("build", "--store", store, path, cwd=tmp_path)
    assert code == 1
    assert f"hint: reprobuild log --store '{store}' {path} bad" in err, err


def test_offline_hint_keeps_the_store(tmp_path: Path) -> None:
    path = recipe(tmp_path, DEB + step("use", "true > $out", ("sh", "pkg")))
    store = str(tmp_path / "store")
    code, _, err = run("build", "--offline", "--store", store, path, cwd=tmp_path)
    assert code == 2
    assert f"reprobuild fetch --store {store} {path}" in err, err


def test_log_hint_keeps_the_store(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("s", "echo x > $out"))
    store = str(tmp_path / "store")
    code, _, err = run("log", "--store", store, path, "s", cwd=tmp_path)
    assert code == 2
    assert f"reprobuild build --store {store} {path} s" in err, err


def test_not_built_names_only_the_dependents_of_the_failure(tmp_path: Path) -> None:
    body = (step("bad", "exit 1") + step("after", "cat $bad > $out", ("sh", "bad"))
            + "".join(step(f"free{i}", f"sleep 0.2; echo {i} > $out") for i in range(4)))
    path = recipe(tmp_path, body)
    code, _, err = run("build", "-j", "1", "--store", str(tmp_path / "store"), path,
                       cwd=tmp_path)
    assert code == 1
    lines = err.splitlines()
    dependents = [line for line in lines if "dependency failed" in line]
    assert dependents == ["reprobuild: not built because a dependency failed: after"], err
    assert not any("free" in line for line in dependents)


@pytest.mark.parametrize("keep_going", [False, True])
def test_build_json_is_printed_when_a_target_fails(tmp_path: Path, keep_going: bool) -> None:
    path = recipe(tmp_path, step("good", "echo ok > $out") + step("bad", "exit 1")
                  + step("after", "cat $bad > $out", ("sh", "bad")))
    flags = ["-k"] if keep_going else []
    code, out, err = run("build", "--json", "-j", "1", *flags, "--store",
                         str(tmp_path / "store"), path, "good", "bad", "after", cwd=tmp_path)
    assert code == 1, err
    rows = {row["target"]: row for row in json.loads(out)}
    assert list(rows) == ["good", "bad", "after"]
    assert "bad failed with exit status 1" in rows["bad"]["error"]
    assert rows["bad"]["path"] is None and rows["bad"]["derivation"]
    assert rows["after"]["error"] == "not built because a dependency failed: bad"
    if keep_going:  # "good" is independent: with -k it is built whatever the order
        assert rows["good"]["error"] is None
        assert Path(rows["good"]["path"]).read_text() == "ok\n"
        assert os.readlink(tmp_path / "result-good") == rows["good"]["path"]


def test_keep_going_and_keep_failed_short_flags(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("bad", "echo partial > scratch; exit 1")
                  + step("other", "sleep 0.3; echo fine > $out"))
    code, out, err = run("build", "-k", "-K", "-j", "1", "--store", str(tmp_path / "store"),
                         path, cwd=tmp_path)
    assert code == 1
    assert "kept /build and $out in" in err
    assert "other " in out  # built although "bad" failed first


def test_result_link_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("s", "echo x > $out"))
    link = tmp_path / "missing-dir" / "result"
    code, _, err = run("build", "--store", str(tmp_path / "store"), "--out-link", str(link),
                       path, cwd=tmp_path)
    assert code == 2, err
    assert "Traceback" not in err
    assert f"cannot create the result link {link}" in err and "--no-out-link" in err


def test_result_link_in_a_read_only_directory_unprivileged(unprivileged: Unprivileged) -> None:
    """As uid 65534 in a directory it cannot write: an error, not a PermissionError."""
    work = unprivileged.scratch("readonly-cwd")
    path = recipe(work, step("s", "echo x > $out"))
    readonly = work / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    result = unprivileged.reprobuild("build", "--store", str(work / "store"), path,
                                     cwd=readonly)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot create the result link result-s" in result.stderr


def test_network_failure_gets_a_hint(tmp_path: Path) -> None:
    script = "echo 'curl: (6) Could not resolve host: example.org' >&2; exit 6"
    path = recipe(tmp_path, step("download", script))
    code, _, err = run("build", "--store", str(tmp_path / "store"), path, cwd=tmp_path)
    assert code == 1
    assert "hint: steps have no network" in err, err


def test_size_too_small_names_the_recipe_key(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("s", "mkdir $out; echo x > $out/f")
                  + '[images.root]\nfrom = "s"\nformat = "ext4"\nsize = "8K"\n')
    code, _, err = run("build", "--store", str(tmp_path / "store"), path, cwd=tmp_path)
    assert code == 1, err
    assert "in [images.root]" in err and "size = " in err, err
    assert "--size" not in err



@pytest.mark.parametrize("columns", ["50", "133", "", "junk"])
def test_help_is_as_wide_as_argparse_makes_it(monkeypatch: pytest.MonkeyPatch,
                                              columns: str) -> None:
    # Our formatter sizes help without loading shutil; the text must be argparse's own.
    monkeypatch.setenv("COLUMNS", columns)
    parser = cli.build_parser(["image", "--help"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    image = sub.choices["image"]
    assert parser.formatter_class is image.formatter_class is cli.HelpFormatter
    ours = parser.format_help(), image.format_help(), image.format_usage()
    parser.formatter_class = image.formatter_class = argparse.HelpFormatter
    assert ours == (parser.format_help(), image.format_help(), image.format_usage())
