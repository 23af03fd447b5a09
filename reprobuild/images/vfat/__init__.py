"""FAT12/16/32 images with VFAT long names (``format = "vfat"``), for EFI system partitions.

``geometry`` chooses the FAT type and layout as ``mkfs.fat`` does, ``names`` turns tree
names into long-name entries and 8.3 aliases, ``layout`` plans clusters and directories,
``image`` writes and reads (the :class:`~reprobuild.images.protocol.TreeFormat` module),
``ondisk`` holds the on-disk structures.
"""
