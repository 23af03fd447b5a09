"""The engine with a fake runner: cache hits, failures, kills, concurrency, offline, gc."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reprobuild.build.engine import Engine, Failure, Options
from reprobuild.build.plan import plan
from reprobuild.build.progress import Progress
from reprobuild.build.recipe import load_recipe
from reprobuild.errors import FetchError
from reprobuild.store.store import Store
from tests.build.fakes import FakeRunner
from tests.conftest import REPO

HEADER = """\
epoch = 1700000000
[sources.sh]
host = "/bin/sh"
[sources.files]
path = "files"
"""


def recipe(tmp_path: Path, body: str) -> str:
    (tmp_path / "files").mkdir(exist_ok=True)
    (tmp_path / "files" / "greeting").write_text("hello\n")
    path = tmp_path / "recipe.toml"
    path.write_text(HEADER + body)
    return str(path)


def step(name: str, script: str, inputs: tuple[str, ...] = ("sh",)) -> str:
    return (f'[steps.{name}]\ninputs = {json.dumps(list(inputs))}\n'
            f'builder = ["sh", "-c", {json.dumps(script)}]\n')


def build(path: str, store: Path, targets: list[str] | None = None, **options: object):  # type: ignore[no-untyped-def]
    runner = FakeRunner()
    engine = Engine(Store(str(store)), lambda: runner,
                    Options(**{"jobs": 2, **options}),  # type: ignore[arg-type]
                    Progress(enabled=False))
    report = engine.build(plan(load_recipe(path), targets))
    engine.close()
    return report, runner


def fakecli(*args: str, cwd: Path, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.build.fakecli", *args],
                            cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)  # type: ignore[call-overload]


def test_build_then_cache_hit(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("a", "mkdir $out && cp $files/greeting $out/g",
                                 ("sh", "files"))
                  + step("b", "cat $a/g > $out", ("sh", "a")))
    report, runner = build(path, tmp_path / "store")
    assert report.ok and sorted(report.built) == ["a", "b", "files", "sh"]
    assert len(runner.runs) == 2
    assert Path(report.entries["b"].path).read_text() == "hello\n"
    again, runner2 = build(path, tmp_path / "store")
    assert again.ok and again.built == [] and runner2.runs == []
    assert again.entries["b"] == report.entries["b"]


def test_builder_may_name_a_path_inside_an_input(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("tools", "mkdir -p $out/bin && cp /bin/sh $out/bin/sh")
                  + '[steps.use]\ninputs = ["tools"]\n'
                    'builder = ["tools/bin/sh", "-c", "echo ok > $out"]\n')
    report, runner = build(path, tmp_path / "store")
    assert report.ok, report.failures
    assert runner.runs[-1].argv[0] == "/inputs/tools/bin/sh"
    assert Path(report.entries["use"].path).read_text() == "ok\n"


def test_failure_names_step_log_and_last_lines(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("bad", "echo first line; echo the-last-words >&2; exit 3")
                  + step("after", "cat $bad > $out", ("sh", "bad"))
                  + step("other", "sleep 0.3; echo fine > $out"))
    report, _ = build(path, tmp_path / "store", keep_going=True)
    assert [f.key for f in report.failures] == ["bad"]
    message = report.failures[0].message
    assert "bad failed with exit status 3" in message and "the-last-words" in message
    assert report.failures[0].log is not None and report.failures[0].log in message
    assert Path(report.failures[0].log).read_text().startswith("first line")
    assert report.skipped == ["after"]
    assert "other" in report.built  # independent step finished with --keep-going


def test_failure_without_keep_going_stops_new_steps(tmp_path: Path) -> None:
    body = step("bad", "exit 1") + "".join(step(f"s{i}", "echo x > $out") for i in range(6))
    path = recipe(tmp_path, body)
    report, _ = build(path, tmp_path / "store", keep_going=False, jobs=1)
    assert [f.key for f in report.failures] == ["bad"]
    steps = [f"s{i}" for i in range(6)]
    # s0..s5 are one derivation: one builds it, those that waited on its lock find it.
    built = [k for k in report.entries if k in steps]
    assert sorted(built + report.cancelled) == steps
    assert report.skipped == []  # none of them depended on the failure
    # How many start before "bad" fails depends on the threads; that none starts after
    # it is test_store_use.test_a_failed_step_cancels_what_has_not_started.


def test_keep_failed_keeps_build_dir(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("bad", "echo partial > scratch; exit 1"))
    report, _ = build(path, tmp_path / "store", keep_failed=True)
    message = str(report.failures[0].message)
    assert "kept /build and $out in" in message
    kept = message.rsplit("kept /build and $out in ", 1)[1].strip()
    assert Path(kept, "build", "scratch").read_text() == "partial\n"


def test_missing_out_is_an_error(tmp_path: Path) -> None:
    report, _ = build(recipe(tmp_path, step("lazy", "true")), tmp_path / "store")
    assert "made no $out" in report.failures[0].message


DEB = """
[sources.pkg]
deb = "busybox-static"
version = "1:1.35.0-4+deb12u1+b1"
sha256 = "%s"
""" % ("ab" * 32)


def test_offline_names_missing_inputs_and_fetch_command(tmp_path: Path) -> None:
    path = recipe(tmp_path, DEB + step("use", "true > $out", ("sh", "pkg")))
    with pytest.raises(FetchError) as info:
        build(path, tmp_path / "store", offline=True)
    text = str(info.value)
    assert "pkg: busybox-static=1:1.35.0-4+deb12u1+b1" in text
    assert f"reprobuild fetch {path}" in text
    assert not (tmp_path / "store" / "meta").exists() or not os.listdir(
        tmp_path / "store" / "meta")


def test_sigkill_mid_build_then_verify_and_rebuild(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    path = recipe(tmp_path, step(
        "slow", f"mkdir $out; echo half > $out/a; touch {marker}; sleep 30; echo b > $out/b"))
    store = tmp_path / "store"
    proc = fakecli("build", "--store", str(store), "--no-out-link", path, cwd=tmp_path,
                   start_new_session=True)
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    verify = fakecli("store", "verify", "--store", str(store), cwd=tmp_path)
    _out, err = verify.communicate()
    assert verify.returncode == 0, err
    assert Store(str(store)).lookup(plan(load_recipe(path)).nodes["slow"].id) is None
    # Rebuild (without the sleep) in the same store: works, and only complete output counts.
    Path(path).write_text(Path(path).read_text().replace("sleep 30; ", ""))
    report, _ = build(path, store)
    assert report.ok
    assert sorted(os.listdir(report.entries["slow"].path)) == ["a", "b"]


def waited_for_locks(store: Path) -> bool:
    """Whether a process waits for the flock of a file in ``store``'s logs (each entry's
    build lock is its log file)."""
    keys = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(store / "logs"):
            st = entry.stat()
            keys.add(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
    # A waiter's line: "3: -> FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF".
    return any(line.split()[1] == "->" and line.split()[6] in keys
               for line in Path("/proc/locks").read_text().splitlines())


def test_two_concurrent_builders_build_once(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    release = tmp_path / "release"
    # The step ends only once the other builder waits for a lock: that one has planned
    # while the step's output was missing, so it cannot find it done before it starts
    # (with a fixed sleep, a builder slow to start on a loaded machine could).
    path = recipe(tmp_path, step("once", f"echo run >> {counter}; for i in $(seq 1200); do "
                                         f"[ -e {release} ] && break; sleep 0.05; done; "
                                         "echo x > $out"))
    store = tmp_path / "store"
    procs = [fakecli("build", "--json", "--store", str(store), "--no-out-link", path,
                     cwd=tmp_path) for _ in range(2)]
    deadline = time.monotonic() + 30
    while not waited_for_locks(store):
        assert time.monotonic() < deadline, "neither builder waits for the other's lock"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.02)
    release.touch()
    results = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert counter.read_text() == "run\n"
    paths = {json.loads(out)[0]["path"] for out, _ in results}
    assert len(paths) == 1
    states = sorted("once: done by another process" in err for _, err in results)
    assert states == [False, True], results


def test_cli_json_links_and_gc(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("keep", "echo keep > $out") + step("drop", "echo d > $out"))
    store = tmp_path / "store"
    proc = fakecli("build", "--json", "--store", str(store), path, "keep", "drop",
                   cwd=tmp_path)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    rows = json.loads(out)
    assert [r["target"] for r in rows] == ["keep", "drop"]
    assert set(rows[0]) == {"target", "derivation", "path", "hash", "fsverity", "record",
                            "error"}
    assert rows[0]["error"] is None
    assert os.readlink(tmp_path / "result-keep") == rows[0]["path"]
    os.unlink(tmp_path / "result-drop")
    gc = fakecli("gc", "--store", str(store), cwd=tmp_path)
    gc.communicate()
    assert gc.returncode == 0
    assert Path(rows[0]["path"]).read_text() == "keep\n"
    assert not os.path.exists(rows[1]["path"])
    show = fakecli("show", "--store", str(store), path, "keep", cwd=tmp_path)
    shown, _ = show.communicate()
    assert json.loads(shown)["id"] == rows[0]["derivation"]


def test_cli_recipe_error_exit_code(tmp_path: Path) -> None:
    path = recipe(tmp_path, '[steps.a]\nbulder = ["sh"]\n')
    proc = fakecli("build", "--store", str(tmp_path / "s"), path, cwd=tmp_path)
    _, err = proc.communicate()
    assert proc.returncode == 2
    assert "did you mean 'builder'" in err


def test_cli_log_path_and_store_ls(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("talk", "echo saying-hello; echo x > $out"))
    store = str(tmp_path / "store")
    missing = fakecli("path", "--store", store, path, "talk", cwd=tmp_path)
    _, err = missing.communicate()
    assert missing.returncode == 1 and "not built" in err
    built = fakecli("build", "--store", store, path, cwd=tmp_path)
    built.communicate()
    log = fakecli("log", "--store", store, path, "talk", cwd=tmp_path)
    out, _ = log.communicate()
    assert log.returncode == 0 and out == "saying-hello\n"
    where = fakecli("path", "--store", store, path, "talk", cwd=tmp_path)
    out, _ = where.communicate()
    assert where.returncode == 0 and Path(out.strip()).read_text() == "x\n"
    listing = fakecli("store", "ls", "--store", store, cwd=tmp_path)
    out, _ = listing.communicate()
    assert any(line.endswith(" talk") for line in out.splitlines())


def test_timeout_is_reported(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("hang", "sleep 20") + 'timeout = "1s"\n')
    report, _ = build(path, tmp_path / "store")
    assert "hang timed out after 1 s" in report.failures[0].message


def test_shell_runs_in_the_step_sandbox(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("s", "echo x > $out", ("sh", "files")))
    proc = fakecli("shell", "--store", str(tmp_path / "store"), path, "s", "--command", "sh",
                   "-c", "cat $files/greeting; exit 7", cwd=tmp_path, stdin=subprocess.DEVNULL)
    out, err = proc.communicate()
    assert proc.returncode == 7, err
    assert out == "hello\n"


class RecordingExecutor:
    """An executor that builds nothing: it records what the engine hands it."""

    runner = None

    def __init__(self) -> None:
        self.handed: list[list[str]] = []
        self.closed = False

    def execute(self, plan, todo, report) -> None:  # type: ignore[no-untyped-def]
        self.handed.append([n.key for n in todo])
        report.failures.append(Failure(todo[-1].key, "recorded only"))

    def close(self) -> None:
        self.closed = True


def test_the_engine_hands_only_what_the_store_lacks_to_its_executor(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("a", "echo a > $out") + step("b", "cat $a > $out", ("sh", "a"))
                  + step("c", "cat $b > $out", ("sh", "b")))
    report, _runner = build(path, tmp_path / "store", ["a"])
    assert report.ok
    executor = RecordingExecutor()
    engine = Engine(Store(str(tmp_path / "store")), FakeRunner, Options(),
                    Progress(enabled=False), executor=executor)
    later = engine.build(plan(load_recipe(path), ["c"]))
    engine.close()
    # "a" and "sh" are in the store: not handed over; the rest in dependency order.
    assert executor.handed == [["b", "c"]] and executor.closed
    assert sorted(later.entries) == ["a", "sh"] and not later.ok
