"""The watchdog's bound on any wait inside the megakernel, ``timeout_s``: its default and the
range it may take. The kernel counts it in int64 nanoseconds of the GPU's global timer."""

from __future__ import annotations

from typing import Any

DEFAULT_TIMEOUT_S = 2.0
# Below a millisecond an ordinary wait for a tile's inputs trips the watchdog (and below a
# nanosecond the bound is 0): a step could never finish.
MIN_TIMEOUT_S = 1e-3
MAX_TIMEOUT_S = 3600.0  # a wait of an hour is a hang; the bound keeps the nanoseconds far inside int64
TIMEOUT_RANGE = f"a number of seconds from {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}"


def check_timeout_s(value: Any) -> float:
    """``value`` as seconds for the watchdog; ValueError unless a number in [MIN_TIMEOUT_S, MAX_TIMEOUT_S]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s must be {TIMEOUT_RANGE}, got {value!r}")
    return float(value)
