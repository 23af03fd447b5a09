"""build --substituters: a second store gets everything from a cache, with zero builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reprobuild.cli import main
from reprobuild.commands import common
from reprobuild.store.store import Store
from tests.build.fakes import FakeRunner
from tests.build.test_sandboxed import copy_recipes, need_sandbox
from tests.cache.conftest import Keys
from tests.conftest import REPO, Unprivileged


@pytest.fixture()
def runners(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[FakeRunner]:
    """Builds in this process with the fake runner; each engine's runner is recorded."""
    made: list[FakeRunner] = []

    def start(*, debug: bool = False) -> FakeRunner:
        made.append(FakeRunner())
        return made[-1]

    monkeypatch.setattr(common, "start_runner", start)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    monkeypatch.delenv("REPROBUILD_SUBSTITUTERS", raising=False)
    monkeypatch.delenv("REPROBUILD_TRUSTED_KEYS", raising=False)
    return made


def build(store: Path, *args: str) -> int:
    return main(["build", str(REPO / "recipes" / "hello.toml"), "--store", str(store),
                 "--no-out-link", "--json", *args])


def steps_run(runners: list[FakeRunner]) -> int:
    return sum(len(r.runs) for r in runners)


def test_empty_store_substitutes_everything(runners: list[FakeRunner], keys: Keys,
                                            nginx_url: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert build(tmp_path / "a") == 0
    built = json.loads(capsys.readouterr().out)
    assert steps_run(runners) == 2  # rootfs and the root image
    assert main(["copy", "--store", str(tmp_path / "a"), "--to", nginx_url, "--key",
                 str(keys.private_path), str(REPO / "recipes" / "hello.toml")]) == 0
    capsys.readouterr()
    pub = str(keys.public_path)

    assert build(tmp_path / "b", "-n", "--substituters", nginx_url, "--trusted-keys", pub) == 0
    out = capsys.readouterr().out
    assert "would download 1 outputs" in out and f"  root {built[0]['derivation']} " \
           f"from {nginx_url}" in out
    assert "would build" not in out
    assert not (tmp_path / "b" / "out").exists() or not any((tmp_path / "b" / "out").iterdir())

    assert build(tmp_path / "b", "-j", "0", "--substituters", nginx_url,
                 "--trusted-keys", pub) == 0
    captured = capsys.readouterr()
    assert steps_run(runners) == 2  # zero local builds
    assert json.loads(captured.out)[0]["hash"] == built[0]["hash"]
    assert "downloaded" in captured.err
    meta = Store(str(tmp_path / "b")).metadata(built[0]["derivation"])
    assert meta is not None and meta["substituted"]["cache"] == nginx_url


def test_a_bad_cache_warns_and_builds_locally(runners: list[FakeRunner], keys: Keys,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert build(tmp_path / "a") == 0
    built = json.loads(capsys.readouterr().out)
    url = f"file://{tmp_path}/cache"
    assert main(["copy", "--store", str(tmp_path / "a"), "--to", url, "--key",
                 str(keys.private_path), built[0]["derivation"], "--no-inputs"]) == 0
    for path in (tmp_path / "cache" / "objects").iterdir():
        path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    assert build(tmp_path / "b", "-j", "0", "--substituters", url, "--trusted-keys",
                 str(keys.public_path)) == 1
    err = capsys.readouterr().err
    assert f"warning: cache {url}: cannot substitute root ({built[0]['derivation']}): " \
           f"{url}/objects/" in err and "object is truncated: 100 of" in err
    assert "-j 0 builds nothing locally, and 2 outputs are in no cache" in err
    assert build(tmp_path / "b", "--substituters", url, "--trusted-keys",
                 str(keys.public_path)) == 0
    assert json.loads(capsys.readouterr().out)[0]["hash"] == built[0]["hash"]
    assert steps_run(runners) == 4  # built again, locally
    assert Store(str(tmp_path / "b")).verify() == []


def test_j0_without_caches_names_what_must_be_built(runners: list[FakeRunner],
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert build(tmp_path / "b", "-j", "0") == 1
    err = capsys.readouterr().err
    assert "-j 0 builds nothing locally, and 2 outputs are in no cache:\n  rootfs " in err
    assert steps_run(runners) == 0


@pytest.mark.userns
def test_real_sandbox_build_then_substitute_with_zero_builds(
        unprivileged: Unprivileged, nginx_url: str) -> None:
    need_sandbox()
    work = copy_recipes(unprivileged, "cache-e2e")
    if unprivileged.as_root:
        shutil.chown(work / "recipes", 65534, 65534)
    key = unprivileged.reprobuild("sign", "--generate-key", str(work / "builder.key"),
                                  cwd=work)
    assert key.returncode == 0, key.stderr
    first = unprivileged.reprobuild("build", "--json", "--store", str(work / "a"),
                                    "recipes/hello.toml", cwd=work)
    assert first.returncode == 0, first.stderr
    copied = unprivileged.reprobuild("copy", "--store", str(work / "a"), "--to", nginx_url,
                                     "--key", str(work / "builder.key"),
                                     "recipes/hello.toml", cwd=work)
    assert copied.returncode == 0, copied.stderr
    second = unprivileged.reprobuild("build", "--json", "-j", "0", "--store",
                                     str(work / "b"), "recipes/hello.toml",
                                     "--substituters", nginx_url, "--trusted-keys",
                                     str(work / "builder.key.pub"), cwd=work)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)[0]["hash"] == json.loads(first.stdout)[0]["hash"]
    verify = unprivileged.reprobuild("store", "verify", "--store", str(work / "b"), cwd=work)
    assert verify.returncode == 0, verify.stderr


def test_challenge_compares_the_store_with_caches(runners: list[FakeRunner], keys: Keys,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(REPO / "recipes" / "hello.toml")
    assert build(tmp_path / "a") == 0
    root = json.loads(capsys.readouterr().out)[0]
    one, two = f"file://{tmp_path}/one", f"file://{tmp_path}/two"
    for url in (one, two):
        assert main(["copy", "--store", str(tmp_path / "a"), "--to", url, "--key",
                     str(keys.private_path), recipe]) == 0
    capsys.readouterr()
    argv = ["challenge", recipe, "--store", str(tmp_path / "a"), "--substituters", one, two,
            "--trusted-keys", str(keys.public_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"root ({root['derivation']}): agree (2 builders)" in out
    assert f"({one}, {two})" in out
    # The local store now disagrees with the caches (as if its build differed).
    meta_path = Path(tmp_path / "a" / "meta" / f"{root['derivation']}.json")
    meta = json.loads(meta_path.read_text())
    meta["hash"] = "f" * 64
    meta_path.write_text(json.dumps(meta))
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert f"root ({root['derivation']}): DIFFER (2 builders)" in out
    assert "\n  ffffffffffffffff" in out


def test_settings_from_the_environment_and_copy_from_a_recipe(
        runners: list[FakeRunner], keys: Keys, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(REPO / "recipes" / "hello.toml")
    assert build(tmp_path / "a") == 0
    root = json.loads(capsys.readouterr().out)[0]
    url = f"file://{tmp_path}/cache"
    assert main(["copy", "--store", str(tmp_path / "a"), "--to", url, "--key",
                 str(keys.private_path), recipe]) == 0
    monkeypatch.setenv("REPROBUILD_SUBSTITUTERS", url)
    monkeypatch.setenv("REPROBUILD_TRUSTED_KEYS", str(keys.public_path))
    capsys.readouterr()
    assert build(tmp_path / "b", "--dry-run") == 0
    assert f"  root {root['derivation']} from {url}" in capsys.readouterr().out
    assert main(["copy", recipe, "--store", str(tmp_path / "c"), "--from", url]) == 0
    copied = {e.derivation_id for e in Store(str(tmp_path / "c")).paths()}
    assert root["derivation"] in copied and len(copied) == 4  # bb, files, rootfs, root
    assert steps_run(runners) == 2
