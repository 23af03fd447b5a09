"""``reprobuild cluster-certs``: a cluster's own CA, and a certificate for each role.

The CA signs one certificate each for the scheduler, the workers and the clients (ECDSA
P-256). Dask checks that the peer's certificate is signed by the CA, not its host name,
so one worker certificate serves every worker. Keys are written 0600; the CA's key is
only needed to make more certificates and should stay off the cluster.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reprobuild.distributed.address import CA_FILE, ROLES, ClusterError, cert_files

VALID_DAYS = 825


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "reprobuild cluster"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: str, cert: x509.Certificate) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", *hosts]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certs(directory: str, *, hosts: Sequence[str] = (),
               now: datetime.datetime | None = None) -> list[str]:
    """Write ``ca.pem``/``ca.key`` and ``ROLE.pem``/``ROLE.key`` for each role into
    ``directory`` (created; existing files are never overwritten). The files written."""
    os.makedirs(directory, exist_ok=True)
    wanted = [os.path.join(directory, CA_FILE), os.path.join(directory, "ca.key")]
    wanted += [p for role in ROLES for p in cert_files(directory, role)]
    present = [p for p in wanted if os.path.lexists(p)]
    if present:
        raise ClusterError(f"{present[0]} already exists",
                           hint="give an empty directory; existing certificates are "
                                "never replaced")
    start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(hours=1)
    end = start + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("reprobuild cluster CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write_key(wanted[1], ca_key)
    _write_cert(wanted[0], ca)
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(f"reprobuild {role}"))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                               critical=True)
                .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = cert_files(directory, role)
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
    return wanted
