"""Pausing the cyclic garbage collector while many long-lived objects are made.

Reading a tree of 100,000 files and planning its image make hundreds of thousands of
objects that all live until the image is written; each time allocations pass the
collector's threshold it walks the young ones, and the older generations grow with the
tree, so about a quarter of the time went to collections that free nothing (the tree
model and the writers make no reference cycles). Reference counting still frees what
drops out of use; the collector runs again when the outermost pause ends.

A process that makes one image and exits (``reprobuild image``) can do better: after
:func:`freeze_after_pauses`, the end of each outermost pause moves everything made so
far out of the collector's sight (``gc.freeze()``), so the tree loaded in one pause is
not walked again by the collections between it and the writer's pause, or after.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_freeze = False


@contextmanager
def freeze_after_pauses() -> Iterator[None]:
    """For a process's one job (``reprobuild image``): inside the block, the end of each
    outermost pause freezes what exists (it stays, reference counting still frees it,
    the cyclic collector no longer walks it). Leaving the block gives the objects back
    to the collector (unless something else had frozen objects before) and ends the
    freezing, so a process that goes on is as it was."""
    global _freeze
    was_frozen, frozen_before = _freeze, gc.get_freeze_count()
    _freeze = True
    try:
        yield
    finally:
        _freeze = was_frozen
        if not was_frozen and not frozen_before:
            gc.unfreeze()


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off for the block (nested blocks: until the outermost ends)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if _freeze:
                gc.freeze()
            gc.enable()
