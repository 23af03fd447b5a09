"""reprobuild cluster-certs: make a Dask cluster's CA and TLS certificates."""

from __future__ import annotations

import argparse

from reprobuild.distributed.certs import make_certs

HELP = "make a CA and TLS certificates for the scheduler, workers and clients"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="where to write them (new files)")
    parser.add_argument("--host", action="append", default=[], metavar="NAME",
                        help="a host name or address to name in the certificates "
                             "(localhost and 127.0.0.1 always are)")


def run(args: argparse.Namespace) -> int:
    for path in make_certs(args.directory, hosts=args.host):
        print(path)
    return 0
