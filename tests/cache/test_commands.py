"""reprobuild copy --to/--from and reprobuild cache verify, through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reprobuild.cache import layout
from reprobuild.cache.settings import ENV_TRUSTED_KEYS, CacheSettings, resolve
from reprobuild.cli import main
from reprobuild.store.store import Store
from tests.cache.conftest import Built, Keys


def copy_to(built: Built, keys: Keys, url: str, *what: str) -> int:
    return main(["copy", "--store", built.store.root, "--to", url, "--key",
                 str(keys.private_path), *what])


def test_copy_to_uploads_the_closure_and_skips_what_is_there(
        built: Built, keys: Keys, nginx_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    image = built.ids["image"]
    assert copy_to(built, keys, nginx_url, image) == 0
    www = tmp_path / "nginx" / "www"
    assert sorted(os.listdir(www / "meta")) == sorted(
        f"{i}.json" for i in (image, built.ids["tree"]))
    assert sorted(os.listdir(www / "logs")) == sorted(
        f"{i}.log" for i in (image, built.ids["tree"]))
    assert "copied 2 to" in capsys.readouterr().err
    assert copy_to(built, keys, nginx_url, image, built.ids["link"], "--no-inputs") == 0
    assert f"copied 1 to {nginx_url}, 1 already there" in capsys.readouterr().err


def test_copy_from_fills_an_empty_store(built: Built, keys: Keys, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"file://{tmp_path}/cache"
    assert copy_to(built, keys, url, built.ids["image"]) == 0
    other = tmp_path / "store-b"
    assert main(["copy", built.ids["image"], "--store", str(other), "--from", url,
                 "--trusted-keys", str(keys.public_path)]) == 0
    store = Store(str(other))
    assert [e.derivation_id for e in store.paths()] == sorted(
        (built.ids["image"], built.ids["tree"]))
    assert "copied 2 from" in capsys.readouterr().err


def test_copy_from_without_trusted_keys_is_a_usage_error(
        built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(ENV_TRUSTED_KEYS, raising=False)
    assert main(["copy", "--store", str(tmp_path / "b"), "--from", f"file://{tmp_path}/c",
                 built.ids["tree"]]) == 2
    assert "copy --from needs trusted keys" in capsys.readouterr().err


def test_copy_from_with_the_wrong_key_warns_and_fails(
        built: Built, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"file://{tmp_path}/cache"
    assert copy_to(built, keys, url, built.ids["link"]) == 0
    main(["sign", "--generate-key", str(tmp_path / "other.key")])
    assert main(["copy", built.ids["link"], "--store", str(tmp_path / "b"), "--from", url,
                 "--trusted-keys", str(tmp_path / "other.key.pub")]) == 2
    err = capsys.readouterr().err
    assert f"warning: cache {url}: cannot substitute {built.ids['link']}: metadata is " \
           "signed by no trusted key" in err
    assert f"{url} could not provide: {built.ids['link']}" in err
    assert Store(str(tmp_path / "b")).paths() == []


def test_cache_verify_reports_a_rotten_object(built: Built, keys: Keys, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    url = f"file://{tmp_path}/cache"
    assert copy_to(built, keys, url, *built.ids.values()) == 0
    assert main(["cache", "verify", url, "--trusted-keys", str(keys.public_path)]) == 0
    assert "3 objects, 3 entries checked; 0 problems" in capsys.readouterr().err
    objects = sorted((tmp_path / "cache" / "objects").iterdir())
    data = bytearray(objects[0].read_bytes())
    data[len(data) // 2] ^= 1
    objects[0].write_bytes(bytes(data))
    (tmp_path / "cache" / layout.object_name(objects[1].name[:64])).unlink()
    assert main(["cache", "verify", url]) == 1
    err = capsys.readouterr().err
    assert f"{url}/objects/{objects[0].name}: rotten: its bytes hash to blake3 " in err
    assert f"its object objects/{objects[1].name} is missing" in err
    assert "2 objects, 3 entries checked; 2 problems" in err


def test_settings_precedence(tmp_path: Path) -> None:
    config = tmp_path / "reprobuild" / "config.toml"
    config.parent.mkdir()
    config.write_text('substituters = ["file:///a"]\ntrusted-keys = ["k.pub"]\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert resolve(None, None, env) == CacheSettings(("file:///a",),
                                                     (str(tmp_path / "reprobuild/k.pub"),))
    env["REPROBUILD_SUBSTITUTERS"] = "http://b http://c"
    assert resolve(None, None, env).substituters == ("http://b", "http://c")
    assert resolve(["s3://d"], ["x.pub"], env) == CacheSettings(("s3://d",), ("x.pub",))
    config.write_text('substitutes = ["file:///a"]\n')
    with pytest.raises(Exception, match="unknown setting 'substitutes'"):
        resolve(None, None, env)
