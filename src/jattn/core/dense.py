"""``implementation="xla"``: dense softmax attention that materializes the [T, S] scores.

O(T·S) memory; the clearest statement of the math and the fastest choice for short sequences.
Written for one head and vmapped over heads and batch (see ``_batching.vmap_over_heads``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.core._batching import vmap_over_heads
from jattn.core._common import MASK_VALUE, logits, zero_unattended


def softmax_weights_one_head(q, k, allowed=None, bias=None, *, scale: float, softcap=None):
    """The attention weights softmax(q kᵀ · scale + bias) of one head, over the allowed keys.

    Args:
      q: ``[T, H]``. k: ``[S, H]``, both with the rows ``allowed`` leaves unattended already
        zeroed (``zero_unattended``), so NaN padding cannot leak.
      allowed: bool ``[T, S]`` or None. bias: ``[T|1, S|1]`` or None.
    Returns:
      float32 ``[T, S]``; zero where not allowed and on rows with nothing allowed.
    """
    s, _ = logits(q, k, bias, scale=scale, softcap=softcap, allowed=allowed)  # [T, S] float32
    if bias is not None:  # a bias of -inf or float32's min leaves a key out (reference.MASKED_LOGIT)
        kept = ~(s <= MASK_VALUE)  # NaN stays in, so it shows
        allowed = kept if allowed is None else allowed & kept
    if allowed is None:
        return jax.nn.softmax(s, axis=-1)
    # A row with nothing allowed is all MASK_VALUE, so its softmax is finite; the where zeroes it.
    probs = jax.nn.softmax(jnp.where(allowed, s, MASK_VALUE), axis=-1)
    return jnp.where(allowed, probs, 0.0)


def dense_attention_one_head(q, k, v, allowed=None, bias=None, *, scale: float, softcap=None):
    """softmax(q kᵀ · scale + bias) v for one head.

    Args:
      q: ``[T, H]``. k: ``[S, H]``. v: ``[S, Hv]``.
      allowed: bool ``[T, S]`` or None. bias: ``[T|1, S|1]`` or None.
    Returns:
      ``[T, Hv]`` in q's dtype; rows with nothing allowed are zero.
    """
    if allowed is not None:
        q, k, v = zero_unattended(allowed, q, k, v)
    probs = softmax_weights_one_head(q, k, allowed, bias, scale=scale, softcap=softcap)  # [T, S]
    out = jnp.einsum("ts,sh->th", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def dense_attention(q, k, v, mask, bias, *, scale: float, softcap=None):
    """Canonical-layout entry: q ``[B, T, N, H]``, k/v ``[B, S, K, H]`` -> ``[B, T, N, Hv]``.

    ``mask`` is a canonical ``jattn.masks.Mask`` (leaves ``[B|1, N|1, ...]``) or None;
    ``bias`` is ``[B|1, N|1, T|1, S|1]`` or None.
    """
    q_len, kv_len = q.shape[1], k.shape[1]

    def per_head(q_h, k_h, v_h, ops):
        mask_h, bias_h = ops
        allowed = None
        if mask_h is not None:
            allowed = mask_h.tile(jnp.arange(q_len), jnp.arange(kv_len))  # [T, S]
        return dense_attention_one_head(q_h, k_h, v_h, allowed, bias_h, scale=scale, softcap=softcap)

    return vmap_over_heads(per_head, q, k, v, (mask, bias))
