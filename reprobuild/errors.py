"""The error hierarchy: library code raises these, only the CLI prints them."""

from __future__ import annotations

import errno
import importlib
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


SUGGEST_LISTED = 30
"""How many valid choices a hint lists (a recipe may have thousands of steps)."""


def close_matches(word: str, options: list[str], *, cutoff: float = 0.6) -> list[str]:
    """The option closest to ``word`` (a list of at most one), as difflib finds it.
    difflib is loaded on the first misspelling, not by every command's start."""
    difflib = importlib.import_module("difflib")
    close: list[str] = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    return close


def suggest(word: str, choices: Iterable[str], what: str, *, cutoff: float = 0.6) -> str:
    """A hint naming the closest valid choice to a misspelt ``word`` and listing them all."""
    options = sorted(choices)
    close = close_matches(word, options, cutoff=cutoff)
    listing = ", ".join(options[:SUGGEST_LISTED]) if options else "(none)"
    if len(options) > SUGGEST_LISTED:
        listing += f", … ({len(options) - SUGGEST_LISTED} more)"
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


class ImageTooSmall(ImageError):
    """The size asked for cannot hold the tree; ``minimum`` bytes can.

    The hint names the ``image`` command's ``--size``; a recipe's image step names its
    ``[images.NAME] size`` key instead (see :meth:`for_image`)."""

    def __init__(self, message: str, *, minimum: int) -> None:
        self.minimum = minimum
        super().__init__(message, hint=f"give --size {minimum} or more, or leave it out "
                                       "for the smallest image")

    def for_image(self, name: str) -> ImageTooSmall:
        """This error with its hint naming the recipe key ``[images.NAME] size``."""
        self.hint = (f"set size = {self.minimum} or more in [images.{name}], or remove "
                     "size for the smallest image")
        return self


class VerifyError(ReprobuildError):
    """A verification failed: outputs differ, a signature or hash does not match."""

    exit_code = 1



class BootTestError(ReprobuildError):
    """A boot test cannot run: no QEMU or firmware, a test naming what is not there."""


class DiskFullError(ReprobuildError):
    """A file system ran out of space (or quota) while reprobuild wrote to it."""


EXIT_DISK_FULL = 28  # a built-in image step's status for DiskFullError (ENOSPC's number)
NEARLY_FULL = 1 << 20  # bytes free below which a failed write is put down to a full disk


def mount_point(path: str | os.PathLike[str]) -> str:
    """The mount point of the file system holding ``path`` (or its nearest parent)."""
    current = os.path.abspath(os.fspath(path))
    while not os.path.exists(current):
        current = os.path.dirname(current)
    while current != os.path.dirname(current) and not os.path.ismount(current):
        current = os.path.dirname(current)
    return current


def disk_full(exc: OSError, where: str | os.PathLike[str], what: str) -> DiskFullError | None:
    """The error to raise for ``exc`` when it is ENOSPC or EDQUOT (None otherwise).

    ``where`` is a path on the full file system, ``what`` the thing being written. Used
    where a whole output is written (an image, a store entry), not in every writer.
    """
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return no_space(where, what, exc.strerror or "")


def no_space(where: str | os.PathLike[str], what: str, detail: str = "") -> DiskFullError:
    """"no space left on DEVICE while writing WHAT", naming the file system's mount point."""
    return DiskFullError(f"no space left on {mount_point(where)} while writing {what}"
                         + (f" ({detail})" if detail else ""),
                         hint="free space there (reprobuild gc) or use a larger file system; "
                         "nothing partial was kept")


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
