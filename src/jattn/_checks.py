"""The argument checks every jattn module uses, so each refusal reads the same."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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


def check_prng_key(key, *, none_allowed: bool = False):
    """``key`` if it is one PRNG key: a typed key (``jax.random.key``, shape ``()``) or a legacy
    uint32 ``[2]``; a TypeError naming ``key`` otherwise (saying None is accepted too where
    ``none_allowed``: the caller handles None itself)."""
    shape, dtype = getattr(key, "shape", None), getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    if (typed and shape == ()) or (not typed and dtype == jnp.uint32 and shape == (2,)):
        return key
    got = f"{dtype} array of shape {shape}" if shape is not None else f"{type(key).__name__} {key!r}"
    raise TypeError(
        "key must be a single PRNG key (jax.random.key(seed), shape (); or a legacy "
        f"jax.random.PRNGKey(seed), uint32 of shape (2,)){' or None' if none_allowed else ''}, got "
        f"{got}; for several draws, call once per key (or jax.vmap over the keys)"
    )
