"""`check` compares the bytes on disk, not the hashes recorded when they were stored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reprobuild.errors import StoreError
from reprobuild.proof import check
from reprobuild.store.store import Store
from tests.proof.test_check import DRV, SAFE, _recipe, fake_engine


def test_check_refuses_a_stored_output_whose_bytes_changed(tmp_path: Path) -> None:
    recipe, store = _recipe(tmp_path), str(tmp_path / "store")
    engine = fake_engine(lambda env, cwd, umask, inp: b"constant")
    assert check.run_check(recipe, [], store, chosen=SAFE[:1], runner=engine).identical
    same = os.path.join(Store(str(tmp_path / "store")).output_path(DRV), "same")
    os.chmod(same, 0o644)
    Path(same).write_text("SAME\n")  # same size, so only the content differs
    os.chmod(same, 0o444)
    with pytest.raises(StoreError, match="content no longer matches its recorded hash"):
        check.run_check(recipe, [], store, chosen=SAFE[:1], runner=engine)
