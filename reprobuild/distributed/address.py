"""Cluster addresses and their TLS files: TLS with client certificates, or refused.

Dask tasks are pickles: whoever reaches the scheduler runs code on every worker. So a
connection uses TLS with the certificates of :mod:`reprobuild.distributed.certs`, and a
plain-TCP address is accepted only on the loopback interface, or with ``insecure``.
``dask://HOST:PORT`` means ``tls://`` when certificates are given, else ``tcp://``.
Nothing here imports Dask (a build that needs no task never loads it).
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from dataclasses import dataclass

from reprobuild.errors import ReprobuildError

ROLES = ("scheduler", "worker", "client")
CA_FILE = "ca.pem"


class ClusterError(ReprobuildError):
    """A cluster address, certificate or connection that cannot be used."""


def cert_files(directory: str, role: str) -> tuple[str, str]:
    """The certificate and key file of ``role`` in a ``cluster-certs`` directory."""
    return os.path.join(directory, f"{role}.pem"), os.path.join(directory, f"{role}.key")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def scheduler_address(text: str, *, tls: bool, insecure: bool) -> str:
    """The Dask address of ``text`` (``dask://``, ``tls://`` or ``tcp://HOST:PORT``)."""
    parts = urllib.parse.urlsplit(text if "://" in text else f"dask://{text}")
    scheme = parts.scheme
    if scheme not in ("dask", "tls", "tcp") or not parts.hostname or parts.path not in ("", "/"):
        raise ClusterError(f"cluster address {text!r} is not dask://HOST:PORT",
                           hint="give the scheduler as dask://HOST:PORT (tls:// or "
                                "tcp:// also work)")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise ClusterError(f"cluster address {text!r} has no port",
                           hint="the Dask scheduler listens on dask://HOST:8786 by default")
    if scheme == "dask":
        scheme = "tls" if tls else "tcp"
    if scheme == "tls" and not tls:
        raise ClusterError(f"{text}: TLS needs the cluster's certificates",
                           hint="give --certs DIR (made by `reprobuild cluster-certs DIR`)")
    if scheme == "tcp" and tls:
        raise ClusterError(f"{text}: certificates given for a plain-TCP address",
                           hint="use dask:// or tls:// with --certs")
    if scheme == "tcp" and not insecure and not is_loopback(parts.hostname):
        raise ClusterError(
            f"refusing a plain-TCP connection to {parts.hostname}: Dask tasks are pickles, "
            "so anyone on the network path could run code on the cluster",
            hint="use TLS (`reprobuild cluster-certs DIR`, then --certs DIR), or give "
                 "--insecure on a network you trust")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class TlsFiles:
    """The CA and one role's certificate and key (checked to exist), for Dask's TLS."""

    role: str
    ca: str
    cert: str
    key: str


def tls_files(directory: str | None, role: str) -> TlsFiles | None:
    """``role``'s files in a ``cluster-certs`` directory (None: no directory given)."""
    if directory is None:
        return None
    ca = os.path.join(directory, CA_FILE)
    cert, key = cert_files(directory, role)
    for path in (ca, cert, key):
        if not os.path.isfile(path):
            raise ClusterError(f"{path} is missing",
                               hint=f"make the certificates with `reprobuild cluster-certs "
                                    f"{directory}`, and copy ca.pem, {role}.pem and "
                                    f"{role}.key to this machine")
    return TlsFiles(role, ca, cert, key)
