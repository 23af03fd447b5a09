"""The signed binary cache: share outputs between stores through a directory, HTTP or S3.

A cache holds, under one URL prefix::

    cache-info                  {"format": ..., "priority": N} (see reprobuild.cache.layout)
    objects/BLAKE3.tar.zst      an output as a deterministic tar, zstd-compressed, named by
                                the blake3 of the compressed bytes
    meta/DERIVATION.json        a DSSE envelope over the entry's metadata, signed (ed25519)
    logs/DERIVATION.log         the build log
    records/DERIVATION.json     the in-toto build record

Writers upload the object first and the signed metadata last, so a reader never sees
metadata whose object is missing. Readers trust nothing but a trusted key's signature:
the object's hash and size, and the output's hash, are checked against it.
"""
