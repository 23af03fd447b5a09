"""The contract between reprobuild and an image format: options, schema, module protocols.

Every format in :data:`reprobuild.images.registry.FORMATS` declares an
:class:`OptionsSchema` (the format-specific keys a recipe's ``[images.X]`` table and
``reprobuild image -o KEY=VALUE`` may set, with their types and ranges) and names a
module that implements :class:`TreeFormat` (writes an image from a tree) or
:class:`DiskFormat` (composes other images). The schema lives in the registry's table,
not in the writer, so that checking a recipe never imports a writer.

The common keys (``size``, ``uuid``, ``label``, ``compress``, ``block_size``) are fields
of :class:`ImageOptions`; each writer checks the values it cannot use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Protocol

from reprobuild.errors import ImageError, close_matches, suggest

if TYPE_CHECKING:  # the registry (and so every command) reads this without a tree
    from reprobuild.trees.tree import Tree

OptionValue = str | int | bool
COMMON_KEYS = ("from", "format", "size", "uuid", "label", "compress", "block_size", "files")
# The common keys that carry a value into ImageOptions; a format lists those it honours.
VALUE_KEYS = ("size", "uuid", "label", "compress", "block_size")


# The largest image any writer is asked for (16 TiB): a larger size is a typo far more
# often than a wish, and the ext4 writer's per-group tables grow with the size (1000 TiB
# took 4 GB of memory before it failed).
MAX_IMAGE_SIZE = 16 << 40


def sane_size(format_name: str, size: int | None) -> int | None:
    """``size`` unless it is above :data:`MAX_IMAGE_SIZE` (ValueError saying what to do)."""
    if size is not None and size > MAX_IMAGE_SIZE:
        raise ValueError(f"{format_name} image size {size} bytes is above the largest image "
                         f"reprobuild writes ({MAX_IMAGE_SIZE >> 40} TiB): give a size like "
                         '"64M" or "2G", or "min" for the smallest')
    return size


@dataclass(frozen=True)
class ImageOptions:
    """Everything that shapes an image besides the tree. No field has a host default."""

    epoch: int
    size: int | None = None  # bytes; None means the smallest size that fits
    uuid: str | None = None  # derived from the content when None
    label: str | None = None
    compress: str | None = None  # format default when None
    block_size: int | None = None  # format default when None
    extra: tuple[tuple[str, OptionValue], ...] = field(default=())

    def __post_init__(self) -> None:
        try:  # before any byte is written, whoever asks for the image
            sane_size("an", self.size)
        except ValueError as exc:
            raise ImageError(str(exc)) from None

    def get(self, key: str, default: OptionValue | None = None) -> OptionValue | None:
        for name, value in self.extra:
            if name == key:
                return value
        return default


@dataclass(frozen=True)
class Option:
    """One format-specific key: its type (``bool``, ``int``, ``str``, or ``object`` for
    a structured value the format module checks itself), an inclusive range for
    integers, the accepted strings, and one line saying what it does."""

    name: str
    type: type
    help: str
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()

    def check(self, value: object) -> None:
        """Raise ImageError when ``value`` is not of this option's type or range."""
        if self.type is object:
            return
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ImageError(f"option {self.name} must be an integer, not {value!r}")
        if self.type is not int and not isinstance(value, self.type):
            raise ImageError(f"option {self.name} must be {_TYPE_WORDS[self.type]}, "
                             f"not {value!r}")
        if isinstance(value, int) and not isinstance(value, bool):
            low = "" if self.minimum is None else f"{self.minimum}"
            high = "" if self.maximum is None else f"{self.maximum}"
            if ((self.minimum is not None and value < self.minimum)
                    or (self.maximum is not None and value > self.maximum)):
                raise ImageError(f"option {self.name} = {value} is out of range",
                                 hint=f"use a value from {low or '-inf'} to {high or 'inf'}")
        if self.choices and value not in self.choices:
            raise ImageError(f"option {self.name} = {value!r} is not one of "
                             f"{', '.join(self.choices)}",
                             hint=suggest(str(value), self.choices, "values"))

    def from_text(self, text: str) -> OptionValue:
        """The value of ``-o NAME=TEXT`` on the command line, typed by this option."""
        if self.type is bool:
            if text not in ("true", "false"):
                raise ImageError(f"option {self.name} must be true or false, not {text!r}")
            return text == "true"
        if self.type is int:
            try:
                return int(text, 0)
            except ValueError:
                raise ImageError(f"option {self.name} must be an integer, not {text!r}"
                                 ) from None
        if self.type is object:
            raise ImageError(f"option {self.name} is a structured value",
                             hint="set it in a recipe's [images.X] table")
        return text


_TYPE_WORDS: dict[type, str] = {bool: "true or false", str: "a string", int: "an integer"}


@dataclass(frozen=True)
class OptionsSchema:
    """The format-specific keys of one format and the common value keys (``size``,
    ``uuid``, ``label``, ``compress``, ``block_size``) it honours; anything else is
    refused."""

    format: str
    options: tuple[Option, ...] = ()
    common: tuple[str, ...] = VALUE_KEYS

    def names(self) -> tuple[str, ...]:
        return tuple(option.name for option in self.options)

    def check_common(self, given: Mapping[str, object]) -> None:
        """Refuse a common key (``given``: key -> value, None when unset) that this
        format would ignore, rather than build something the user did not ask for."""
        for key, value in given.items():
            if value is not None and key not in self.common:
                takes = ", ".join(self.common) or "none of them"
                raise ImageError(f"{self.format} images take no {key}",
                                 hint=f"leave {key} out; of size, uuid, label, compress "
                                      f"and block_size, {self.format} takes {takes}")

    def check_image_options(self, options: ImageOptions) -> None:
        """:meth:`check_common` and :meth:`check` for every field of ``options``."""
        self.check_common({"size": options.size, "uuid": options.uuid,
                           "label": options.label, "compress": options.compress,
                           "block_size": options.block_size})
        self.check(dict(options.extra))

    def option(self, name: str) -> Option:
        """The option ``name``; an unknown name is an ImageError with a suggestion."""
        for option in self.options:
            if option.name == name:
                return option
        raise ImageError(f"unknown {self.format} option {name!r}",
                         hint=suggest(name, [*COMMON_KEYS, *self.names()], "keys"))

    def check(self, values: Mapping[str, object]) -> None:
        """Refuse unknown keys and values of the wrong type or range."""
        for name, value in values.items():
            self.check_one(name, value)

    def check_one(self, name: str, value: object) -> None:
        option = self.option(name)
        try:
            option.check(value)
        except ImageError as exc:
            raise ImageError(f"{self.format} {exc.message}", hint=exc.hint) from None

    def parse_text(self, name: str, text: str) -> OptionValue:
        """Type the command line's ``-o NAME=TEXT`` and check it. ``-o`` sets only
        format-specific keys: a common key or a misspelt one is refused with the flag or
        key meant."""
        if name not in self.names():
            # How each key the format takes is written on the command line.
            spelled = {key: f"--{key.replace('_', '-')}" for key in (*self.common, "files")}
            if name in spelled:
                raise ImageError(f"{name} is not a -o option", hint=f"use {spelled[name]}")
            spelled.update((key, repr(key)) for key in self.names())
            close = close_matches(name, sorted(spelled))
            meant = f"did you mean {spelled[close[0]]}? " if close else ""
            raise ImageError(f"unknown {self.format} option {name!r}",
                             hint=f"{meant}{self.format}'s -o options: "
                                  f"{', '.join(self.names()) or 'none'}")
        try:
            value = self.option(name).from_text(text)
        except ImageError as exc:
            raise ImageError(f"{self.format} {exc.message}", hint=exc.hint) from None
        self.check_one(name, value)
        return value


class TreeFormat(Protocol):
    """A module that writes an image from a tree (ext4, squashfs, erofs, cpio, tar)."""

    VERSION: str  # the writer's code version; it enters every derivation id

    def write(self, tree: Tree, output: BinaryIO, options: ImageOptions) -> None:
        """Write the image to a seekable, writable, empty file: plan first, then
        serialise; read file bytes only through ``Content.chunks()`` or its faster
        equal, :class:`~reprobuild.images.contents.ContentStreamer`."""

    def read(self, path: str | bytes) -> Tree:
        """Read an image back into a tree; contents stream from the image file."""

    def identity(self, options: ImageOptions) -> dict[str, str]:
        """Anything besides the options and VERSION that changes the bytes (a
        compressor library's name and version)."""


class DiskFormat(Protocol):
    """A module that composes other images into one output (gpt, verity)."""

    VERSION: str

    def inputs_of(self, table: Mapping[str, object]) -> list[str]:
        """The names of the images or steps the image needs, read from its recipe
        table, in first-use order. Raises ImageError on a malformed table."""

    def build(self, inputs: dict[str, str], table: Mapping[str, object],
              options: ImageOptions, output: str) -> None:
        """Create ``output`` from ``inputs`` (names to store paths); reads nothing else."""

    def read(self, path: str | bytes | os.PathLike[str]) -> Tree:
        """The image as a tree of files (for ``reprobuild diff`` and tests)."""

    def identity(self, options: ImageOptions) -> dict[str, str]:
        """Anything besides the options and VERSION that changes the bytes."""

    def main_file(self, table: Mapping[str, object]) -> str:
        """The file of the output directory that is the image; the store records its
        fs-verity digest."""
