"""Why this host refuses unprivileged user namespaces, and how to allow them.

The sandbox never falls back to running a command unsandboxed: when a user namespace
cannot be made, :func:`diagnose` names the setting responsible and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sandbox.errors import UserNamespacesUnavailable


@dataclass(frozen=True)
class HostFacts:
    """What the diagnosis looks at; read from /proc by :func:`read_facts`."""

    unprivileged_userns_clone: int | None  # Debian/Ubuntu kernels before 6.x
    max_user_namespaces: int | None
    apparmor_restrict: int | None  # Ubuntu 23.10+
    seccomp_mode: int | None  # of this process: 2 = a seccomp filter is installed
    in_container: bool


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or b"0")
    except (OSError, ValueError):
        return None


def read_facts(proc: str = "/proc", root: str = "/") -> HostFacts:
    seccomp = None
    try:
        with open(os.path.join(proc, "self/status"), "rb") as f:
            for line in f:
                if line.startswith(b"Seccomp:"):
                    seccomp = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    container = any(os.path.exists(os.path.join(root, p))
                    for p in (".dockerenv", "run/.containerenv"))
    try:
        with open(os.path.join(proc, "1/environ"), "rb") as f:
            container = container or b"container=" in f.read()
    except OSError:
        pass
    return HostFacts(
        unprivileged_userns_clone=_read_int(
            os.path.join(proc, "sys/kernel/unprivileged_userns_clone")),
        max_user_namespaces=_read_int(os.path.join(proc, "sys/user/max_user_namespaces")),
        apparmor_restrict=_read_int(
            os.path.join(proc, "sys/kernel/apparmor_restrict_unprivileged_userns")),
        seccomp_mode=seccomp,
        in_container=container,
    )


def diagnose(error: OSError | None, facts: HostFacts) -> UserNamespacesUnavailable:
    """The error to raise when making a user namespace failed with ``error``."""
    what = f" ({error.strerror})" if error is not None and error.strerror else ""
    persist = "; to keep it after a reboot put the setting in /etc/sysctl.d/99-userns.conf"
    if facts.unprivileged_userns_clone == 0:
        return UserNamespacesUnavailable(
            "unprivileged user namespaces are disabled: kernel.unprivileged_userns_clone=0"
            + what,
            hint="as root run `sysctl -w kernel.unprivileged_userns_clone=1`" + persist)
    if facts.max_user_namespaces == 0:
        return UserNamespacesUnavailable(
            "unprivileged user namespaces are disabled: user.max_user_namespaces=0" + what,
            hint="as root run `sysctl -w user.max_user_namespaces=15000`" + persist)
    if facts.apparmor_restrict == 1:
        return UserNamespacesUnavailable(
            "AppArmor restricts unprivileged user namespaces: "
            "kernel.apparmor_restrict_unprivileged_userns=1" + what,
            hint="as root run `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`"
                 + persist + ", or give the Python interpreter an AppArmor profile "
                 "with the `userns,` rule")
    if facts.in_container or facts.seccomp_mode == 2:
        return UserNamespacesUnavailable(
            "the container (or a seccomp filter) this runs in refuses to create user "
            "namespaces" + what,
            hint="run the container with user namespaces allowed (Docker/Podman: "
                 "`--security-opt seccomp=unconfined --security-opt apparmor=unconfined`, "
                 "or systemd-nspawn with --private-users), or build outside the container")
    return UserNamespacesUnavailable(
        "this kernel refused to create an unprivileged user namespace" + what,
        hint="the kernel needs CONFIG_USER_NS; check `unshare --user --map-root-user true` "
             "as this user and your distribution's user namespace settings")
