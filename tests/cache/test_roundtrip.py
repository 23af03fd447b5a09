"""Copy entries to a cache and substitute them into an empty store, on every backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reprobuild.cache import layout
from reprobuild.cache.backend import Cache, open_cache
from reprobuild.cache.substitute import substitute
from reprobuild.cache.upload import upload
from reprobuild.store import canon
from reprobuild.store.store import Store
from tests.cache.conftest import Built, Keys


@pytest.fixture(params=["file", "nginx", "s3"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Cache:
    if request.param == "file":
        url = f"file://{tmp_path}/cache"
    else:
        url = request.getfixturevalue(f"{request.param}_url")
    opened = open_cache(url)
    yield opened
    opened.close()


def test_copy_then_substitute_gives_the_same_entries(built: Built, keys: Keys, cache: Cache,
                                                     tmp_path: Path) -> None:
    ids = sorted(built.ids.values())
    first = upload(built.store, cache, ids, keys.private, jobs=3)
    assert (first.uploaded, first.skipped, first.failures) == (ids, [], [])
    again = upload(built.store, cache, ids, keys.private, jobs=3)
    assert (again.uploaded, again.skipped, again.bytes_sent) == ([], ids, 0)
    assert layout.read_cache_info(cache) == layout.CacheInfo()
    assert cache.list("meta") == sorted(f"{i}.json" for i in ids)
    assert len(cache.list("objects")) == 3
    assert cache.exists(layout.log_name(built.ids["tree"]))
    assert cache.exists(layout.record_name(built.ids["tree"]))

    other = Store(str(tmp_path / "store-b"))
    for derivation_id in ids:
        entry = substitute(other, cache, derivation_id, keys.trusted)
        assert entry is not None
        original = built.store.lookup(derivation_id)
        assert original is not None
        assert (entry.hash, entry.type, entry.fsverity) == \
            (original.hash, original.type, original.fsverity)
        assert canon.hash_path(entry.path) == original.hash
        assert os.lstat(entry.path).st_mtime_ns == os.lstat(original.path).st_mtime_ns
        meta = other.metadata(derivation_id)
        assert meta is not None
        assert meta["substituted"]["cache"] == cache.url
        assert meta["inputs"] == built.store.metadata(derivation_id)["inputs"]  # type: ignore[index]
        with open(other.record_path(derivation_id), "rb") as mine, \
                open(built.store.record_path(derivation_id), "rb") as theirs:
            assert mine.read() == theirs.read()
    for derivation_id in ids:
        with open(other.log_path(derivation_id), "rb") as log, \
                open(built.store.log_path(derivation_id), "rb") as original_log:
            assert log.read() == original_log.read() != b""
    assert other.verify() == []
    tree = other.output_path(built.ids["tree"])
    assert os.readlink(os.path.join(tree, "absolute")) == "/usr/bin/tool"
    assert os.stat(os.path.join(tree, "data")).st_nlink == 2
    assert os.listdir(os.path.join(other.root, "tmp")) == []


def test_missing_entry_is_none(built: Built, keys: Keys, tmp_path: Path) -> None:
    cache = open_cache(f"file://{tmp_path}/empty")
    assert substitute(Store(str(tmp_path / "b")), cache, built.ids["tree"], keys.trusted) is None
