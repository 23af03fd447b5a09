"""Image writers and readers; the table of formats is in :mod:`reprobuild.images.registry`."""
