"""reprobuild worker: run a Dask worker that builds steps for `build --executor dask://…`."""

from __future__ import annotations

import argparse
import os

from reprobuild.commands.common import positive_int
from reprobuild.distributed.address import scheduler_address, tls_files
from reprobuild.distributed.worker import WorkerSettings, serve
from reprobuild.units import parse_size

HELP = "run a Dask worker that builds steps (one sandbox server, its own store)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", required=True, metavar="dask://HOST:PORT",
                        help="the Dask scheduler to join")
    parser.add_argument("--cache", required=True, metavar="URL",
                        help="the binary cache inputs come from and outputs go to")
    parser.add_argument("--key", required=True, metavar="FILE",
                        help="the signing key of this worker's outputs (never enters a "
                             "sandbox)")
    parser.add_argument("--trusted-keys", nargs="+", default=[], metavar="FILE",
                        help="other builders' public keys whose cache entries this worker "
                             "uses as inputs (its own key is always trusted)")
    parser.add_argument("--certs", metavar="DIR", default=None,
                        help="the `reprobuild cluster-certs` directory (ca.pem, worker.pem, "
                             "worker.key): connect with TLS")
    parser.add_argument("--insecure", action="store_true",
                        help="allow plain TCP to a non-loopback scheduler")
    parser.add_argument("--nthreads", type=positive_int, default=os.cpu_count() or 1,
                        metavar="N", help="steps run at once (default: number of cores)")
    parser.add_argument("--name", default=None, help="the worker's name in the cluster")
    parser.add_argument("--cores", type=positive_int, default=None, metavar="N",
                        help="the `cores` resource offered (default: number of cores)")
    parser.add_argument("--memory", type=parse_size, default=None, metavar="SIZE",
                        help="the `memory` resource offered (default: physical memory)")


def run(args: argparse.Namespace) -> int:
    resources: dict[str, float] = {}
    if args.cores is not None:
        resources["cores"] = float(args.cores)
    if args.memory is not None:
        resources["memory"] = float(args.memory)
    settings = WorkerSettings(
        scheduler=scheduler_address(args.scheduler, tls=args.certs is not None,
                                    insecure=args.insecure),
        tls=tls_files(args.certs, "worker"), cache_url=args.cache, key_path=args.key,
        trusted_keys=args.trusted_keys, store=args.store, nthreads=args.nthreads,
        name=args.name, resources=resources, debug=args.debug)
    serve(settings)
    return 0
