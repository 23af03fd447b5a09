"""Recipe files: TOML in, a validated :class:`Recipe` out.

A recipe names sources (``[sources.NAME]``: a Debian package, a path imported by content,
an OCI image layout imported by content, or a host program with its ELF closure), steps
(``[steps.NAME]``: a builder run in the sandbox) and images (``[images.NAME]``: built by
reprobuild's own writers). Every error names the file, the table and the key, and
suggests the nearest valid key for a typo; a dependency cycle is reported with the cycle.
Loading a recipe reads only the recipe file; paths are made absolute relative to the
recipe's directory.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from reprobuild.build.boottests import BootTest, parse_tests
from reprobuild.build.limits import table_limits
from reprobuild.build.recipe_graph import check_cycles, check_inputs
from reprobuild.errors import ImageError, RecipeError, suggest
from reprobuild.images.protocol import COMMON_KEYS, VALUE_KEYS
from reprobuild.images.registry import get_format, sane_size
from reprobuild.units import parse_duration, parse_size
from sandbox.spec import Limits

_T = TypeVar("_T")

__all__ = ["DebSource", "HostSource", "Image", "OciSource", "PathSource", "Recipe", "Step",
           "load_recipe", "parse_duration", "parse_recipe", "parse_size"]

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# Store outputs get mtime = epoch through utime, whose nanosecond count is a signed
# 64-bit number; each image format then refuses what it cannot hold (images/timestamps).
MAX_EPOCH = ((1 << 63) - 1) // 1_000_000_000
TOP_KEYS = ("epoch", "sources", "steps", "images", "tests")
DEB_KEYS = ("deb", "version", "sha256")
PATH_KEYS = ("path", "blake3", "allow-outside", "allow-private")
HOST_KEYS = ("host",)
OCI_KEYS = ("oci", "blake3", "allow-outside", "allow-private")
SOURCE_KINDS = ("deb", "path", "host", "oci")
DEB_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
DEB_VERSION_RE = re.compile(r"[0-9][A-Za-z0-9.+~:-]*")
STEP_KEYS = ("inputs", "builder", "env", "timeout", "limits", "cores")
RUN_KEYS = ("timeout", "limits")  # how an image's step runs, not what it makes: not in ids
IMAGE_KEYS = (*COMMON_KEYS, *RUN_KEYS)

Json = None | bool | int | str | list["Json"] | dict[str, "Json"]


@dataclass(frozen=True)
class DebSource:
    """A Debian package pinned by version and sha256, fetched with ``apt-get download``."""

    name: str
    package: str
    version: str
    sha256: str


@dataclass(frozen=True)
class PathSource:
    """A file or directory imported by content; ``blake3`` optionally pins its tree hash.

    Planning refuses a path that resolves outside ``base`` (the recipe's directory)
    unless ``allow_outside``, and one holding files the user can read only through
    privilege unless ``allow_private`` (see :func:`reprobuild.build.inputs.check_path_source`).
    Neither flag is part of any id: they permit an import, the content is what counts.
    """

    name: str
    path: str  # absolute
    blake3: str | None = None
    base: str = ""  # the recipe's directory
    allow_outside: bool = False
    allow_private: bool = False


@dataclass(frozen=True)
class HostSource:
    """A host program imported with its ELF closure (loader and shared libraries)."""

    name: str
    path: str  # absolute


@dataclass(frozen=True)
class OciSource(PathSource):
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``).

    Imported by content exactly like a path source (it is one, to the engine and the
    store); planning also checks that the directory is an image layout. An image's
    ``from`` merges its layers (see :mod:`reprobuild.trees.oci`); a step sees the layout itself.
    """


Source = DebSource | PathSource | OciSource | HostSource


@dataclass(frozen=True)
class Step:
    """A builder run in the sandbox with its inputs read-only and a writable ``$out``."""

    name: str
    inputs: tuple[str, ...]
    builder: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    timeout: float | None = None
    limits: Limits = field(default_factory=Limits)
    # Cores it uses ($BUILD_CORES; a Dask resource): how it runs, not in its id.
    cores: int | None = None


@dataclass(frozen=True)
class Image:
    """An image built by a reprobuild writer (``kind`` "tree") or disk composer ("disk").

    ``source`` is the ``from`` input of a tree format; ``inputs`` lists every input
    (for disk formats, what the format module's ``inputs_of`` returned). ``table`` is the
    image's whole TOML table, as disk formats read it.
    """

    name: str
    format: str
    kind: str
    source: str | None
    inputs: tuple[str, ...]
    size: int | None = None
    uuid: str | None = None
    label: str | None = None
    compress: str | None = None
    block_size: int | None = None
    files: Mapping[str, Json] = field(default_factory=dict)
    extra: tuple[tuple[str, str | int | bool], ...] = ()
    table: Mapping[str, Json] = field(default_factory=dict)
    timeout: float | None = None
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: every input exists and the dependency graph has no cycle."""

    path: str  # as given, for messages
    directory: str  # absolute directory of the recipe file
    epoch: int
    sources: Mapping[str, Source]
    steps: Mapping[str, Step]
    images: Mapping[str, Image]
    tests: Mapping[str, BootTest] = field(default_factory=dict)  # [tests.NAME]: boot tests

    def names(self) -> list[str]:
        return [*self.sources, *self.steps, *self.images]

    def inputs_of(self, name: str) -> tuple[str, ...]:
        """The names ``name`` depends on directly (none for sources)."""
        if name in self.steps:
            return self.steps[name].inputs
        if name in self.images:
            return self.images[name].inputs
        return ()

    def default_targets(self) -> list[str]:
        """All images, or all steps when there is no image, or all sources."""
        if self.images:
            return list(self.images)
        if self.steps:
            return list(self.steps)
        return list(self.sources)

    def closure(self, targets: Iterable[str]) -> list[str]:
        """``targets`` and everything they need, dependencies before dependents.

        Iterative (a chain of any length), linear in the size of the graph."""
        order: list[str] = []
        seen: set[str] = set()
        for target in targets:
            self.check_target(target)
            if target in seen:
                continue
            seen.add(target)
            # (name, its inputs, index of the next input to visit): a depth-first walk
            # that emits a name after all its inputs, as a recursive one would.
            stack: list[tuple[str, tuple[str, ...], int]] = [
                (target, self.inputs_of(target), 0)]
            while stack:
                name, deps, index = stack[-1]
                if index == len(deps):
                    stack.pop()
                    order.append(name)
                    continue
                stack[-1] = (name, deps, index + 1)
                dep = deps[index]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, self.inputs_of(dep), 0))
        return order

    def check_target(self, target: str) -> None:
        if target not in self.sources and target not in self.steps and target not in self.images:
            raise RecipeError(f"{self.path}: no source, step or image named {target!r}",
                              hint=suggest(target, self.names(), "targets"))


class _Table:
    """One TOML table being validated; errors name the file, the table and the key."""

    def __init__(self, path: str, where: str, table: Any, keys: Iterable[str] | None) -> None:
        self.path = path
        self.where = where
        if not isinstance(table, dict):
            raise RecipeError(f"{path}: [{where}] must be a table, not {type(table).__name__}")
        self.table: dict[str, Any] = table
        if keys is not None:
            self.only(keys)

    def error(self, key: str | None, message: str, hint: str | None = None) -> RecipeError:
        at = f"[{self.where}]" + (f" {key}" if key else "")
        return RecipeError(f"{self.path}: {at}: {message}", hint=hint)

    def only(self, keys: Iterable[str]) -> None:
        valid = list(keys)
        for key in self.table:
            if key not in valid:
                raise self.error(key, f"unknown key {key!r}", suggest(key, valid, "keys"))

    def require(self, key: str) -> Any:
        if key not in self.table:
            raise self.error(None, f"missing key {key!r}")
        return self.table[key]

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.require(key) if required else self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, not {value!r}")
        self.no_nul(key, value)
        return value

    def strings(self, key: str, *, required: bool = False) -> tuple[str, ...]:
        value = self.require(key) if required else self.table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of strings, not {value!r}")
        for index, item in enumerate(value):
            self.no_nul(f"{key}[{index}]", item)
        return tuple(value)

    def no_nul(self, key: str, value: str) -> None:
        """Refuse a NUL byte: no argv word, environment entry or path can hold one."""
        if "\0" in value:
            raise self.error(key, f"contains a NUL byte ({value!r})",
                             "remove the \\u0000: arguments, environment variables and "
                             "paths cannot contain NUL")

    def parsed(self, key: str, parse: Callable[[object], _T]) -> _T | None:
        """``parse`` of the value at ``key`` (None when absent); its ValueError names the
        key."""
        if key not in self.table:
            return None
        try:
            return parse(self.table[key])
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def boolean(self, key: str) -> bool:
        value = self.table.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def integer(self, key: str) -> int | None:
        value = self.table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(key, f"must be a non-negative integer, not {value!r}")
        return value


def _json_value(table: _Table, key: str, value: Any) -> Json:
    """TOML values of override tables as JSON-able data (no floats, no dates)."""
    if isinstance(value, str):
        table.no_nul(key, value)
        return value
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, list):
        return [_json_value(table, key, v) for v in value]
    if isinstance(value, dict):
        for name in value:
            table.no_nul(key, str(name))
        return {str(k): _json_value(table, key, v) for k, v in value.items()}
    raise table.error(key, f"{type(value).__name__} values are not allowed here",
                      "use strings or integers (floats and dates are not reproducible keys)")


def load_recipe(path: str) -> Recipe:
    """Read and validate a recipe file; raise :class:`RecipeError` naming what is wrong."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    return parse_recipe(data, path=path, directory=os.path.dirname(os.path.abspath(path)))


def parse_recipe(data: dict[str, Any], *, path: str, directory: str) -> Recipe:
    """Validate already-parsed TOML (``path`` is for messages, ``directory`` for paths)."""
    top = _Table(path, "top level", data, TOP_KEYS)
    epoch = top.integer("epoch") or 0
    if epoch > MAX_EPOCH:
        raise top.error("epoch", f"{epoch} is later than file times can be set in the "
                        f"store (at most {MAX_EPOCH}, in 2262)")
    sources: dict[str, Source] = {}
    steps: dict[str, Step] = {}
    images: dict[str, Image] = {}
    owner: dict[str, str] = {}

    def claim(section: str, name: str) -> None:
        if not NAME_RE.match(name):
            raise RecipeError(f"{path}: [{section}.{name}]: invalid name {name!r}",
                              hint="names start with a letter or '_' and contain letters, "
                                   "digits, '_', '-' and '.'")
        if name in owner:
            raise RecipeError(f"{path}: [{section}.{name}]: the name {name!r} is already used "
                              f"by [{owner[name]}.{name}]",
                              hint="sources, steps and images share one namespace")
        owner[name] = section

    for name, table in _Table(path, "sources", data.get("sources", {}), None).table.items():
        claim("sources", name)
        sources[name] = _source(path, directory, name, table)
    for name, table in _Table(path, "steps", data.get("steps", {}), None).table.items():
        claim("steps", name)
        steps[name] = _step(path, name, table)
    for name, table in _Table(path, "images", data.get("images", {}), None).table.items():
        claim("images", name)
        images[name] = _image(path, name, table)

    recipe = Recipe(path=path, directory=directory, epoch=epoch, sources=sources,
                    steps=steps, images=images,
                    tests=parse_tests(path, data.get("tests"), set(owner)))
    check_inputs(recipe)
    check_cycles(recipe)
    return recipe


def _source(path: str, directory: str, name: str, raw: Any) -> Source:
    table = _Table(path, f"sources.{name}", raw, None)
    kinds = [k for k in SOURCE_KINDS if k in table.table]
    if len(kinds) != 1:
        keys = list(table.table)
        hint = ("a source has exactly one of: deb = \"PACKAGE\", path = \"FILE\", "
                "host = \"/PROGRAM\", oci = \"LAYOUT\"")
        if not kinds and keys:
            valid = dict.fromkeys([*DEB_KEYS, *PATH_KEYS, *HOST_KEYS, *OCI_KEYS])
            close = difflib.get_close_matches(keys[0], list(valid), n=1, cutoff=0.6)
            if close:
                hint = f"did you mean {close[0]!r}? " + hint
        raise table.error(None, "needs exactly one of the keys 'deb', 'path', 'host', 'oci'",
                          hint)
    kind = kinds[0]
    if kind == "deb":
        table.only(DEB_KEYS)
        sha = table.string("sha256", required=True)
        assert sha is not None
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise table.error("sha256", f"{sha!r} is not 64 lowercase hex digits")
        package = table.string("deb", required=True)
        version = table.string("version", required=True)
        assert package is not None and version is not None
        # Both become an apt-get argument: a leading '-' would be read as an option.
        if not DEB_PACKAGE_RE.fullmatch(package):
            raise table.error("deb", f"{package!r} is not a Debian package name",
                              "names are lowercase letters, digits, '+', '-' and '.', "
                              "starting with a letter or digit")
        if not DEB_VERSION_RE.fullmatch(version):
            raise table.error("version", f"{version!r} is not a Debian version",
                              "e.g. 1:1.35.0-4+deb12u1 (digits first; letters, digits "
                              "and . + ~ : - after)")
        return DebSource(name, package, version, sha)
    if kind in ("path", "oci"):
        table.only(PATH_KEYS if kind == "path" else OCI_KEYS)
        rel = table.string(kind, required=True)
        assert rel is not None
        pin = table.string("blake3")
        if pin is not None and not re.fullmatch(r"[0-9a-f]{64}", pin):
            raise table.error("blake3", f"{pin!r} is not 64 lowercase hex digits")
        made = PathSource if kind == "path" else OciSource
        return made(name, os.path.normpath(os.path.join(directory, rel)), pin, directory,
                    allow_outside=table.boolean("allow-outside"),
                    allow_private=table.boolean("allow-private"))
    table.only(HOST_KEYS)
    program = table.string("host", required=True)
    assert program is not None
    if not program.startswith("/"):
        raise table.error("host", f"{program!r} must be an absolute path",
                          "host programs are named by their absolute path, e.g. /usr/bin/tar")
    return HostSource(name, os.path.normpath(program))


def _step(path: str, name: str, raw: Any) -> Step:
    table = _Table(path, f"steps.{name}", raw, STEP_KEYS)
    inputs = table.strings("inputs")
    if len(set(inputs)) != len(inputs):
        raise table.error("inputs", "lists an input twice")
    builder = table.strings("builder", required=True)
    if not builder:
        raise table.error("builder", "must not be empty")
    first = builder[0]
    if not first.startswith("/") and first.split("/", 1)[0] not in inputs:
        raise table.error("builder", f"the program {first!r} names no input of this step",
                          f"the first word is an input ('bb'), a path inside one "
                          f"('busybox/bin/busybox') or an absolute path; inputs: "
                          f"{', '.join(inputs) or '(none)'}")
    env_raw = table.table.get("env", {})
    if not isinstance(env_raw, dict):
        raise table.error("env", "must be a table of strings")
    env: list[tuple[str, str]] = []
    for key, value in env_raw.items():
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise table.error(f"env.{key}", f"must be a string, not {value!r}")
        table.no_nul(f"env.{key!r}" if "\0" in key else f"env.{key}", f"{key}={value}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise table.error(f"env.{key}", "is not a valid environment variable name")
        if key == "out" or key in inputs:
            raise table.error(f"env.{key}", f"{key!r} is set by reprobuild "
                              "($out and the inputs' paths)")
        env.append((key, str(value)))
    timeout = table.parsed("timeout", parse_duration)
    cores = table.integer("cores")
    if cores == 0:
        raise table.error("cores", "must be at least 1")
    return Step(name, inputs, builder, tuple(sorted(env)), timeout,
                table_limits(table.table, table.path, table.where), cores)


def _image(path: str, name: str, raw: Any) -> Image:
    table = _Table(path, f"images.{name}", raw, None)
    fmt_name = table.string("format", required=True)
    assert fmt_name is not None
    try:
        fmt = get_format(fmt_name)
    except ImageError as exc:
        raise table.error("format", exc.message, exc.hint) from None
    for key, value in table.table.items():
        if key in VALUE_KEYS and key not in fmt.options.common:
            try:
                fmt.options.check_common({key: value})
            except ImageError as exc:
                raise table.error(key, exc.message, exc.hint) from None
        if key in IMAGE_KEYS:
            continue
        if key not in fmt.options.names():
            raise table.error(key, f"unknown {fmt_name} option {key!r}",
                              suggest(key, [*IMAGE_KEYS, *fmt.options.names()], "keys"))
        try:
            fmt.options.check_one(key, value)
        except ImageError as exc:
            raise table.error(key, exc.message, exc.hint) from None
    size = table.parsed("size", lambda value: sane_size(fmt_name, parse_size(value)))
    files_raw = table.table.get("files", {})
    if not isinstance(files_raw, dict):
        raise table.error("files", "must be a table of paths to overrides")
    files = {str(k): _json_value(table, f"files.{k}", v) for k, v in files_raw.items()}
    extra: list[tuple[str, str | int | bool]] = []
    for key, value in table.table.items():
        if key in IMAGE_KEYS or fmt.kind == "disk":
            continue
        if not isinstance(value, str | int | bool):
            raise table.error(key, f"must be a string, integer or boolean, not {value!r}")
        extra.append((key, value))
    whole = {k: _json_value(table, k, v) for k, v in table.table.items() if k not in RUN_KEYS}
    if fmt.kind == "tree":
        source = table.string("from", required=True)
        assert source is not None
        inputs: tuple[str, ...] = (source,)
    else:
        source = table.string("from")
        try:
            listed = fmt.load_disk().inputs_of(whole)
        except ImageError as exc:
            raise table.error(None, exc.message, exc.hint) from None
        inputs = tuple(dict.fromkeys([*([source] if source else []), *listed]))
    return Image(
        name=name, format=fmt_name, kind=fmt.kind, source=source, inputs=inputs, size=size,
        uuid=table.string("uuid"), label=table.string("label"),
        compress=table.string("compress"), block_size=table.integer("block_size"),
        files=files, extra=tuple(sorted(extra)), table=whole,
        timeout=table.parsed("timeout", parse_duration),
        limits=table_limits(table.table, table.path, table.where))
