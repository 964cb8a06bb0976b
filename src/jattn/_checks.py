"""The one integer-argument check every jattn module uses, so each refusal reads the same."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as a Python ``int`` (NumPy integers accepted, ``bool`` not).

    Raises TypeError naming ``name`` when it is not an integer, ValueError when it is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={int(value)}")
    return int(value)
