"""The check before use: cheap for what did not change, a rehash of only what did."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reprobuild.store import canon, trust
from tests.store.test_verify import INPUT, populated


def test_only_changed_files_are_rehashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    store = populated(tmp_path)
    hashed: list[bytes] = []
    full: list[object] = []
    file_blake3 = trust._file_blake3
    hash_path = canon.hash_path

    def count_file(path: bytes) -> str:
        hashed.append(path)
        return file_blake3(path)

    def count_full(path: str | bytes) -> str:
        full.append(path)
        return hash_path(path)

    monkeypatch.setattr(trust, "_file_blake3", count_file)
    monkeypatch.setattr(canon, "hash_path", count_full)
    assert store.damage(INPUT) is None
    assert hashed == [] and full == []  # nothing changed: stat calls only
    conf = os.path.join(store.output_path(INPUT), "etc", "conf")
    os.chmod(conf, 0o444)  # same mode, new ctime
    assert store.damage(INPUT) is None
    assert hashed == [os.fsencode(conf)] and full == []
    hashed.clear()
    assert store.damage(INPUT) is None
    assert hashed == []  # the stats were refreshed
