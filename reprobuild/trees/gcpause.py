"""Pausing the cyclic garbage collector while many long-lived objects are made.

Reading a tree of 100,000 files and planning its image make hundreds of thousands of
objects that all live until the image is written; each time allocations pass the
collector's threshold it walks the young ones, and the older generations grow with the
tree, so about a quarter of the time went to collections that free nothing (the tree
model and the writers make no reference cycles). Reference counting still frees what
drops out of use; the collector runs again when the outermost pause ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off for the block (nested blocks: until the outermost ends)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
