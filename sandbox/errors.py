"""The sandbox's errors. The package never imports reprobuild; the engine translates these."""

from __future__ import annotations


class SandboxError(Exception):
    """A sandbox could not be set up. ``message`` names the thing; ``hint`` what to do."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UserNamespacesUnavailable(SandboxError):
    """This host refuses unprivileged user namespaces; the message says which setting."""
