"""`reprobuild image`: build one image from a directory, tar or OCI layout, no recipe.

The image is written to ``OUTPUT.tmp-*`` beside OUTPUT and renamed into place only when
complete, so an interrupted or failed run never leaves something that looks finished.
The epoch defaults to ``$SOURCE_DATE_EPOCH``, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

from reprobuild.errors import ImageError, ReprobuildError, disk_full
from reprobuild.images.registry import FORMATS, ImageOptions, OptionValue, get_format
from reprobuild.trees.load import load_tree
from reprobuild.trees.oci import DEFAULT_PLATFORM
from reprobuild.trees.overrides import apply_overrides, load_overrides_file
from reprobuild.trees.tar_reader import Spool
from reprobuild.units import parse_size

HELP = "build an image (ext4, squashfs, erofs, cpio, tar) from a directory, tar or OCI layout"


def _size(text: str) -> int | None:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _epoch(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"epoch must be whole seconds, not {text!r}")
    return int(text)


def _option(text: str) -> tuple[str, OptionValue]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"option must be KEY=VALUE, not {text!r}")
    if value.isdigit():
        return key, int(value)
    if value in ("true", "false"):
        return key, value == "true"
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
    parser.add_argument("--platform", type=_platform, default=DEFAULT_PLATFORM,
                        metavar="OS/ARCH", help="manifest of a multi-platform OCI image "
                        "(default: linux/amd64)")
    parser.add_argument("--option", "-o", dest="extra", type=_option, action="append",
                        default=[], metavar="KEY=VALUE", help="a format-specific option")


def default_epoch() -> int:
    text = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not text.isdigit():
        raise ReprobuildError(f"SOURCE_DATE_EPOCH={text!r} is not whole seconds",
                              hint="unset it or pass --epoch N")
    return int(text)


def build_image(source: str, output: str, fmt: str, options: ImageOptions, *,
                files: str | None = None,
                platform: tuple[str, str] = DEFAULT_PLATFORM) -> int:
    """Build ``output`` from ``source``; returns its size in bytes."""
    module = get_format(fmt)
    if module.kind != "tree":
        raise ImageError(f"{fmt} images are made from other images, not from a tree",
                         hint="use a recipe to compose disk images")
    writer = module.load()
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise ImageError(f"the directory of {output} does not exist",
                         hint="create it first; nothing was written")
    with tempfile.TemporaryDirectory(prefix="reprobuild-spool-") as spool_dir:
        tree = load_tree(source, epoch=options.epoch, spool=Spool(spool_dir),
                         platform=platform)
        if files is not None:
            tree = apply_overrides(tree, load_overrides_file(files), where=files,
                                      epoch=options.epoch)
        if os.path.isdir(output):
            raise ImageError(f"output {output} is a directory", hint="name the image file")
        try:
            fd, partial = tempfile.mkstemp(dir=directory,
                                           prefix=os.path.basename(output) + ".tmp-")
        except OSError as exc:
            raise ImageError(f"cannot create the image beside {output}: {exc.strerror}",
                             hint="the output's directory must exist and be writable"
                             ) from None
        try:
            with os.fdopen(fd, "w+b") as out:
                writer.write(tree, out, options)
                out.flush()
                os.fsync(out.fileno())
                size = out.seek(0, os.SEEK_END)
            os.chmod(partial, 0o644)
            os.replace(partial, output)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            full = disk_full(exc, output, f"the {fmt} image {output}") \
                if isinstance(exc, OSError) else None
            if full is not None:
                raise full from None
            raise
    return size


def run(args: argparse.Namespace) -> int:
    options = ImageOptions(
        epoch=args.epoch if args.epoch is not None else default_epoch(),
        size=args.size, uuid=args.uuid, label=args.label, compress=args.compress,
        block_size=args.block_size, extra=tuple(sorted(args.extra)))
    size = build_image(args.source, args.output, args.format, options, files=args.files,
                       platform=args.platform)
    print(f"{args.output}: {args.format} image, {size} bytes")
    return 0
