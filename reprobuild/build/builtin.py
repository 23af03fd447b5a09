"""Built-in steps, run inside the sandbox: ``python -m reprobuild.build.builtin JOB_JSON``.

The engine describes the job (format, options, input and output paths inside the
sandbox) as JSON on the command line; errors go to the log and the exit status is 1.
"""

from __future__ import annotations

import contextlib
import json
import sys

from reprobuild.errors import EXIT_DISK_FULL, DiskFullError, ImageTooSmall, ReprobuildError
from reprobuild.images.build import build_image


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m reprobuild.build.builtin JOB_JSON", file=sys.stderr)
        return 2
    job = json.loads(argv[0])
    error: ReprobuildError
    try:
        build_image(job)
    except ImageTooSmall as exc:
        error = exc.for_image(str(job.get("name")))  # name the recipe key, not --size
    except ReprobuildError as exc:
        error = exc
    else:
        print(f"wrote {job.get('format')} image {job.get('name')}", file=sys.stderr)
        return 0
    # The log may be on the full disk too: the status alone must say so.
    with contextlib.suppress(OSError):
        print(f"reprobuild builtin: {job.get('format')} image {job.get('name')}: {error}",
              file=sys.stderr, flush=True)
    return EXIT_DISK_FULL if isinstance(error, DiskFullError) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
