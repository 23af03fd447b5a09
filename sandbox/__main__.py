"""``python -m sandbox``: run one command in a sandbox described on the command line.

For debugging: ``--debug`` prints every namespace and mount operation as a shell command
(``+ mount ...``) on stderr before doing it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sandbox.errors import SandboxError
from sandbox.runner import start
from sandbox.spec import Mount, SandboxSpec

EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_USAGE = 2


def _mount(text: str, *, writable: bool) -> Mount:
    host, sep, target = text.partition(":")
    if not sep or not host or not target:
        raise argparse.ArgumentTypeError(f"expected HOST:TARGET, got {text!r}")
    return Mount(os.path.abspath(host), target, writable=writable)


def _env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key, value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="print every namespace and mount operation on stderr")
    parser.add_argument("--ro", action="append", default=[], metavar="HOST:TARGET",
                        type=lambda t: _mount(t, writable=False), help="read-only mount")
    parser.add_argument("--rw", action="append", default=[], metavar="HOST:TARGET",
                        type=lambda t: _mount(t, writable=True), help="writable mount")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", type=_env)
    parser.add_argument("--timeout", type=float, metavar="S")
    parser.add_argument("--epoch", type=int, default=0, help="SOURCE_DATE_EPOCH")
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--cwd", default="/build")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="use this terminal for stdin, stdout and stderr")
    parser.add_argument("command", nargs="+", metavar="CMD")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    spec = SandboxSpec(argv=tuple(args.command), mounts=(*args.ro, *args.rw),
                       env=tuple(args.env), cwd=args.cwd, epoch=args.epoch,
                       cores=args.cores, timeout=args.timeout,
                       interactive=args.interactive, debug=args.debug)
    try:
        with start(debug=args.debug) as runner:
            sys.stdout.flush()
            result = runner.run(spec, log_fd=sys.stdout.fileno() if not args.debug
                                else sys.stderr.fileno())
    except SandboxError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if result.timed_out:
        print(f"sandbox: timed out after {args.timeout} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if result.signal is not None:
        return 128 + result.signal
    return result.returncode if result.returncode is not None else 1


if __name__ == "__main__":
    sys.exit(main())
