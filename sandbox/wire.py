"""The messages between a caller and the fork server: specs and results as msgpack."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from sandbox.errors import SandboxError, UserNamespacesUnavailable
from sandbox.spec import Limits, Mount, SandboxResult, SandboxSpec

# The largest spec or result message; one SOCK_SEQPACKET datagram.
MAX_MESSAGE = 1 << 17  # one SOCK_SEQPACKET datagram (fits the default socket buffers)


def encode_spec(spec: SandboxSpec) -> bytes:
    return bytes(msgpack.packb([
        list(spec.argv),
        [[m.source, m.target, m.writable] for m in spec.mounts],
        [list(kv) for kv in spec.env],
        spec.cwd, spec.epoch, spec.cores, spec.timeout, spec.interactive, spec.debug,
        [list(kv) for kv in spec.extra], spec.hide_writable_paths,
        list(dataclasses.astuple(spec.limits)),
    ]))


def decode_spec(payload: bytes) -> SandboxSpec:
    (argv, mounts, env, cwd, epoch, cores, timeout, interactive, debug, extra,
     hide_writable_paths, limits) = msgpack.unpackb(payload)
    return SandboxSpec(
        argv=tuple(argv), mounts=tuple(Mount(s, t, w) for s, t, w in mounts),
        env=tuple((k, v) for k, v in env), cwd=cwd, epoch=epoch, cores=cores,
        timeout=timeout, interactive=interactive, debug=debug,
        extra=tuple((k, v) for k, v in extra), hide_writable_paths=hide_writable_paths,
        limits=Limits(*limits))


def encode_result(result: SandboxResult) -> bytes:
    return bytes(msgpack.packb({"returncode": result.returncode, "signal": result.signal,
                                "timed_out": result.timed_out, "duration": result.duration,
                                "interrupted": result.interrupted, "limit": result.limit,
                                "log_dropped": result.log_dropped,
                                "mechanism": result.mechanism}))


def encode_error(error: SandboxError) -> bytes:
    kind = "userns" if isinstance(error, UserNamespacesUnavailable) else "setup"
    return bytes(msgpack.packb({"error": error.message, "hint": error.hint, "kind": kind}))


def decode_reply(payload: bytes) -> SandboxResult:
    """A supervisor's reply: the result, or the error it carries raised here."""
    reply: dict[str, Any] = msgpack.unpackb(payload)
    if "error" in reply:
        cls = UserNamespacesUnavailable if reply["kind"] == "userns" else SandboxError
        raise cls(reply["error"], hint=reply["hint"])
    return SandboxResult(returncode=reply["returncode"], signal=reply["signal"],
                         timed_out=reply["timed_out"], duration=reply["duration"],
                         interrupted=reply["interrupted"], limit=reply["limit"],
                         log_dropped=reply["log_dropped"], mechanism=reply["mechanism"])
