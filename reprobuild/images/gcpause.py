"""Pause Python's cyclic garbage collector while a writer plans and writes.

A writer allocates a few values per entry (plan records, headers) while the tree's own
100,000 entries are alive; every full collection then walks all of them again, which
measured a fifth of an EROFS write of the 100,000-file tree (0.47 s of CPU with the
collector, 0.36 s without). The values writers make hold no reference cycles that
need collecting during the write; the collector's state is restored afterwards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic collector off (reference counting still frees)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
