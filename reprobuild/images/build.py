"""The one image pipeline: load the tree, apply overrides, call the writer, rename into place.

Both ways of making an image go through :func:`build_tree_image`: a recipe's built-in
image step inside its sandbox (:func:`build_image`, given a job description by
:mod:`reprobuild.build.builtin`) and ``reprobuild image`` (:mod:`reprobuild.commands.image`).
Tree formats read their ``from`` input with :func:`reprobuild.trees.load.load_tree` (a
directory, a tar or an OCI layout), apply the ``files`` overrides and call the format
module's ``write``; disk formats get the paths of their inputs and the image's table and
write the output themselves.

The image is written to ``OUTPUT.tmp-*`` beside OUTPUT and renamed into place only when
complete, so an interrupted or failed run never leaves something that looks finished.
Members of compressed tars and OCI layers are spooled to a fresh directory under
``scratch`` (in the sandbox: ``/build``, on disk, not the tmpfs ``$TMPDIR``), removed
once the image is written.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

from reprobuild.errors import ImageError, disk_full
from reprobuild.images.registry import ImageOptions, OptionValue, get_format
from reprobuild.trees.load import DEFAULT_PLATFORM, load_tree

if TYPE_CHECKING:
    from reprobuild.trees.tar_reader import Spool
    from reprobuild.trees.tree import Tree

WriteImage = Callable[["Tree", BinaryIO, ImageOptions], None]
# Loaded only for an image with overrides (it reads TOML).
OVERRIDES = "reprobuild.trees.overrides"
TAR_READER = "reprobuild.trees.tar_reader"
TEMPFILE = "tempfile"  # makes a spool directory; it loads shutil, bz2 and lzma
SHUTIL = "shutil"  # removes a spool: loaded only when one was made (it loads bz2 and lzma)


def options_from_json(epoch: int, options: Mapping[str, Any]) -> ImageOptions:
    extra: dict[str, OptionValue] = dict(options.get("extra") or {})
    return ImageOptions(epoch=epoch, size=options.get("size"), uuid=options.get("uuid"),
                        label=options.get("label"), compress=options.get("compress"),
                        block_size=options.get("block_size"),
                        extra=tuple(sorted(extra.items())))


@contextlib.contextmanager
def scratch_spool(scratch: str | None) -> Iterator[Callable[[], Spool]]:
    """A function that makes (once) a spool in a fresh directory under ``scratch``
    (None: ``$TMPDIR``); the directory, if it was made, is removed afterwards. A
    directory source never calls it: no directory and no tar reader for it."""
    made: list[Spool] = []

    def spool() -> Spool:
        if not made:
            try:
                tempfile = importlib.import_module(TEMPFILE)
                directory = tempfile.mkdtemp(prefix="reprobuild-spool-", dir=scratch)
            except OSError as exc:
                raise ImageError(f"cannot make a spool directory in "
                                 f"{scratch or '$TMPDIR'}: {exc.strerror}") from None
            made.append(importlib.import_module(TAR_READER).Spool(directory))
        return made[0]

    try:
        yield spool
    finally:
        for each in made:
            importlib.import_module(SHUTIL).rmtree(each.directory, ignore_errors=True)


def build_tree_image(fmt_name: str, source: str, output: str, options: ImageOptions, *,
                     files: Mapping[str, Mapping[str, object]] | None = None,
                     where: str = "files", scratch: str | None = None,
                     platform: tuple[str, str] = DEFAULT_PLATFORM, sync: bool = False,
                     digest_store: str | None = None) -> int:
    """Write the ``fmt_name`` image of the tree at ``source`` (with the overrides
    ``files``, named ``where`` in messages) to ``output``; returns its size in bytes.
    ``sync`` makes the bytes durable before the rename. ``digest_store`` (composefs
    only) is the directory that receives the files the image stores by reference."""
    fmt = get_format(fmt_name)
    fmt.options.check_image_options(options)
    writer = fmt.load_tree()
    write_function: Callable[..., None] = writer.write
    write_options: dict[str, object] = {}
    if digest_store is not None:
        if fmt.name != "composefs":
            raise ImageError(f"a digest store is written only for composefs images, not "
                             f"{fmt.name}", hint="drop --digest-store or use --format composefs")
        write_function = fmt.load_module().write_with_store
        write_options["digest_store"] = digest_store
    # A writer that reads every file (composefs hashes them) may start while the tree
    # loads: its while_loading() gives an object the loader tells each file it finds,
    # then given to the writer as ``early``.
    while_loading = getattr(writer, "while_loading", None)
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise ImageError(f"the directory of {output} does not exist",
                         hint="create it first; nothing was written")
    with scratch_spool(scratch) as spool, (
            contextlib.nullcontext() if while_loading is None else while_loading()) as early:
        if early is not None:
            write_options["early"] = early
        write: WriteImage = functools.partial(write_function, **write_options)
        tree = load_tree(source, epoch=options.epoch, spool=spool, platform=platform,
                         found=None if early is None else early.found)
        if files:
            overrides = importlib.import_module(OVERRIDES)
            tree = overrides.apply_overrides(tree, files, where=where, epoch=options.epoch)
        if os.path.isdir(output):
            raise ImageError(f"output {output} is a directory", hint="name the image file")
        try:
            return _write_atomically(write, tree, output, options, sync=sync)
        except OSError as exc:  # the partial file is gone: name the full disk
            full = disk_full(exc, output, f"the {fmt_name} image {output}")
            if full is None:
                raise
            raise full from None


def _create_partial(directory: str, name: str) -> tuple[int, str]:
    """A new file ``NAME.tmp-PID-N`` in ``directory``, made exclusively (mode 0600, as
    ``tempfile.mkstemp`` makes it, without loading tempfile and through it shutil)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for attempt in range(10_000):
        partial = os.path.join(directory, f"{name}.tmp-{os.getpid()}-{attempt}")
        try:
            return os.open(partial, flags, 0o600), partial
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for a partial image {name}.tmp-* in {directory}")


def _write_atomically(write: WriteImage, tree: Tree, output: str, options: ImageOptions,
                      *, sync: bool) -> int:
    directory = os.path.dirname(os.path.abspath(output))
    try:
        fd, partial = _create_partial(directory, os.path.basename(output))
    except OSError as exc:
        raise ImageError(f"cannot create the image beside {output}: {exc.strerror}",
                         hint="the output's directory must exist and be writable") from None
    try:
        with os.fdopen(fd, "w+b") as out:
            write(tree, out, options)
            out.flush()
            if sync:
                os.fsync(out.fileno())
            size = out.seek(0, os.SEEK_END)
        os.chmod(partial, 0o644)
        os.replace(partial, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    return size


def build_image(job: Mapping[str, Any]) -> None:
    """Write the image ``job`` describes to ``job["output"]`` (a built-in image step);
    a full disk is named."""
    try:
        _build_image(job)
    except OSError as exc:
        full = disk_full(exc, job["output"], f"the {job['format']} image {job.get('name')}")
        if full is None:
            raise
        raise full from None


def _build_image(job: Mapping[str, Any]) -> None:
    fmt = get_format(job["format"])
    epoch = int(job["epoch"])
    options = options_from_json(epoch, job.get("options") or {})
    if fmt.kind == "disk":
        fmt.options.check_image_options(options)
        fmt.load_disk().build(dict(job["inputs"]), dict(job["table"]), options, job["output"])
        return
    output, digest_store = job["output"], None
    main_file = getattr(fmt.load_module(), "MAIN_FILE", None)
    if main_file is not None:  # an image with its digest store: one output directory
        os.mkdir(job["output"])
        output = os.path.join(job["output"], main_file)
        digest_store = os.path.join(job["output"], fmt.load_module().STORE_DIR)
    build_tree_image(fmt.name, job["from"], output, options,
                     files=job.get("files") or None, where=f"[images.{job['name']}.files]",
                     scratch=job.get("scratch"), digest_store=digest_store)
