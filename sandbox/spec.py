"""The one small interface between a caller (the engine) and the sandbox.

The caller describes a run as a :class:`SandboxSpec` and hands it to a :class:`Runner`;
the sandbox decides nothing about the caller's world beyond what the spec says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Mount:
    """A host file or directory made visible at ``target`` inside the sandbox."""

    source: str  # absolute host path
    target: str  # absolute path inside the sandbox
    writable: bool = False


@dataclass(frozen=True)
class Limits:
    """What one run may use; None leaves a resource unbounded (as the host allows).

    ``memory`` bounds the run's memory: through a cgroup v2 ``memory.max`` (swap 0) when
    the caller has a delegated cgroup subtree, else ``RLIMIT_DATA`` for each process plus
    the server's watcher, which sums the private resident memory of the run's processes.
    ``pids`` bounds its processes and threads (``pids.max``, else ``RLIMIT_NPROC``, which
    the kernel counts per user namespace, so per run). ``tmp`` and ``shm`` are the sizes
    of the tmpfs ``/tmp`` (and ``/build`` when not mounted) and ``/dev/shm``. ``disk``
    bounds what the writable mounts hold together (the watcher measures their allocated
    blocks) and, through ``RLIMIT_FSIZE``, the size of any one file. ``log`` bounds the
    output kept: its first and last halves, with a line saying how much was dropped.
    """

    memory: int | None = None
    pids: int | None = None
    tmp: int | None = None
    shm: int | None = None
    disk: int | None = None
    log: int | None = None

    def bounded(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a sandboxed run sees. Nothing of the host is visible unless listed.

    ``env`` holds the caller's variables; the sandbox adds the fixed ones and they win:
    HOME=/homeless-shelter (does not exist), TMPDIR=/tmp, TZ=UTC, LANG=C.UTF-8,
    SOURCE_DATE_EPOCH=``epoch``, BUILD_CORES=``cores``; PATH is /path-not-set unless
    given. The command runs as uid 1000 (``build``), gid 100 (``users``) in ``cwd``.
    Read-only mounts may be files or directories; writable ones are bound as they are
    (a root caller's are chowned to 65534, the uid its sandboxes run as). /build and /tmp
    are fresh tmpfs unless mounted; everything else is read-only. ``extra`` is reserved:
    a non-empty one is refused.
    """

    argv: tuple[str, ...]
    mounts: tuple[Mount, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "/build"
    epoch: int = 0
    cores: int = 1
    timeout: float | None = None  # seconds; the whole pid namespace dies when it passes
    interactive: bool = False  # inherit the caller's terminal (for `reprobuild shell`)
    debug: bool = False  # describe every namespace and mount operation on the log
    extra: tuple[tuple[str, str], ...] = field(default=())
    # Writable directories go through an overlay so that /proc/self/mountinfo does not
    # name their host path (read-only inputs always do). Costs about 2 ms an overlay;
    # sibling directories (the engine's /build and /output) share one overlay of their
    # parent. With False they are plain bind mounts and their host path is visible inside.
    hide_writable_paths: bool = True
    limits: Limits = field(default=Limits())


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended. ``returncode`` is None when it was killed by a signal."""

    returncode: int | None
    signal: int | None = None
    timed_out: bool = False
    duration: float = 0.0
    interrupted: bool = False  # killed because the supervisor got SIGINT/SIGTERM/SIGHUP
    limit: str | None = None  # the field of Limits the run passed (it was killed for it)
    log_dropped: int = 0  # bytes of output dropped between the log's head and tail
    mechanism: str = ""  # how memory and pids were bounded: "cgroup v2" or "rlimits"

    @property
    def ok(self) -> bool:
        return (self.returncode == 0 and not self.timed_out and not self.interrupted
                and self.limit is None)


class Runner(Protocol):
    """Runs sandboxed commands; safe to call from any thread of the caller."""

    def run(self, spec: SandboxSpec, *, log_fd: int) -> SandboxResult:
        """Run ``spec`` with stdout and stderr going to ``log_fd``; stdin is /dev/null."""
        ...

    def close(self) -> None:
        """Stop the runner; running sandboxes are killed."""
        ...
