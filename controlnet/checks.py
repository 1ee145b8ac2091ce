"""The value rules every layer shares: a finite float in a range, an integer in a range, a sampling window.

One home for each rule: the stack (``StackEntry``), the preprocessors and the nodes all call these, so a bad value
gets the same message wherever it enters. Every message names the input and says what was expected; the error is
``ControlNetError`` (a ``ValueError``). NaN needs its own test because it fails every comparison: ``lo <= nan``
is False, and so is ``nan < lo`` — which is why the host's own min / max validation lets it through.
"""

from __future__ import annotations

import math
import numbers

from .errors import ControlNetError

__all__ = ["finite_float", "check_int", "check_window"]


def finite_float(name: str, value: object, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a float; refuses non-numbers, NaN, +-inf and (when given) values outside [lo, hi]."""
    # bool is an Integral; True as a strength is a wiring mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ControlNetError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ControlNetError(f"{name}: expected a finite number, got {x}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ControlNetError(f"{name}: expected a number in [{lo_s}, {hi_s}], got {x:g}")
    return x


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int; refuses bools, floats (even 512.0: a float here is a wiring mistake) and values
    outside [lo, hi]. numpy integers are accepted (they are ``numbers.Integral``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ControlNetError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    n = int(value)
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        lo_s = "" if lo is None else str(lo)
        hi_s = "" if hi is None else str(hi)
        raise ControlNetError(f"{name}: expected an int in {lo_s}..{hi_s}, got {n}")
    return n


def check_window(start_percent: object, end_percent: object, where: str = "") -> tuple[float, float]:
    """A sampling window: 0 <= start_percent <= end_percent <= 1. ``where`` (e.g. the node) prefixes messages."""
    prefix = f"{where}: " if where else ""
    start = finite_float(prefix + "start_percent", start_percent, 0.0, 1.0)
    end = finite_float(prefix + "end_percent", end_percent, 0.0, 1.0)
    if start > end:
        raise ControlNetError(
            f"{prefix}start_percent ({start:g}) must not be after end_percent ({end:g}): the window is start..end "
            "of sampling progress"
        )
    return start, end
