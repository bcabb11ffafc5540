"""Sizes and durations as operators write them in the config: "512MiB", "75%", "500ms", "5m"."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_UNIT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([a-zA-Z%]*)\s*$")


def _split(value: object, numbers: tuple[type, ...], example: str) -> tuple[float, str]:
    """(number, lower-case unit) from a bare number or a string like "512MiB"."""
    if isinstance(value, numbers) and not isinstance(value, bool):
        return float(value), ""
    match = _NUMBER_UNIT.match(str(value)) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"expected {example}, got {value!r}")
    return float(match.group(1)), match.group(2).lower()


def parse_size(value: object, total: int | None = None) -> int:
    """Bytes from an int, "512MiB", "2GB" or, when `total` is given, "75%" of it."""
    number, unit = _split(value, (int,), "a size like '512MiB' or '75%'")
    if number < 0:
        raise ValueError(f"a size cannot be negative: {value!r}")
    if unit == "%":
        if total is None:
            raise ValueError(f"a percentage makes no sense here: {value!r}")
        if number > 100:
            raise ValueError(f"a percentage above 100 makes no sense: {value!r}")
        return int(total * number / 100)
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {unit!r} in {value!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB or %)")
    return int(number * _SIZE_UNITS[unit])


def parse_duration(value: object, allow_forever: bool = False) -> float:
    """Seconds from a number or "500ms", "30s", "5m", "1h". With allow_forever, -1 means math.inf."""
    number, unit = _split(value, (int, float), "a duration like '500ms', '30s' or '5m'")
    if unit not in _DURATION_UNITS:
        raise ValueError(f"unknown duration unit {unit!r} in {value!r} (use ms, s, m, h or d)")
    if allow_forever and number == -1:
        return math.inf
    if number < 0 or not math.isfinite(number):
        raise ValueError(f"a duration must be zero or more{' (or -1 for never)' if allow_forever else ''}: {value!r}")
    return number * _DURATION_UNITS[unit]
