"""The error hierarchy: library code raises these, only the CLI prints them."""

from __future__ import annotations

import difflib
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


def suggest(word: str, choices: Iterable[str], what: str, *, cutoff: float = 0.6) -> str:
    """A hint naming the closest valid choice to a misspelt ``word`` and listing them all."""
    options = sorted(choices)
    close = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
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
