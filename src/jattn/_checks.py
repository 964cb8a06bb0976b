"""The argument checks every jattn module uses, so each refusal reads the same."""

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


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (NumPy's included); a TypeError naming ``name`` otherwise, so
    that ``causal="no"`` is not read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)
