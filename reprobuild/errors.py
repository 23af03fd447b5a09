"""The error hierarchy: library code raises these, only the CLI prints them."""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable


class ReprobuildError(Exception):
    """Base of every error reprobuild reports to a user.

    ``message`` names the thing that is wrong; ``hint`` says what to do next.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


def suggest(word: str, choices: Iterable[str], what: str, *, cutoff: float = 0.6) -> str:
    """A hint naming the closest valid choice to a misspelt ``word`` and listing them all."""
    options = sorted(choices)
    close = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    listing = ", ".join(options) if options else "(none)"
    if close:
        return f"did you mean {close[0]!r}? valid {what}: {listing}"
    return f"valid {what}: {listing}"


class RecipeError(ReprobuildError):
    """A recipe file is malformed or inconsistent."""


class StoreError(ReprobuildError):
    """The store is unreadable, corrupt or a store operation failed."""


class FetchError(ReprobuildError):
    """A fixed-output source could not be fetched or did not match its hash."""


class BuildError(ReprobuildError):
    """A step failed to build."""

    exit_code = 1


class SandboxError(ReprobuildError):
    """The sandbox could not be set up on this host."""


class ImageError(ReprobuildError):
    """A tree cannot be written in an image format (too big, bad name, hostile input)."""


class VerifyError(ReprobuildError):
    """A verification failed: outputs differ, a signature or hash does not match."""

    exit_code = 1


def disk_full(exc: OSError, where: str | os.PathLike[str], what: str) -> ReprobuildError | None:
    """The error to raise for ``exc`` when it is ENOSPC or EDQUOT (None otherwise).

    ``where`` is a path on the full file system, ``what`` the thing being written. Used
    at the one place that writes a whole output (an image, a store entry), not in every
    writer.
    """
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    shown = os.fspath(where)
    try:
        device = os.path.dirname(os.path.abspath(shown)) or shown
    except (OSError, ValueError):
        device = shown
    return ReprobuildError(f"no space left on the file system holding {device} while writing "
                           f"{what}", hint="free space there or write somewhere larger; "
                           "nothing partial was kept")
