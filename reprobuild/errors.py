"""The error hierarchy: library code raises these, only the CLI prints them."""

from __future__ import annotations


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
