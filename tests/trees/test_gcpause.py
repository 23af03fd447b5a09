"""The collector pause: off inside, back as it was after (nested, and on errors)."""

from __future__ import annotations

import gc

import pytest

from reprobuild.trees.gcpause import collector_paused, freeze_after_pauses


def test_paused_inside_and_restored_after() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # only the outermost pause turns it back on
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_freezing_after_pauses_keeps_what_a_pause_made_from_the_collector() -> None:
    assert gc.get_freeze_count() == 0
    with freeze_after_pauses():
        with collector_paused():
            made = [[index] for index in range(1000)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(made)  # frozen, not collected
        assert made[999] == [999]
        with collector_paused():
            pass
    assert gc.get_freeze_count() == 0  # given back when the job ends
    with collector_paused():
        pass
    assert gc.get_freeze_count() == 0  # and pauses no longer freeze


def test_freezing_leaves_someone_elses_frozen_objects_frozen() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with freeze_after_pauses(), collector_paused():
            pass
        assert gc.get_freeze_count() >= frozen > 0
    finally:
        gc.unfreeze()
