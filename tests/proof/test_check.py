"""`reprobuild check`: rebuilds under varied host conditions are compared bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from reprobuild.proof import check, variations
from reprobuild.store.store import Store, canon
from tests.conftest import REPO, need, need_tool

EPOCH = 1700000000
DRV = "d" * 64
INPUT_DRV = "e" * 64

FakeRunner = Callable[[list[str], Mapping[str, str], str, int | None],
                      "subprocess.CompletedProcess[str]"]


def _recipe(tmp_path: Path) -> str:
    directory = tmp_path / "recipe"
    directory.mkdir()
    (directory / "files").mkdir()
    for name in ("b", "a", "c"):
        (directory / "files" / name).write_text(name)
    path = directory / "r.toml"
    path.write_text(f'epoch = {EPOCH}\n[sources.files]\npath = "files"\n'
                    '[steps.leaky]\ninputs = ["files"]\nbuilder = ["files/a"]\n')
    return str(path)


def fake_engine(leak: Callable[[Mapping[str, str], str, int | None, str], bytes]) -> FakeRunner:
    """A stand-in for `reprobuild build --json`: one input, one step whose output holds
    ``leak(env, cwd, umask, input_dir)`` (what a leaky builder would let through)."""

    def run(argv: list[str], env: Mapping[str, str], cwd: str,
            umask: int | None) -> subprocess.CompletedProcess[str]:
        store = Store(argv[argv.index("--store") + 1])
        if store.lookup(INPUT_DRV) is None:
            build = store.new_build_dir("input")
            out = os.path.join(build, "out")
            os.mkdir(out)
            for name in ("a", "b", "c"):  # imported in sorted order
                Path(out, name).write_text(name)
            store.register(INPUT_DRV, out, derivation={"name": "files", "kind": "path"},
                           inputs={}, epoch=0)
        if store.lookup(DRV) is None:
            build = store.new_build_dir("leaky")
            out = os.path.join(build, "out")
            os.mkdir(out)
            Path(out, "same").write_text("same\n")
            Path(out, "leak").write_bytes(leak(env, cwd, umask,
                                               store.output_path(INPUT_DRV)))
            store.register(DRV, out, derivation={"name": "leaky", "kind": "step"},
                           inputs={"files": {"derivation": INPUT_DRV, "hash": "x"}},
                           epoch=EPOCH)
        entry = store.lookup(DRV)
        assert entry is not None
        rows = [{"target": "leaky", "derivation": DRV, "path": entry.path,
                 "hash": entry.hash}]
        return subprocess.CompletedProcess(argv, 0, json.dumps(rows), "")

    return run


SAFE = tuple(v for v in variations.VARIATION_NAMES if v != "uid")


def _run(tmp_path: Path, leak: Callable[[Mapping[str, str], str, int | None, str], bytes],
         chosen: tuple[str, ...] = SAFE, rounds: int = 1) -> check.CheckResult:
    return check.run_check(_recipe(tmp_path), [], str(tmp_path / "store"), rounds=rounds,
                           chosen=chosen, runner=fake_engine(leak))


def _differences(result: check.CheckResult) -> set[tuple[str, str]]:
    found = set()
    for rnd in result.rounds:
        for out in rnd.outputs:
            if out.report is not None:
                found |= set(out.report.summary())
    return found


@pytest.mark.parametrize("what, leak", [
    ("build directory", lambda env, cwd, umask, inp: cwd.encode()),
    ("umask", lambda env, cwd, umask, inp: oct(umask if umask is not None else
                                               os.umask(os.umask(0))).encode()),
    ("timezone", lambda env, cwd, umask, inp: env.get("TZ", "UTC").encode()),
    ("environment", lambda env, cwd, umask, inp: env.get("USER", "").encode()),
    ("readdir order", lambda env, cwd, umask, inp: "\n".join(os.listdir(inp)).encode()),
])
def test_leaks_are_caught(tmp_path: Path, what: str,
                          leak: Callable[[Mapping[str, str], str, int | None, str], bytes]
                          ) -> None:
    result = _run(tmp_path, leak)
    assert not result.identical, what
    assert ("/leak", "content") in _differences(result)
    assert ("/same", "content") not in _differences(result)
    text = result.render()
    assert "DIFFERS" in text and "/leak: content" in text and "NOT reproducible: leaky" in text
    # The step is marked in the main store.
    meta = Store(str(tmp_path / "store")).metadata(DRV)
    assert meta is not None
    marked = meta["unreproducible"]["differences"]
    assert {"path": "/leak", "kind": "content"} in marked
    assert all(d["path"] == "/leak" for d in marked)


def test_reproducible_step_passes(tmp_path: Path) -> None:
    result = _run(tmp_path, lambda env, cwd, umask, inp: b"constant", rounds=2)
    assert result.identical
    assert len(result.rounds) == 2
    assert [o.name for o in result.rounds[0].outputs] == ["leaky"]  # inputs copied
    assert "unreproducible" not in (Store(str(tmp_path / "store")).metadata(DRV) or {})
    assert "2 rounds" in result.render()


def test_variations_are_applied(tmp_path: Path) -> None:
    seen: list[tuple[dict[str, str], str, int | None, list[str]]] = []
    engine = fake_engine(lambda env, cwd, umask, inp: b"x")

    def spy(argv: list[str], env: Mapping[str, str], cwd: str,
            umask: int | None) -> subprocess.CompletedProcess[str]:
        seen.append((dict(env), cwd, umask, list(argv)))
        return engine(argv, env, cwd, umask)

    check.run_check(_recipe(tmp_path), [], str(tmp_path / "store"), chosen=SAFE,
                    runner=spy)
    reference, variant = seen
    assert variant[2] is not None and variant[2] != 0o022
    assert variant[0]["TZ"] != reference[0].get("TZ")
    assert variant[0]["LC_ALL"] != reference[0].get("LC_ALL")
    assert variant[0]["USER"] == "another-user"
    assert variant[1] != reference[1]
    assert "-j" in variant[3] and "--offline" in variant[3]
    store_arg = variant[3][variant[3].index("--store") + 1]
    assert store_arg != str(tmp_path / "store")
    # The recipe was moved to another directory; the targets follow it.
    assert variant[3][-1] == "leaky"
    assert "recipe-in-another-directory" in variant[3][-2]


def test_parse_variations() -> None:
    assert variations.parse_variations(None) == variations.VARIATION_NAMES
    assert variations.parse_variations("umask,env") == ("env", "umask")
    assert variations.parse_variations("none") == ()
    with pytest.raises(Exception, match="unknown variation"):
        variations.parse_variations("umsak")


def test_copy_tree_inverts_listing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c", "d", "e"):
        (src / name).write_text(name)
    base = variations.import_order_dir()
    need(base is not None, "no filesystem that lists directories in creation order")
    assert base is not None
    dest = Path(tempfile.mkdtemp(dir=base)) / "copy"
    try:
        variations.copy_tree(str(src), str(dest), invert=variations.listing_policy(base))
        assert os.listdir(dest) == os.listdir(src)[::-1]
        assert (dest / "c").read_text() == "c"
    finally:
        shutil.rmtree(dest.parent)


# -- the real engine and store, with the engine tests' fake (leaky) sandbox runner ---------
# The fake runner runs builders on the host, in the host build directory, with the host's
# umask: the leaks a real sandbox removes. check must catch each of them.
LEAKY_RECIPE = """\
epoch = 1700000000
[sources.sh]
host = "/bin/sh"
[sources.files]
path = "files"
[steps.clock]
inputs = ["sh"]
builder = ["sh", "-c", "mkdir $out; date +%s%N > $out/time; echo same > $out/same"]
[steps.builddir]
inputs = ["sh"]
builder = ["sh", "-c", "mkdir $out; pwd > $out/builddir; echo same > $out/same"]
[steps.umask]
inputs = ["sh"]
builder = ["sh", "-c", "mkdir $out; umask > $out/umask; echo same > $out/same"]
[steps.readdir]
inputs = ["sh", "files"]
builder = ["sh", "-c", "mkdir $out; ls -f $files > $out/listing; echo same > $out/same"]
[steps.honest]
inputs = ["sh", "files"]
builder = ["sh", "-c", "mkdir $out; ls $files > $out/listing; cat $files/a > $out/a"]
"""


def _leaky_recipe(tmp_path: Path) -> str:
    files = tmp_path / "files"
    files.mkdir()
    for name in ("c", "a", "e", "b", "d", "f"):
        (files / name).write_text(name + "\n")
    path = tmp_path / "leaky.toml"
    path.write_text(LEAKY_RECIPE)
    return str(path)


def fake_sandbox(argv: list[str], env: Mapping[str, str], cwd: str,
                 umask: int | None) -> subprocess.CompletedProcess[str]:
    """Run `reprobuild build` with the engine tests' fake sandbox runner."""
    argv = ["tests.build.fakecli" if a == "reprobuild" and argv[i - 1] == "-m" else a
            for i, a in enumerate(argv)]
    return check.run_process(argv, env, cwd, umask)


def test_leaky_steps_are_caught_with_the_real_engine(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = check.run_check(_leaky_recipe(tmp_path), [], str(store), runner=fake_sandbox)
    outputs = {o.name: o for o in result.rounds[0].outputs}
    assert set(outputs) == {"clock", "builddir", "umask", "readdir", "honest"}
    expected = {"clock": "/time", "builddir": "/builddir", "umask": "/umask",
                "readdir": "/listing"}
    for name, path in expected.items():
        out = outputs[name]
        assert not out.identical, name
        assert out.report is not None
        assert {p for p, _ in out.report.summary()} == {path}, (name, out.report.render())
        assert (path, "content") in out.report.summary()
    assert outputs["honest"].identical
    assert not result.identical
    text = result.render()
    assert "/umask: content: first differing byte" in text
    # Marked in the main store; a later build says so.
    main = Store(str(store))
    assert main.lookup(outputs["umask"].derivation_id).unreproducible is not None  # type: ignore[union-attr]
    assert main.lookup(outputs["honest"].derivation_id).unreproducible is None  # type: ignore[union-attr]
    later = fake_sandbox([sys.executable, "-m", "reprobuild", "build", "--store", str(store),
                          "--no-out-link", str(tmp_path / "leaky.toml")],
                         {**os.environ, "PYTHONPATH": str(REPO)},
                         str(tmp_path), None)
    assert later.returncode == 0, later.stderr
    assert "warning: umask is not reproducible" in later.stderr
    assert "/umask (content)" in later.stderr
    assert "honest is not reproducible" not in later.stderr


def test_explain(tmp_path: Path) -> None:
    result = check.run_check(_leaky_recipe(tmp_path), ["umask", "readdir", "clock", "honest"],
                             str(tmp_path / "store"), chosen=SAFE, runner=fake_sandbox,
                             mark=False, explain=True)
    why = {e.name: e for e in result.explanations}
    assert set(why) == {"umask", "readdir", "clock"}
    assert why["umask"].causes == ("umask",) and not why["umask"].without_variation
    assert why["readdir"].causes == ("import-order",)
    assert why["clock"].without_variation
    text = result.render()
    assert "umask: differs under umask alone" in text
    assert "readdir: differs under import-order alone" in text


def test_one_variation_at_a_time(tmp_path: Path) -> None:
    result = check.run_check(_leaky_recipe(tmp_path), ["umask", "honest", "readdir"],
                             str(tmp_path / "store"), chosen=("umask",),
                             runner=fake_sandbox, mark=False)
    verdict = {o.name: o.identical for o in result.rounds[0].outputs}
    assert verdict == {"umask": False, "honest": True, "readdir": True}
    assert result.rounds[0].variations == ("umask",)


@pytest.mark.tool
def test_keep_and_diffoscope(tmp_path: Path) -> None:
    need_tool("diffoscope")
    result = check.run_check(_leaky_recipe(tmp_path), ["umask"], str(tmp_path / "store"),
                             chosen=("umask",), runner=fake_sandbox, keep=True, mark=False,
                             diffoscope=True)
    rnd = result.rounds[0]
    try:
        assert rnd.kept is not None and os.path.isdir(rnd.kept)
        (out,) = rnd.outputs
        assert out.rebuilt_path is not None and out.rebuilt_path.startswith(rnd.kept)
        assert Path(out.rebuilt_path, "umask").read_text() != \
            Path(out.stored_path or "", "umask").read_text()
        assert f"kept the rebuilt store at {rnd.kept}" in result.render()
        assert out.diffoscope is not None and "umask" in out.diffoscope
        assert "0077" in out.diffoscope or "0002" in out.diffoscope
    finally:
        if rnd.kept:
            canon.remove_tree(rnd.kept)


def test_check_command_usage_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    recipe = _leaky_recipe(tmp_path)
    base = [sys.executable, "-m", "reprobuild", "check", "--store", str(tmp_path / "store")]
    bad = subprocess.run([*base, recipe, "nosuchstep"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "nosuchstep" in bad.stderr
    missing = subprocess.run([*base, str(tmp_path / "nope.toml")], env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.toml" in missing.stderr
    rounds = subprocess.run([*base, "--rounds", "0", recipe], env=env, capture_output=True,
                            text=True)
    assert rounds.returncode == 2 and "--rounds" in rounds.stderr


# -- the real sandbox, run as an unprivileged user -----------------------------------------
SANDBOXED_RECIPE = """\
epoch = 1700000000
[sources.bb]
host = "/bin/busybox"
[sources.files]
path = "files"
[steps.clock]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "mkdir $out; {{ date +%s%N; cat /proc/uptime; }} > $out/time"]
[steps.readdir]
inputs = ["bb", "files"]
builder = ["bb", "sh", "-c", "mkdir $out; find $files -type f > $out/listing"]
[steps.builddir]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "mkdir $out; pwd > $out/builddir"]
[steps.umask]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "mkdir $out; umask > $out/umask; touch $out/made"]
""".replace("{{", "{").replace("}}", "}")


@pytest.mark.userns
def test_sandboxed_steps(unprivileged: object) -> None:
    need_tool("busybox")
    from tests.conftest import Unprivileged

    assert isinstance(unprivileged, Unprivileged)
    work = unprivileged.scratch("sandboxed")
    files = work / "files"
    files.mkdir()
    for name in ("c", "a", "e", "b", "d", "f", "h", "g"):
        (files / name).write_text(name)
    (work / "r.toml").write_text(SANDBOXED_RECIPE)
    if unprivileged.as_root:
        for path in (files, *files.iterdir(), work / "r.toml"):
            os.chown(path, 65534, 65534)
    result = unprivileged.reprobuild("check", "--store", str(work / "store"), "--json",
                                     "--rounds", "2", str(work / "r.toml"), cwd=work)
    assert result.returncode == 1, result.stderr
    doc = json.loads(result.stdout)
    assert not doc["identical"]
    verdicts: dict[str, set[tuple[str, str]]] = {}
    for rnd in doc["rounds"]:
        for out in rnd["outputs"]:
            found = verdicts.setdefault(out["name"], set())
            if not out["identical"]:
                found |= {(d["path"], d["kind"]) for d in out["report"]["differences"]}
    # The clock and the readdir order get through any sandbox: check catches them and
    # names the path and the kind.
    assert ("/time", "content") in verdicts["clock"]
    assert ("/listing", "content") in verdicts["readdir"]
    # The build directory and the umask do not: the sandbox fixes /build and umask 022,
    # so the rebuild under another directory and umask is identical (the fake-runner
    # tests above show check catching them when they leak).
    assert verdicts["builddir"] == set()
    assert verdicts["umask"] == set()
    later = unprivileged.reprobuild("build", "--store", str(work / "store"),
                                    "--no-out-link", str(work / "r.toml"), "clock", cwd=work)
    assert later.returncode == 0, later.stderr
    assert "warning: clock is not reproducible" in later.stderr


def _shipped_recipes() -> list[Path]:
    return sorted((REPO / "recipes").glob("*.toml"))


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.parametrize("recipe", _shipped_recipes(), ids=lambda p: p.name)
def test_shipped_recipes_are_reproducible(unprivileged: object, recipe: Path) -> None:
    from tests.conftest import Unprivileged

    assert isinstance(unprivileged, Unprivileged)
    work = unprivileged.scratch(f"shipped-{recipe.stem}")
    store = work / "store"
    result = unprivileged.reprobuild("check", "--store", str(store), "--deep", "--rounds", "2",
                                     str(recipe), cwd=work, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical over 2 rounds" in result.stdout


def test_import_order_skipped_without_tmpfs(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(variations, "import_order_dir", lambda min_free=0: None)
    result = _run(tmp_path, lambda env, cwd, umask, inp: b"constant",
                  chosen=("umask", "import-order"))
    rnd = result.rounds[0]
    assert rnd.variations == ("umask",)
    assert [name for name, _ in rnd.skipped] == ["import-order"]
    assert "variation import-order skipped" in result.render()
