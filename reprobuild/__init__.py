"""reprobuild: reproducible filesystem and disk images, built unprivileged, with proof."""

__version__ = "0.1.0"

__all__ = ["__version__"]
