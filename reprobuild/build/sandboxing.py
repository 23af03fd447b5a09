"""The engine's side of the sandbox: start the runner, describe each step as a SandboxSpec.

The runner is a fork server: :func:`start_runner` must run before the process starts
any thread (unshare(CLONE_NEWUSER) fails in a multi-threaded process). Inside a step:
each input is read-only at ``/inputs/NAME`` (``$NAME``); a host program's closure files
are also mounted read-only at their original absolute paths and ``$NAME`` is the
program's path; ``$out`` is ``/output/out`` (the step creates it, a file or a directory);
the working directory ``/build`` is writable. Built-in image steps run
``python -m reprobuild.build.builtin`` with the interpreter, its ELF closure, its standard
library, the site-packages directories of our dependencies and the ``reprobuild`` package
mounted read-only at their host paths; only their versions enter the ids.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

import reprobuild
from reprobuild.build.elf import elf_closure, elf_interpreter
from reprobuild.build.limits import IMAGE_TIMEOUT, effective, failure_note, image_limits
from reprobuild.build.plan import INPUTS_DIR, OUT, OUTPUT_DIR, Node
from reprobuild.build.recipe import HostSource, Image, Step
from reprobuild.errors import ReprobuildError, SandboxError
from sandbox.spec import Mount, Runner, SandboxResult, SandboxSpec

# Python packages a built-in step imports, besides the standard library.
BUILTIN_DEPENDENCIES = ("blake3", "msgpack", "zstandard", "lz4", "crc32c")


def start_runner(*, debug: bool = False) -> Runner:
    """Start the sandbox's fork server; call before any thread exists."""
    with sandbox_errors():
        try:
            sandbox_runner = importlib.import_module("sandbox.runner")
        except ImportError as exc:
            raise SandboxError(f"the sandbox is not available: {exc}",
                               hint="reinstall reprobuild (scripts/setup.sh)") from exc
        runner: Runner = sandbox_runner.start(debug=debug)
        return runner


@contextlib.contextmanager
def sandbox_errors() -> Iterator[None]:
    """Turn the sandbox package's errors into :class:`reprobuild.errors.SandboxError`."""
    try:
        sandbox_errors_module = importlib.import_module("sandbox.errors")
    except ImportError as exc:
        raise SandboxError(f"the sandbox is not available: {exc}") from None
    try:
        yield
    except sandbox_errors_module.SandboxError as exc:
        message = getattr(exc, "message", str(exc))
        raise SandboxError(message, hint=getattr(exc, "hint", None)) from exc


def input_mounts(node: Node, inputs: Mapping[str, tuple[Node, str]]
                 ) -> tuple[list[Mount], dict[str, str]]:
    """Mounts and environment variables for a node's inputs (name -> (node, store path))."""
    mounts: dict[str, Mount] = {}
    env: dict[str, str] = {}
    for name, (dep, path) in sorted(inputs.items()):
        target = f"{INPUTS_DIR}/{name}"
        mounts[target] = Mount(path, target)
        env[name] = target
        if isinstance(dep.what, HostSource):
            env[name] = dep.what.path
            for rel in _closure_files(path):
                mounts.setdefault("/" + rel, Mount(os.path.join(path, rel), "/" + rel))
    return [mounts[t] for t in sorted(mounts)], env


def _closure_files(root: str) -> list[str]:
    """Relative paths of the regular files of an imported host closure, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found, key=os.fsencode)


def resolve_program(word: str, inputs: Mapping[str, tuple[Node, str]]) -> str:
    """A builder's first word: an input name, a path inside one, or an absolute path."""
    if word.startswith("/"):
        return word
    name, _, rest = word.partition("/")
    dep = inputs[name][0]
    if not rest:
        return dep.what.path if isinstance(dep.what, HostSource) else f"{INPUTS_DIR}/{name}"
    return f"{INPUTS_DIR}/{name}/{rest}"


def step_spec(node: Node, inputs: Mapping[str, tuple[Node, str]], build_dir: str,
              output_dir: str, *, epoch: int, cores: int, debug: bool = False,
              argv: Sequence[str] | None = None, interactive: bool = False) -> SandboxSpec:
    """The sandbox a recipe step runs in (``argv`` replaces the builder, for shells)."""
    step = node.what
    assert isinstance(step, Step)
    mounts, env = input_mounts(node, inputs)
    env.update(step.env)
    env["out"] = OUT
    command = list(argv if argv is not None else step.builder)
    command[0] = resolve_program(command[0], inputs)
    mounts += [Mount(build_dir, "/build", writable=True),
               Mount(output_dir, OUTPUT_DIR, writable=True)]
    return SandboxSpec(argv=tuple(command), mounts=tuple(mounts),
                       env=tuple(sorted(env.items())), cwd="/build", epoch=epoch,
                       cores=step.cores or cores, timeout=None if interactive else step.timeout,
                       interactive=interactive, debug=debug, limits=effective(step.limits))


def image_spec(node: Node, inputs: Mapping[str, tuple[Node, str]], build_dir: str,
               output_dir: str, *, epoch: int, cores: int, debug: bool = False) -> SandboxSpec:
    """The sandbox a built-in image step runs in: ``python -m reprobuild.build.builtin JOB``."""
    image = node.what
    assert isinstance(image, Image)
    mounts, _env = input_mounts(node, inputs)
    runtime = python_runtime()
    job: dict[str, Any] = {
        "name": image.name,
        "format": image.format,
        "kind": image.kind,
        "epoch": epoch,
        "from": f"{INPUTS_DIR}/{image.source}" if image.source else None,
        "inputs": {name: f"{INPUTS_DIR}/{name}" for name in sorted(inputs)},
        "options": node.derivation.attrs["options"],
        "files": dict(image.files),
        "table": dict(image.table),
        "output": OUT,
        "scratch": "/build",  # spool archive members on disk, not in the tmpfs /tmp
    }
    have = {m.target for m in mounts}
    mounts += [m for m in runtime.mounts if m.target not in have]
    mounts += [Mount(build_dir, "/build", writable=True),
               Mount(output_dir, OUTPUT_DIR, writable=True)]
    env = {"PYTHONPATH": runtime.pythonpath, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONHASHSEED": "0", "out": OUT}
    argv = (runtime.python, "-B", "-s", "-m", "reprobuild.build.builtin",
            json.dumps(job, sort_keys=True))
    return SandboxSpec(argv=argv, mounts=tuple(mounts), env=tuple(sorted(env.items())),
                       cwd="/build", epoch=epoch, cores=cores, debug=debug,
                       timeout=image.timeout or IMAGE_TIMEOUT,
                       limits=image_limits(image.limits, image.size))


def limit_note(node: Node, spec: SandboxSpec, result: SandboxResult,
               log_tail: list[str]) -> tuple[str, str | None]:
    """For a failed run: the limit it passed (or seems to have run out of), and how to
    raise it in the recipe (None when no limit is to blame)."""
    kind = "step" if isinstance(node.what, Step) else "image"
    return failure_note(result, kind, node.key, spec.limits, log_tail)


RUNTIME_SITE = "/.reprobuild/site"
"""Where built-in steps find the reprobuild package and its dependencies."""


class PythonRuntime:
    def __init__(self, python: str, mounts: list[Mount], pythonpath: str) -> None:
        self.python = python
        self.mounts = mounts
        self.pythonpath = pythonpath


def _module_root(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    file: str | None = getattr(module, "__file__", None)
    if not file:
        return None
    path = os.path.dirname(os.path.abspath(file))
    return path if os.path.basename(file).startswith("__init__.") else file


def _dist_info(distribution: str) -> str | None:
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    path = getattr(dist, "_path", None)  # PathDistribution: its .dist-info directory
    return str(path) if path is not None and os.path.isdir(str(path)) else None


@functools.cache
def python_runtime() -> PythonRuntime:
    """The interpreter and libraries a built-in step needs, at their host paths."""
    python = os.path.realpath(sys.executable)
    stdlib = sysconfig.get_paths()["stdlib"]
    files = set(elf_closure(python))
    dynload = os.path.join(stdlib, "lib-dynload")
    package_roots = [r for r in (_module_root(n) for n in BUILTIN_DEPENDENCIES) if r]
    shared = []
    for top in [dynload, *package_roots]:
        if os.path.isdir(top):
            for dirpath, _dirs, names in os.walk(top):
                shared += [os.path.join(dirpath, n) for n in names if ".so" in n]
    loader = elf_interpreter(python)
    for lib in sorted(shared):
        with contextlib.suppress(ReprobuildError, OSError):
            files.update(f for f in elf_closure(lib, loader=loader) if f != lib)
    mounts = {f: Mount(f, f) for f in files if not f.startswith(stdlib + "/")}
    mounts[stdlib] = Mount(stdlib, stdlib)
    # Our package and its dependencies appear at one fixed directory, never at their
    # host paths: those may lie under /tmp or /build, which the sandbox replaces, and
    # they would tell a step where the host keeps its checkout.
    package = os.path.dirname(os.path.abspath(reprobuild.__file__))
    for root in [package, *package_roots]:
        target = f"{RUNTIME_SITE}/{os.path.basename(root)}"
        mounts[target] = Mount(root, target)
    for name in BUILTIN_DEPENDENCIES:  # importlib.metadata.version() reads the dist-info
        info = _dist_info(name)
        if info:
            target = f"{RUNTIME_SITE}/{os.path.basename(info)}"
            mounts[target] = Mount(info, target)
    ordered = [mounts[k] for k in sorted(mounts)]
    return PythonRuntime(python, ordered, RUNTIME_SITE)
