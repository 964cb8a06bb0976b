"""Position encodings: sinusoidal tables (Vaswani et al. 2017) and rotary (Su et al. 2021, RoFormer).

Learned absolute positions are an ``nnx.Embed`` in the models; these are the parameter-free ones.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jattn._checks import check_int

POSITION_KINDS = ("learned", "sinusoidal", "rotary", "none")


def sinusoidal_table(max_len: int, width: int) -> np.ndarray:
    """``[max_len, width]`` float32: sin on even features, cos on odd, wavelengths 2π … 10000·2π."""
    positions = np.arange(max_len)[:, None]  # [L, 1]
    rates = 1.0 / 10000 ** (np.arange(0, width, 2) / width)  # [ceil(D/2)]
    angles = positions * rates  # [L, ceil(D/2)]
    table = np.zeros((max_len, width), np.float32)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : width // 2])
    return table


def apply_rotary(x, *, base: float = 10000.0, offset: int = 0):
    """Rotate feature pairs of ``x [B..., L, N, H]`` by position-dependent angles (H even).

    Pairs are (first half, second half) of the head dim; the result has x's dtype, the rotation is
    computed in float32. ``offset`` is the position of x's first row (``S - T`` for T new queries
    decoded after a cache of keys, as in ``jattn.masks.causal(offset)``).
    """
    if getattr(x, "ndim", 0) < 3:
        raise ValueError(f"apply_rotary takes x of shape [B..., L, N, H], got shape {jnp.shape(x)}")
    offset = check_int("offset", offset, minimum=0)
    length, head_dim = x.shape[-3], x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary position encoding needs an even head dim, got head_dim={head_dim}")
    half = head_dim // 2
    rates = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    angles = jnp.arange(offset, offset + length, dtype=jnp.float32)[:, None] * rates  # [L, H/2]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]  # [L, 1, H/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B..., L, N, H/2] each
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
