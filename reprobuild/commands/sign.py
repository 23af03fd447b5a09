"""`reprobuild sign`: sign build records with an ed25519 key (DSSE envelopes)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from reprobuild.errors import ReprobuildError
from reprobuild.proof import signing

HELP = "sign build records with an ed25519 key, verify signed records, or make a key pair"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("records", nargs="*", metavar="RECORD",
                        help="build record files (in-toto statements) to sign")
    parser.add_argument("--key", metavar="KEY", help="ed25519 private key (PEM)")
    parser.add_argument("--generate-key", metavar="KEY",
                        help="write a new key pair: KEY (mode 0600) and KEY.pub")
    parser.add_argument("--verify", action="store_true",
                        help="verify signed records instead: --key is then a public (or "
                             "private) key; exit 1 when one does not verify")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="where to write the envelope (one record only; "
                             "default RECORD.dsse)")


def run(args: argparse.Namespace) -> int:
    if args.generate_key:
        private, public = signing.generate_key(args.generate_key)
        kid = signing.key_id(signing.load_public_key(public))
        print(f"private key: {private}\npublic key: {public}\nkey id: {kid}")
        if not args.records:
            return 0
    if not args.records:
        raise ReprobuildError("nothing to sign", hint="give RECORD files and --key KEY")
    if not (args.key or args.generate_key):
        raise ReprobuildError("no signing key given", hint="use --key KEY")
    if args.verify:
        verifier = signing.load_public_key(args.key or args.generate_key)
        keys = {signing.key_id(verifier): verifier}
        for name in args.records:
            loaded = signing.load_record(name, keys)
            print(f"{name}: OK, {loaded.record.target} ({loaded.record.derivation_id}) "
                  f"signed by {loaded.signer}")
        return 0
    if args.output and len(args.records) != 1:
        raise ReprobuildError("--output works with one record only")
    key = signing.load_private_key(args.key or args.generate_key)
    for name in args.records:
        loaded = signing.load_record(name)
        if loaded.signed:
            raise ReprobuildError(f"{name} is already a signed envelope",
                                  hint="sign the plain record instead")
        payload = Path(name).read_bytes()
        envelope = signing.sign_payload(payload, key)
        target = Path(args.output or os.fspath(name) + ".dsse")
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(envelope)
        partial.replace(target)
        print(f"{target}")
    return 0
