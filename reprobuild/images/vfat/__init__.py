"""FAT12/16/32 images with VFAT long names (``format = "vfat"``), for EFI system partitions.

``geometry`` chooses the FAT type and layout as ``mkfs.fat`` does, ``names`` turns tree
names into long-name entries and 8.3 aliases, ``layout`` plans clusters and directories,
``write`` serialises the plan (``data`` streams the directories and files into the data
area), ``read`` reads an image back, ``image`` is the
:class:`~reprobuild.images.protocol.TreeFormat` module, ``ondisk`` holds the on-disk
structures.
"""
