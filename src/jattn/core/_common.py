"""Pieces of the softmax-attention math shared by the pure-JAX implementations."""

from __future__ import annotations

import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
"""Finite stand-in for -inf on masked logits: exp(MASK_VALUE - m) is 0 and never NaN."""


def logits(q, k, bias, *, scale: float, softcap: float | None):
    """Scaled scores of one tile in float32, then bias, then tanh capping.

    The scale multiplies q ([T, H]) rather than the scores ([T, S]): one pass over T·H values instead
    of T·S, and one [T, S] buffer fewer in XLA's dense forward.

    Args:
      q: ``[T, H]``. k: ``[S, H]``. bias: ``[T|1, S|1]`` or None.
    Returns:
      ``(s [T, S] float32, tanh [T, S] | None)``; the tanh is kept for the softcap gradient.
    """
    s = jnp.einsum("th,sh->ts", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if softcap is None:
        return s, None
    capped = jnp.tanh(s / softcap)
    return softcap * capped, capped


def zero_unattended(allowed, q, k, v):
    """Zero the rows of q (k, v) that no key (query) in ``allowed [T, S]`` pairs with.

    Masked positions may hold anything, NaN included (padding); after this they cannot reach an
    output or a gradient through ``0 · NaN``.
    """
    q = jnp.where(allowed.any(-1)[:, None], q, 0)
    kv_used = allowed.any(0)[:, None]
    return q, jnp.where(kv_used, k, 0), jnp.where(kv_used, v, 0)
