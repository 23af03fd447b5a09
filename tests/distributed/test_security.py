"""Cluster addresses, TLS certificates and refusals that need no running cluster."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from reprobuild.distributed.address import ClusterError, scheduler_address
from reprobuild.distributed.certs import make_certs
from reprobuild.distributed.cluster import security
from reprobuild.proof import signing
from tests.conftest import REPO

ROLES = ("scheduler", "worker", "client")


def reprobuild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reprobuild", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_plain_tcp_to_a_non_loopback_address_is_refused(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: refused before any connection is tried.
    for text in ("tcp://192.0.2.7:8786", "dask://192.0.2.7:8786", "dask://builder.example:8786"):
        with pytest.raises(ClusterError, match="refusing a plain-TCP connection"):
            scheduler_address(text, tls=False, insecure=False)
    assert scheduler_address("dask://127.0.0.1:8786", tls=False, insecure=False) \
        == "tcp://127.0.0.1:8786"
    assert scheduler_address("dask://[::1]:8786", tls=False, insecure=False) == "tcp://[::1]:8786"
    assert scheduler_address("dask://192.0.2.7:8786", tls=True, insecure=False) \
        == "tls://192.0.2.7:8786"
    assert scheduler_address("tcp://192.0.2.7:8786", tls=False, insecure=True) \
        == "tcp://192.0.2.7:8786"
    with pytest.raises(ClusterError, match="no port"):
        scheduler_address("dask://127.0.0.1", tls=False, insecure=False)
    with pytest.raises(ClusterError, match="needs the cluster's certificates"):
        scheduler_address("tls://127.0.0.1:8786", tls=False, insecure=False)


def test_build_and_worker_refuse_plain_tcp_to_another_host(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[sources.bb]\nhost = "/bin/busybox"\n[steps.s]\ninputs = ["bb"]\n'
                      'builder = ["bb", "sh", "-c", "echo > $out"]\n')
    key, public = signing.generate_key(tmp_path / "k.key")
    build = reprobuild("build", "--store", str(tmp_path / "store"), "--executor",
                       "tcp://192.0.2.7:8786", "--cache", f"file://{tmp_path}/cache",
                       f"--trusted-keys={public}", str(recipe))
    assert build.returncode == 2
    assert "refusing a plain-TCP connection to 192.0.2.7" in build.stderr
    assert "--insecure" in build.stderr
    worker = reprobuild("worker", "--store", str(tmp_path / "ws"), "--scheduler",
                        "dask://192.0.2.7:8786", "--cache", f"file://{tmp_path}/cache",
                        "--key", str(key))
    assert worker.returncode == 2
    assert "refusing a plain-TCP connection to 192.0.2.7" in worker.stderr


def test_cluster_certs_make_a_ca_and_a_certificate_per_role(tmp_path: Path) -> None:
    result = reprobuild("cluster-certs", str(tmp_path / "certs"), "--host", "build1.lan")
    assert result.returncode == 0, result.stderr
    certs = tmp_path / "certs"
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    for role in ROLES:
        cert = x509.load_pem_x509_certificate((certs / f"{role}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "build1.lan" in names.get_values_for_type(x509.DNSName)
        assert os.stat(certs / f"{role}.key").st_mode & 0o077 == 0
        # The key matches the certificate: Python's TLS loads them as a pair.
        ssl.create_default_context().load_cert_chain(certs / f"{role}.pem",
                                                     certs / f"{role}.key")
        assert security(str(certs), role) is not None
    assert os.stat(certs / "ca.key").st_mode & 0o077 == 0
    again = reprobuild("cluster-certs", str(certs))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_missing_certificate_names_the_file_and_the_command(tmp_path: Path) -> None:
    make_certs(str(tmp_path / "certs"))
    (tmp_path / "certs" / "client.key").unlink()
    with pytest.raises(ClusterError, match=r"client\.key is missing") as caught:
        security(str(tmp_path / "certs"), "client")
    assert "cluster-certs" in str(caught.value.hint)


def test_the_executor_may_come_from_the_config_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[sources.bb]\nhost = "/bin/busybox"\n[steps.s]\ninputs = ["bb"]\n'
                      'builder = ["bb", "sh", "-c", "echo > $out"]\n')
    _key, public = signing.generate_key(tmp_path / "k.key")
    config = tmp_path / "config" / "reprobuild"
    config.mkdir(parents=True)
    (config / "config.toml").write_text(
        'executor = "dask://192.0.2.7:8786"\ncache = "file:///nowhere"\n'
        f'trusted-keys = ["{public}"]\n')
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    argv = [sys.executable, "-m", "reprobuild", "build", "--store", str(tmp_path / "store"),
            "--no-out-link", str(recipe)]
    remote = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env)
    assert remote.returncode == 2
    assert "refusing a plain-TCP connection to 192.0.2.7" in remote.stderr
    (config / "config.toml").write_text('certs = "certs"\n')
    local = subprocess.run([*argv, "--executor", "local", "-n"], capture_output=True,
                           text=True, cwd=REPO, env=env)
    assert local.returncode == 0, local.stderr
