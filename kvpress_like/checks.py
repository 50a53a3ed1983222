"""Argument checks shared by every layer of the package (it imports nothing from it).

Each check returns the value it accepted (a ratio as a ``float``) and raises early with a message that names the
argument, what it got and what is allowed.
"""

from __future__ import annotations

import math
from numbers import Real


def check_ratio(value, name: str = "ratio") -> float:
    """A fraction of the context's KV pairs removed: a real number in [0, 1), returned as ``float``.

    Raises:
        TypeError: not a number (``bool`` included).
        ValueError: NaN or outside [0, 1).
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number in [0, 1) (fraction of the context's KV pairs removed); "
                        f"got {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (0 keeps everything, 0.6 keeps 40 %); got {value!r}")
    return value


def check_int(name: str, value, minimum: int = 0) -> int:
    """An ``int`` (not ``bool``) of at least ``minimum``.

    Raises:
        ValueError: anything else; the message says "a non-negative int" (``minimum`` 0), "a positive int" (1) or
            "an int >= minimum".
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return value


def check_odd_kernel(name: str, value) -> int:
    """A pooling width: a positive odd ``int`` (not ``bool``), so the window is centred on each token.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be a positive odd int; got {value!r}")
    return value
