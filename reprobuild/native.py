"""The optional compiled helpers (C files next to the modules that use them, built by
``setup.py``): each one loaded once, or None when it was not built or when
``REPROBUILD_PURE_PYTHON=1`` asks for the pure Python path. Callers keep that path and
use it whenever a helper is None; both give the same bytes (tests check it)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

PURE_PYTHON_VARIABLE = "REPROBUILD_PURE_PYTHON"


def load(module: str) -> ModuleType | None:
    """The compiled ``module`` (a dotted name), or None (not built, or not wanted)."""
    if os.environ.get(PURE_PYTHON_VARIABLE, "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
