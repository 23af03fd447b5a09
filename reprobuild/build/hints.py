"""Hints for people: the command to run next, and what a failed step's log suggests.

A suggested command repeats the ``--store`` the user gave (a hint that drops it names
another store, where the log or the package is not). A failed step's last log lines are
matched against messages that mean the step wanted the network, which no step has.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

# Messages (resolver, curl, wget, apt, pip, git, ping) that a step without network prints.
NETWORK_MESSAGES = (
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Could not resolve host",
    "Name or service not known",
    "No address associated with hostname",
    "unable to resolve host address",
    "Could not resolve hostname",
)

NETWORK_HINT = ("steps have no network: declare what the step downloads as a source "
                "(deb = with version and sha256, or path = / oci = for files fetched "
                "beforehand) and use it as an input")


def command(subcommand: str, *args: str, store: str | None = None) -> str:
    """``reprobuild SUBCOMMAND [--store STORE] ARGS...``, quoted for a POSIX shell."""
    words = ["reprobuild", subcommand, *(["--store", store] if store else []), *args]
    return shlex.join(words)


def failure_hint(log_tail: Iterable[str]) -> str | None:
    """What the last lines of a failed step's log suggest, if they name a known cause."""
    for line in log_tail:
        if any(message.lower() in line.lower() for message in NETWORK_MESSAGES):
            return NETWORK_HINT
    return None
