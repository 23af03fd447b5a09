"""Integrity metadata over image bytes: fs-verity digests and dm-verity hash trees.

Pure Python over :mod:`hashlib`; no device mapper, no ioctl, no loop devices.
:mod:`reprobuild.integrity.fsverity` computes the digest ``fsverity digest`` prints (of
a composefs image, that is its composefs digest); :mod:`reprobuild.integrity.verity` writes and
checks veritysetup's format 1 hash trees.
"""
