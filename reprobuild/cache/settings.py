"""Where substituters and trusted keys come from: the command line, the environment, a file.

The first of these that names them wins, as a whole (lists are not merged):

1. ``--substituters URL…`` / ``--trusted-keys FILE…`` on the command line;
2. ``REPROBUILD_SUBSTITUTERS`` / ``REPROBUILD_TRUSTED_KEYS`` (space-separated);
3. ``$XDG_CONFIG_HOME/reprobuild/config.toml`` (default ``~/.config``)::

       substituters = ["http://cache.local:8080/reprobuild", "file:///srv/cache"]
       trusted-keys = ["ci.pub"]      # relative to the config file's directory
       executor = "dask://sched.local:8786"   # build's --executor, --cache, --certs
       cache = "s3://builds/reprobuild?endpoint=http://minio.local:9000"
       certs = "cluster-certs"        # relative to the config file's directory

A trusted key is a PEM public key file (or a private key, whose public half is used), or
a directory whose ``*.pub`` files are all trusted.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reprobuild.errors import ReprobuildError
from reprobuild.proof import signing

ENV_SUBSTITUTERS = "REPROBUILD_SUBSTITUTERS"
ENV_TRUSTED_KEYS = "REPROBUILD_TRUSTED_KEYS"


KNOWN = ("substituters", "trusted-keys", "executor", "cache", "certs")


class SettingsError(ReprobuildError):
    """The configuration file or a trusted key cannot be used."""


@dataclass(frozen=True)
class CacheSettings:
    substituters: tuple[str, ...] = ()
    trusted_keys: tuple[str, ...] = ()


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "reprobuild" / "config.toml"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None


def _strings(config: Mapping[str, Any], key: str, path: Path) -> tuple[str, ...] | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SettingsError(f"{path}: {key} must be a list of strings")
    return tuple(value)


def resolve(substituters: Sequence[str] | None, trusted_keys: Sequence[str] | None,
            environ: Mapping[str, str] | None = None) -> CacheSettings:
    """The settings in force given the command line's values (None: not given)."""
    env = os.environ if environ is None else environ
    path = config_path(env)
    config = _read_config(path)
    unknown = sorted(set(config) - set(KNOWN))
    if unknown:
        raise SettingsError(f"{path}: unknown setting {unknown[0]!r}",
                            hint=f"known settings: {', '.join(KNOWN)}")
    urls: Sequence[str] | None = substituters
    if urls is None and ENV_SUBSTITUTERS in env:
        urls = env[ENV_SUBSTITUTERS].split()
    if urls is None:
        urls = _strings(config, "substituters", path) or ()
    keys: Sequence[str] | None = trusted_keys
    if keys is None and ENV_TRUSTED_KEYS in env:
        keys = env[ENV_TRUSTED_KEYS].split()
    if keys is None:
        keys = tuple(str(path.parent / k)
                     for k in _strings(config, "trusted-keys", path) or ())
    return CacheSettings(tuple(urls), tuple(keys))


@dataclass(frozen=True)
class ExecutorSettings:
    """Where ``build`` runs steps: ``executor`` (None: here), ``cache`` and ``certs``."""

    executor: str | None = None
    cache: str | None = None
    certs: str | None = None


def executor_settings(executor: str | None, cache: str | None, certs: str | None,
                      environ: Mapping[str, str] | None = None) -> ExecutorSettings:
    """The command line's ``--executor``, ``--cache``, ``--certs``, each else the config
    file's ``executor``, ``cache``, ``certs`` (a path relative to the file)."""
    path = config_path(os.environ if environ is None else environ)
    config = _read_config(path)
    found: dict[str, str | None] = {}
    for key in ("executor", "cache", "certs"):
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            raise SettingsError(f"{path}: {key} must be a string")
        found[key] = value
    if found["certs"] is not None:
        found["certs"] = str(path.parent / found["certs"])
    return ExecutorSettings(executor or found["executor"], cache or found["cache"],
                            certs or found["certs"])


def load_keys(paths: Sequence[str]) -> dict[str, Ed25519PublicKey]:
    """The public keys in ``paths`` (files or directories of ``*.pub``), by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        if os.path.isdir(path):
            keys.update(signing.load_trusted_keys(path))
        else:
            key = signing.load_public_key(path)
            keys[signing.key_id(key)] = key
    return keys
