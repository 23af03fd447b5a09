"""Sizes and durations as people write them: "64M", "1G", "min"; "30s", "5m", "1h".

Units are binary (K = 1024). Both parsers raise ValueError with a message that says what
is accepted; callers turn it into a RecipeError or an argparse error naming the place.
"""

from __future__ import annotations

import re

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_size(value: object) -> int | None:
    """``"64M"``, ``"1G"``, ``"512K"``, ``"4096"``, an integer of bytes; ``"min"`` is None."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        if value.strip().lower() == "min":
            return None
        m = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", value.strip(), re.IGNORECASE)
        if m and int(m.group(1)) > 0:
            return int(m.group(1)) * SIZE_UNITS[m.group(2).upper()]
    raise ValueError(f"size {value!r} is not like \"64M\", \"1G\", a byte count or \"min\"")


def parse_duration(value: object) -> float:
    """``"5m"``, ``"30s"``, ``"1h"`` or a positive number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"(\d+)\s*([smh]?)", value.strip())
        if m and int(m.group(1)) > 0:
            return float(int(m.group(1)) * TIME_UNITS[m.group(2)])
    raise ValueError(f"duration {value!r} is not like \"30s\", \"5m\", \"1h\" or seconds")
