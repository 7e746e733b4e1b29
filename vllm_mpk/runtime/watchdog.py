"""The watchdog's bound on any wait inside the megakernel, ``timeout_s``: its default and the
range it may take. The kernel counts it in int64 nanoseconds of the GPU's global timer."""

from __future__ import annotations

from typing import Any

DEFAULT_TIMEOUT_S = 2.0
MAX_TIMEOUT_S = 3600.0  # a wait of an hour is a hang; the bound keeps the nanoseconds far inside int64
TIMEOUT_RANGE = f"a positive number of seconds, at most {MAX_TIMEOUT_S:g}"


def check_timeout_s(value: Any) -> float:
    """``value`` as seconds for the watchdog; ValueError unless a number in (0, MAX_TIMEOUT_S]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s must be {TIMEOUT_RANGE}, got {value!r}")
    return float(value)
