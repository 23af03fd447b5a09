"""The resource limits of steps and image steps: recipe keys, defaults, failure messages.

Every sandboxed node runs with :data:`DEFAULTS` (sized for a 2-core, 24 GiB builder) unless
its recipe table raises them: ``[steps.NAME.limits]`` or ``[images.NAME.limits]`` with
``memory``, ``tmp``, ``shm``, ``disk`` (what ``/build`` and ``$out`` hold together) and
``log`` as sizes ("8G") and ``pids`` as a count. Image steps also take ``timeout`` (default
:data:`IMAGE_TIMEOUT`). Limits never enter a derivation id: they do not change what a
correct build makes, only whether a runaway one is stopped, so raising one rebuilds nothing.
"""

from __future__ import annotations

import dataclasses
import re
import signal
from dataclasses import fields
from typing import Any

from reprobuild.errors import RecipeError
from reprobuild.units import parse_size
from sandbox.limits import human
from sandbox.spec import Limits, SandboxResult

LIMIT_KEYS = ("memory", "pids", "tmp", "shm", "disk", "log")
MAX_PIDS = 1 << 22  # the kernel's largest pid_max

DEFAULTS = Limits(memory=4 << 30, pids=1024, tmp=1 << 30, shm=256 << 20, disk=16 << 30,
                  log=64 << 20)
IMAGE_TIMEOUT = 3600.0  # seconds; an image step's wall time unless its recipe says

WHAT = {
    "memory": "its memory",
    "pids": "its number of processes and threads",
    "tmp": "the size of /tmp",
    "shm": "the size of /dev/shm",
    "disk": "what /build and $out hold",
    "log": "its log",
}


def effective(asked: Limits) -> Limits:
    """The defaults, with what a recipe table asked for (its None fields) filled in."""
    return Limits(**{f.name: getattr(asked, f.name) if getattr(asked, f.name) is not None
                     else getattr(DEFAULTS, f.name) for f in fields(Limits)})


def image_limits(limits: Limits, size: int | None) -> Limits:
    """An image step's limits: ``disk`` is at least the image's size and a spool's room.

    ``disk`` also bounds any one file (``RLIMIT_FSIZE``), and a sized image is one file
    of that size however sparse: our own writer makes it, so its size is the bound.
    """
    bounded = effective(limits)
    if size is not None and bounded.disk is not None and bounded.disk < size + (1 << 30):
        bounded = dataclasses.replace(bounded, disk=size + (1 << 30))
    return bounded


def table_limits(table: dict[str, Any], path: str, where: str) -> Limits:
    """The ``limits`` of a recipe's step or image table; a RecipeError names the key."""
    if "limits" not in table:
        return Limits()
    try:
        return parse_limits(table["limits"], f"[{where}.limits]")
    except LimitError as exc:
        key = "limits" + (f".{exc.key}" if exc.key else "")
        raise RecipeError(f"{path}: [{where}] {key}: {exc}",
                          hint=f"limits are {', '.join(LIMIT_KEYS)}") from None


def parse_limits(raw: Any, where: str) -> Limits:
    """A ``limits`` table; :class:`LimitError` names the key that is wrong."""
    if not isinstance(raw, dict):
        raise LimitError("", f"must be a table with keys {', '.join(LIMIT_KEYS)}")
    values: dict[str, int] = {}
    for key, value in raw.items():
        if key not in LIMIT_KEYS:
            raise LimitError(key, f"unknown limit {key!r} in {where}")
        if key == "pids":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_PIDS:
                raise LimitError(key, f"must be a whole number of processes from 1 to "
                                      f"{MAX_PIDS}, not {value!r}")
            values[key] = value
            continue
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise LimitError(key, str(exc)) from None
        if size is None:
            raise LimitError(key, "must be a size like \"8G\" (\"min\" is for images)")
        values[key] = size
    return Limits(**values)


class LimitError(ValueError):
    """A wrong ``limits`` table; ``key`` is the limit at fault ("" for the table)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def table_of(kind: str, name: str) -> str:
    return f"[{'steps' if kind == 'step' else 'images'}.{name}.limits]"


def raise_hint(kind: str, name: str, key: str, limits: Limits) -> str:
    """How to raise one limit, with a value twice the one in force."""
    current = getattr(limits, key)
    if key == "pids":
        suggested = str(2 * current) if current else "2048"
    else:
        suggested = f'"{_size_text(2 * current)}"' if current else '"8G"'
    return f"raise it in the recipe: {table_of(kind, name)} {key} = {suggested}"


def _size_text(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


# What a process that ran out of a limit the kernel enforces (rlimits, tmpfs sizes)
# prints, by the limit; the engine names the likely limit when a step failed with these.
SYMPTOMS = (
    ("pids", re.compile(r"can't fork|fork: retry|Resource temporarily unavailable|"
                        r"Cannot fork|fork failed", re.IGNORECASE)),
    ("memory", re.compile(r"out of memory|Cannot allocate memory|MemoryError|"
                          r"std::bad_alloc|virtual memory exhausted", re.IGNORECASE)),
    ("tmp", re.compile(r"/tmp\S*: No space left on device|No space left on device.*/tmp")),
    ("shm", re.compile(r"/dev/shm\S*: No space left on device")),
)


def failure_note(result: SandboxResult, kind: str, name: str, limits: Limits,
                 log_tail: list[str]) -> tuple[str, str | None]:
    """What to add to a failed run's message (naming a limit) and the hint to raise it."""
    note = ""
    key = result.limit
    file_too_large = (result.signal == signal.SIGXFSZ
                      or any("File too large" in line for line in log_tail))
    if file_too_large and key in (None, "disk"):
        # The kernel refused a file past the size limit: the more precise of the two
        # verdicts, also when the watcher's next scan saw that file push the total over
        # before the process could exit.
        key = "disk"
        note = (f"; a file passed the size limit disk = {human(limits.disk)}"
                if limits.disk is not None else "")
    elif key is not None:
        value = getattr(limits, key)
        shown = str(value) if key == "pids" else human(value)
        note = f"; stopped: {WHAT[key]} passed its limit {key} = {shown}"
    else:
        text = "\n".join(log_tail)
        key = next((k for k, pattern in SYMPTOMS if pattern.search(text)), None)
        if key is not None and getattr(limits, key) is not None:
            value = getattr(limits, key)
            shown = str(value) if key == "pids" else human(value)
            note = f"; it seems to have run out of {key} (limit {key} = {shown})"
        else:
            key = None
    if result.log_dropped and limits.log is not None:
        note += (f"; its log passed the limit log = {human(limits.log)}: "
                 f"{result.log_dropped} bytes were dropped from the middle")
        if key is None:
            key = "log"
    return note, raise_hint(kind, name, key, limits) if key is not None else None
