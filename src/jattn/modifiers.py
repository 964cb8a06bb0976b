"""Score modifiers that become an additive ``bias``: ALiBi (Press et al. 2022).

``attention(q, k, v, bias=alibi_bias(num_heads, T, S))`` adds ``-slope_n · |t - s|`` to head n's
logits, so nearer keys score higher without any position embedding.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jattn._checks import check_int


def alibi_slopes(num_heads: int):
    """Per-head slopes ``[N]``: the geometric sequence 2^(-8/n), 2^(-16/n), ... of the paper, with the
    paper's interleaving when ``num_heads`` is not a power of two."""
    num_heads = check_int("num_heads", num_heads)

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(closest)
    if closest < num_heads:
        slopes += geometric(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, q_len: int, kv_len: int | None = None, *, offset: int = 0):
    """ALiBi bias ``[N, T, S]``: ``-slope_n · |t + offset - s|``.

    Args:
      num_heads: N. q_len: T. kv_len: S (defaults to T).
      offset: position of the first query among the keys (e.g. ``S - T`` when decoding with a cache).
    """
    q_len = check_int("q_len", q_len)
    kv_len = q_len if kv_len is None else check_int("kv_len", kv_len)
    offset = check_int("offset", offset, minimum=0)
    distance = jnp.abs(jnp.arange(q_len)[:, None] + offset - jnp.arange(kv_len)[None, :])  # [T, S]
    return -alibi_slopes(num_heads)[:, None, None] * distance.astype(jnp.float32)
