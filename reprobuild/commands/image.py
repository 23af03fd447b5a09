"""`reprobuild image`: build one image from a directory, tar or OCI layout, no recipe.

The image is made by the one image pipeline, :func:`reprobuild.images.build.build_tree_image`
(written beside OUTPUT and renamed into place when complete). ``-o KEY=VALUE`` sets a
format-specific option, typed and checked by the format's options schema. The epoch
defaults to ``$SOURCE_DATE_EPOCH``, else 0.

The options are made from the format table alone; the pipeline (with the readers of
directories, tars and OCI layouts) and the overrides reader are loaded by :func:`run`,
so ``--help`` and a usage error cost only the table.
"""

from __future__ import annotations

import argparse
import importlib
import os

from reprobuild.errors import ReprobuildError
from reprobuild.images.registry import FORMATS, ImageOptions, get_format
from reprobuild.units import parse_size

PIPELINE = "reprobuild.images.build"
OVERRIDES = "reprobuild.trees.overrides"
GCPAUSE = "reprobuild.trees.gcpause"

HELP = ("build an image (ext4, squashfs, erofs, composefs, cpio, tar) from a directory, tar "
        "or OCI layout")


def _size(text: str) -> int | None:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _epoch(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"epoch must be whole seconds, not {text!r}")
    return int(text)


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"option must be KEY=VALUE, not {text!r}")
    return key, value


def _platform(text: str) -> tuple[str, str]:
    os_name, sep, arch = text.partition("/")
    if not sep or not os_name or not arch:
        raise argparse.ArgumentTypeError(f"platform must be OS/ARCH like linux/arm64, not {text!r}")
    return os_name, arch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tree_formats = sorted(name for name, f in FORMATS.items() if f.kind == "tree")
    parser.add_argument("--format", "-t", required=True, choices=tree_formats,
                        help="image format")
    parser.add_argument("source", metavar="SOURCE",
                        help="a directory, a tar file (any compression) or an OCI image layout")
    parser.add_argument("output", metavar="OUTPUT", help="the image file to write")
    parser.add_argument("--size", type=_size, default=None,
                        help='image size like "64M", "1G" or "min" (default: smallest)')
    parser.add_argument("--epoch", type=_epoch, default=None,
                        help="SOURCE_DATE_EPOCH: every time is this or earlier "
                             "(default: $SOURCE_DATE_EPOCH, else 0)")
    parser.add_argument("--uuid", default=None, help="file system UUID (default: derived)")
    parser.add_argument("--label", default=None, help="file system label")
    parser.add_argument("--files", metavar="OVERRIDES.toml", default=None,
                        help="owners, modes, xattrs and device nodes to set, as in a "
                             "recipe's [images.X.files] table")
    parser.add_argument("--compress", default=None,
                        help="compressor (squashfs: zstd, gzip, xz, lz4, none; "
                             "tar and cpio: zstd, gzip, none)")
    parser.add_argument("--block-size", type=int, default=None, help="block size in bytes")
    parser.add_argument("--platform", type=_platform, default=None,
                        metavar="OS/ARCH", help="manifest of a multi-platform OCI image "
                        "(default: linux/amd64)")
    parser.add_argument("--digest-store", metavar="DIR", default=None,
                        help="composefs: put the files the image stores by reference "
                             "here, named by fs-verity digest (xx/rest); kept objects "
                             "are reused")
    parser.add_argument("--option", "-o", dest="extra", type=_option, action="append",
                        default=[], metavar="KEY=VALUE",
                        help="a format-specific option; " + "; ".join(
                            f"{name}: {', '.join(FORMATS[name].options.names())}"
                            for name in tree_formats if FORMATS[name].options.names()))
    # Run as the process's command, the image's objects are left to the exit: no final
    # collection walks the writers' node graphs (their cycles) only to free them.
    parser.set_defaults(frozen_at_exit=True)


def default_epoch() -> int:
    text = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not text.isdigit():
        raise ReprobuildError(f"SOURCE_DATE_EPOCH={text!r} is not whole seconds",
                              hint="unset it or pass --epoch N")
    return int(text)


def run(args: argparse.Namespace) -> int:
    schema = get_format(args.format).options
    options = ImageOptions(
        epoch=args.epoch if args.epoch is not None else default_epoch(),
        size=args.size, uuid=args.uuid, label=args.label, compress=args.compress,
        block_size=args.block_size, extra=tuple(sorted(
            (key, schema.parse_text(key, text)) for key, text in args.extra)))
    files = None
    if args.files is not None:
        files = importlib.import_module(OVERRIDES).load_overrides_file(args.files)
    pipeline = importlib.import_module(PIPELINE)
    gcpause = importlib.import_module(GCPAUSE)
    with gcpause.freeze_after_pauses():  # one image per process: the tree needs no collector
        size = pipeline.build_tree_image(
            args.format, args.source, args.output, options, files=files,
            where=args.files or "files", platform=args.platform or pipeline.DEFAULT_PLATFORM,
            sync=True, digest_store=args.digest_store)
    print(f"{args.output}: {args.format} image, {size} bytes")
    return 0
