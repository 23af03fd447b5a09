"""The engine never builds on, or hands out, an output whose bytes changed; temporary
gc roots; leftovers and SIGTERM; a producer table the scheduler does not know."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from reprobuild.build.engine import BuildReport, Engine, Options
from reprobuild.build.local import LocalExecutor
from reprobuild.build.plan import plan
from reprobuild.build.producers import PRODUCERS, Job
from reprobuild.build.progress import Progress
from reprobuild.build.recipe import load_recipe
from reprobuild.build.scheduler import Scheduler
from reprobuild.errors import BuildError
from reprobuild.store.store import Store
from tests.build.fakes import FakeRunner
from tests.build.test_engine import fakecli, recipe, step

BODY = (step("tree", "mkdir -p $out/etc $out/bin; cp $files/greeting $out/etc/conf; "
                     "echo tool > $out/bin/tool; chmod +x $out/bin/tool; "
                     "ln -s bin/tool $out/link", ("sh", "files"))
        + step("blob", "head -c 20000 /dev/zero | tr '\\0' b > $out")
        + '[images.img]\nfrom = "tree"\nformat = "tar"\n'
        + step("use", "cat $tree/etc/conf $tree/bin/tool $blob $img $files/greeting > $out; "
                      "cd $tree && find . -printf '%p %m %s %l\\n' | LC_ALL=C sort >> $out",
               ("sh", "tree", "blob", "img", "files")))


def engine_build(path: str, store: Path, targets: list[str]) -> tuple[dict[str, str],
                                                                      list[str]]:
    warnings: list[str] = []
    engine = Engine(Store(str(store)), FakeRunner, Options(jobs=2), Progress(enabled=False),
                    warn=warnings.append)
    try:
        report = engine.build(plan(load_recipe(path), targets))
    finally:
        engine.close()
    assert report.ok, report.failures
    return {k: e.hash for k, e in report.entries.items()}, warnings


def _writable_write(path: str, change: Callable[[bytes], bytes], *, keep_stat: bool = False
                    ) -> None:
    st = os.stat(path)
    os.chmod(path, 0o644)
    data = change(Path(path).read_bytes())
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()
    os.chmod(path, st.st_mode & 0o7777)
    if keep_stat:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip(data: bytes) -> bytes:
    return data[:100] + bytes([(data[100] + 1) % 256]) + data[101:]


def _in_dir(path: str, act: Callable[[], None]) -> None:
    os.chmod(path, 0o755)
    act()
    os.chmod(path, 0o555)


def _replace_inode(path: str) -> None:
    st = os.stat(path)
    _in_dir(os.path.dirname(path), lambda: (os.unlink(path), Path(path).write_text("hullo\n"),
                                            os.chmod(path, 0o444)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _with_xattr(path: str) -> None:
    os.chmod(path, 0o644)
    os.setxattr(path, "user.added", b"1")
    os.chmod(path, 0o444)


CORRUPTIONS: dict[str, tuple[str, Callable[[str], None]]] = {
    "image byte flipped": ("img", lambda p: _writable_write(p, _flip)),
    "image truncated": ("img", lambda p: _writable_write(p, lambda d: d[:512])),
    "file step output flipped, mtime kept": (
        "blob", lambda p: _writable_write(p, _flip, keep_stat=True)),
    "tree file rewritten, same size": ("tree", lambda p: _writable_write(
        os.path.join(p, "etc/conf"), lambda d: d.upper(), keep_stat=True)),
    "tree file replaced by a new inode": ("tree", lambda p: _replace_inode(
        os.path.join(p, "etc/conf"))),
    "tree file deleted": ("tree", lambda p: _in_dir(
        os.path.join(p, "etc"), lambda: os.unlink(os.path.join(p, "etc/conf")))),
    "tree extra file": ("tree", lambda p: _in_dir(
        os.path.join(p, "etc"), lambda: Path(p, "etc/new").write_text(""))),
    "tree setuid bit": ("tree", lambda p: os.chmod(os.path.join(p, "bin/tool"), 0o4555)),
    "tree symlink swapped": ("tree", lambda p: _in_dir(p, lambda: (
        os.unlink(os.path.join(p, "link")), Path(p, "link").symlink_to("etc/conf")))),
    "tree xattr added": ("tree", lambda p: _with_xattr(os.path.join(p, "etc/conf"))),
    "path source import flipped": ("files", lambda p: _writable_write(
        os.path.join(p, "greeting"), lambda d: d.replace(b"h", b"j"))),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_changed_output_is_rebuilt_not_used(tmp_path: Path, case: str) -> None:
    path = recipe(tmp_path, BODY)
    clean, _ = engine_build(path, tmp_path / "clean", ["use"])
    store = tmp_path / "store"
    first, _ = engine_build(path, store, ["tree", "blob", "img", "files"])
    key, corrupt = CORRUPTIONS[case]
    corrupt(Store(str(store)).output_path(plan(load_recipe(path), ["use"]).nodes[key].id))
    # As a cached result: said, removed, rebuilt with the right bytes.
    again, warnings = engine_build(path, store, [key])
    assert again[key] == first[key]
    assert len(warnings) == 1 and "content no longer matches its recorded hash" in \
        warnings[0] and "rebuilding" in warnings[0], warnings
    corrupt(Store(str(store)).output_path(plan(load_recipe(path), ["use"]).nodes[key].id))
    # As the input of a new build: rebuilt first, so the new build sees the right bytes.
    used, warnings = engine_build(path, store, ["use"])
    assert warnings and used == clean
    s = Store(str(store))
    assert all(s.damage(e.derivation_id) is None for e in s.paths())


def test_a_fake_producer_is_registered_without_touching_the_scheduler(tmp_path: Path) -> None:
    class Stamp:
        needs_runner = False
        needs_network = False
        def __init__(self) -> None:
            self.produce_calls: list[str] = []

        def produce(self, job: Job) -> None:
            self.produce_calls.append(job.node.key)
            Path(job.output).write_text(f"stamped {job.node.key}\n")

        input_hashes = PRODUCERS["step"].input_hashes
        expected_hash = PRODUCERS["step"].expected_hash

        def epoch(self, job: Job) -> int:
            return 0

    path = recipe(tmp_path, step("a", "exit 1") + step("b", "exit 1", ("sh", "a")))
    stamp = Stamp()
    engine = Engine(Store(str(tmp_path / "store")), FakeRunner, Options(),
                    producers={**PRODUCERS, "step": stamp})
    report = engine.build(plan(load_recipe(path)))
    assert report.ok and stamp.produce_calls == ["a", "b"]
    assert Path(report.entries["b"].path).read_text() == "stamped b\n"


def test_gc_during_builds_never_leaves_a_dangling_result_link(tmp_path: Path) -> None:
    path = recipe(tmp_path, "".join(
        step(f"s{i}", f"sleep 0.{i}; echo {i} > $out") for i in range(4)))
    store = tmp_path / "store"
    for trial in range(3):
        work = tmp_path / f"trial{trial}"
        work.mkdir()
        # A changed step each trial, so that every trial builds something.
        text = Path(path).read_text()
        Path(path).write_text(text.replace(f"echo {trial - 1} ", f"echo {trial - 1}x "))
        build = fakecli("build", "--store", str(store), path, cwd=work)
        while build.poll() is None:
            gc = fakecli("gc", "--store", str(store), cwd=work)
            gc.communicate()
        _out, err = build.communicate()
        assert build.returncode == 0, err
        links = sorted(work.glob("result-*"))
        assert len(links) == 4
        assert all(link.resolve().exists() for link in links), trial


def test_sigterm_is_an_interrupt_and_leaves_no_build_directory(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    path = recipe(tmp_path, step("slow", f"mkdir $out; touch {marker}; exec sleep 60"))
    store = tmp_path / "store"
    proc = fakecli("build", "--store", str(store), path, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 20  # the step was killed, not waited for
    assert os.listdir(store / "tmp") == []


def test_the_next_build_removes_what_a_killed_build_left(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    path = recipe(tmp_path, step("slow", f"mkdir $out; touch {marker}; exec sleep 60"))
    store = tmp_path / "store"
    proc = fakecli("build", "--store", str(store), "--no-out-link", path, cwd=tmp_path,
                   start_new_session=True)
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    left = sorted(os.listdir(store / "tmp"))
    assert left and all(n.startswith("build.") for n in left)
    # A killed sandbox server's overlay work directory goes with its build directory.
    (store / "tmp" / f".sandbox-work-{left[0]}").mkdir()
    # A live holder's directory stays: another process is building in it.
    live = Store(str(store)).new_build_dir("build")
    Path(path).write_text(Path(path).read_text().replace("exec sleep 60", "true"))
    other = fakecli("build", "--store", str(store), "--no-out-link", path, cwd=tmp_path)
    _out, err = other.communicate()
    assert other.returncode == 0, err
    assert sorted(os.listdir(store / "tmp")) == [os.path.basename(live)]


def test_gc_keep_refuses_unknown_ids_and_dry_run_prints_paths(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("a", "echo a > $out"))
    store = tmp_path / "store"
    build = fakecli("build", "--json", "--store", str(store), "--no-out-link", path,
                    cwd=tmp_path)
    out, err = build.communicate()
    assert build.returncode == 0, err
    row = json.loads(out)[0]
    gc = fakecli("gc", "--store", str(store), "--keep", "0" * 64, cwd=tmp_path)
    _out, err = gc.communicate()
    assert gc.returncode == 2 and "0" * 64 in err
    gc = fakecli("gc", "--store", str(store), "--dry-run", cwd=tmp_path)
    out, _err = gc.communicate()
    assert gc.returncode == 0 and row["path"] in out.splitlines()
    assert os.path.exists(row["path"])


def test_store_delete_removes_dependents_and_refuses_roots(tmp_path: Path) -> None:
    path = recipe(tmp_path, step("a", "echo a > $out") + step("b", "cat $a > $out",
                                                              ("sh", "a")))
    store = tmp_path / "store"
    build = fakecli("build", "--json", "--store", str(store), path, "b", cwd=tmp_path)
    out, err = build.communicate()
    assert build.returncode == 0, err
    b_path = json.loads(out)[0]["path"]
    a_id = plan(load_recipe(path)).nodes["a"].id
    refused = fakecli("store", "delete", a_id, "--store", str(store), cwd=tmp_path)
    _out, err = refused.communicate()
    assert refused.returncode == 2 and "result-b" in err and os.path.exists(b_path)
    forced = fakecli("store", "delete", a_id, "--force", "--store", str(store), cwd=tmp_path)
    out, err = forced.communicate()
    assert forced.returncode == 0, err
    assert not os.path.exists(b_path) and Store(str(store)).lookup(a_id) is None


@pytest.mark.parametrize("broken", ["{}", "[]", '{"hash": 1}', "{"])
def test_broken_metadata_blocks_neither_build_nor_ls_and_repair_fixes_it(
        tmp_path: Path, broken: str) -> None:
    path = recipe(tmp_path, step("a", "echo a > $out"))
    store = tmp_path / "store"
    first = fakecli("build", "--json", "--store", str(store), path, cwd=tmp_path)
    out, err = first.communicate()
    assert first.returncode == 0, err
    did = json.loads(out)[0]["derivation"]
    Path(Store(str(store)).meta_path(did)).write_text(broken)
    ls = fakecli("store", "ls", "--store", str(store), cwd=tmp_path)
    out, err = ls.communicate()
    assert ls.returncode == 0 and did not in out, err
    verify = fakecli("store", "verify", "--store", str(store), cwd=tmp_path)
    _out, err = verify.communicate()
    assert verify.returncode == 1 and did in err and "Traceback" not in err, err
    repair = fakecli("store", "verify", "--repair", "--store", str(store), cwd=tmp_path)
    out, err = repair.communicate()
    assert repair.returncode == 0 and did in out, err
    again = fakecli("build", "--json", "--store", str(store), path, cwd=tmp_path)
    out, err = again.communicate()
    assert again.returncode == 0, err
    assert Path(json.loads(out)[0]["path"]).read_text() == "a\n"
    verify = fakecli("store", "verify", "--store", str(store), cwd=tmp_path)
    _out, err = verify.communicate()
    assert verify.returncode == 0, err


class _Flaky:
    """Writes every step's output, but fails for step ``bad`` with ``error``."""

    needs_runner = False
    needs_network = False

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.calls: list[str] = []

    def produce(self, job: Job) -> None:
        self.calls.append(job.node.key)
        if job.node.key == "bad" and self.error is not None:
            raise self.error
        Path(job.output).write_text(job.node.key)

    def input_hashes(self, job: Job) -> dict[str, dict[str, str]]:
        return PRODUCERS["step"].input_hashes(job)

    def expected_hash(self, job: Job) -> str | None:
        return None

    def epoch(self, job: Job) -> int:
        return 0


STEPS = step("bad", "true") + "".join(step(f"s{i}", f"echo {i}") for i in range(6))


def test_an_error_that_is_not_ours_stops_everything_even_with_keep_going(
        tmp_path: Path) -> None:
    flaky = _Flaky(RuntimeError("a bug"))
    engine = Engine(Store(str(tmp_path / "store")), FakeRunner,
                    Options(jobs=1, keep_going=True), producers={**PRODUCERS, "step": flaky})
    with pytest.raises(RuntimeError):
        engine.build(plan(load_recipe(recipe(tmp_path, STEPS))))
    assert flaky.calls[-1] == "bad"  # nothing started after it


class _HoldsUntilCancelled(_Flaky):
    """Step ``bad`` fails only while step ``first`` runs, and ``first`` ends only once the
    walk is cancelled: the steps that wait for ``first`` are ready only after the
    failure, so whether they start cannot depend on the threads' timing."""

    def __init__(self, error: BaseException | None) -> None:
        super().__init__(error)
        self.scheduler: Scheduler[object] | None = None
        self.first_running = threading.Event()

    def produce(self, job: Job) -> None:
        if job.node.key == "bad":
            assert self.first_running.wait(60)
        if job.node.key == "first":
            assert self.scheduler is not None
            self.first_running.set()
            deadline = time.monotonic() + 60
            while not self.scheduler.cancelled:
                assert time.monotonic() < deadline, "the failure did not cancel the walk"
                time.sleep(0.01)
        super().produce(job)


def _build_while_first_runs(tmp_path: Path, producer: _HoldsUntilCancelled) -> BuildReport:
    engine = Engine(Store(str(tmp_path / "store")), FakeRunner, Options(jobs=2),
                    producers={**PRODUCERS, "step": producer})
    assert isinstance(engine.executor, LocalExecutor)
    producer.scheduler = engine.executor.scheduler  # type: ignore[assignment]
    body = step("bad", "true") + step("first", "echo first") + "".join(
        step(f"s{i}", f"echo {i}", ("sh", "first")) for i in range(6))
    report = engine.build(plan(load_recipe(recipe(tmp_path, body))))
    assert [f.key for f in report.failures] == ["bad"]
    # "first" was running when "bad" failed, and ends; none of those after it starts.
    assert "first" in report.entries
    assert report.cancelled == [f"s{i}" for i in range(6)]
    assert report.skipped == []  # none depended on "bad"
    assert not {f"s{i}" for i in range(6)} & set(producer.calls)
    return report


def test_a_failed_step_cancels_what_has_not_started(tmp_path: Path) -> None:
    producer = _HoldsUntilCancelled(BuildError("bad failed with exit status 1"))
    report = _build_while_first_runs(tmp_path, producer)
    assert "exit status 1" in report.failures[0].message


def test_enospc_while_registering_is_a_failure_that_cancels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Store.register

    def register(self: Store, derivation_id: str, output: str, **kw: object) -> object:
        if kw["derivation"]["name"] == "bad":  # type: ignore[index]
            raise OSError(28, "No space left on device")
        return real(self, derivation_id, output, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "register", register)
    report = _build_while_first_runs(tmp_path, _HoldsUntilCancelled(None))
    assert "No space left on device" in report.failures[0].message
