"""The one small interface between a caller (the engine) and the sandbox.

The caller describes a run as a :class:`SandboxSpec` and hands it to a :class:`Runner`;
the sandbox decides nothing about the caller's world beyond what the spec says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Mount:
    """A host file or directory made visible at ``target`` inside the sandbox."""

    source: str  # absolute host path
    target: str  # absolute path inside the sandbox
    writable: bool = False


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


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended. ``returncode`` is None when it was killed by a signal."""

    returncode: int | None
    signal: int | None = None
    timed_out: bool = False
    duration: float = 0.0
    interrupted: bool = False  # killed because the supervisor got SIGINT/SIGTERM/SIGHUP

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.interrupted


class Runner(Protocol):
    """Runs sandboxed commands; safe to call from any thread of the caller."""

    def run(self, spec: SandboxSpec, *, log_fd: int) -> SandboxResult:
        """Run ``spec`` with stdout and stderr going to ``log_fd``; stdin is /dev/null."""
        ...

    def close(self) -> None:
        """Stop the runner; running sandboxes are killed."""
        ...
