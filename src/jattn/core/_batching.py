"""vmap a per-head attention function over batch and heads, grouped-query aware.

Implementations are written for one head: ``fn(q [T, H], k [S, H], v [S, Hv], *operands)``.
``vmap_over_heads`` lifts such a function to ``q [B, T, N, H]``, ``k/v [B, S, K, H]``: it vmaps
over the batch, over the K key/value heads, and over the G = N / K query heads that share each
key/value head, with k and v *not* mapped in that last vmap, so they are never repeated in memory.

Per-head operands (masks, biases) are pytrees whose array leaves have leading ``[B|1, N|1]``
dims; a dim of size 1 is broadcast (not mapped), so a bias shared by all heads is not copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def _split(tree: Any, size: int, name: str):
    """Leaves [size|1, ...] -> (leaves with that dim removed where 1, in_axes pytree)."""
    leaves, treedef = jax.tree.flatten(tree)
    axes: list[int | None] = []
    out = []
    for leaf in leaves:
        if leaf.shape[0] == size and size != 1:
            out.append(leaf)
            axes.append(0)
        elif leaf.shape[0] == 1:
            out.append(leaf[0])
            axes.append(None)
        else:
            raise ValueError(f"{name} dim of an operand is {leaf.shape[0]}, expected {size} or 1")
    return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, axes)


def _group_heads(leaf, num_kv_heads: int, group: int):
    """[N|1, ...] -> [K|1, G|1, ...]."""
    if leaf.shape[0] == 1:
        return leaf.reshape(1, 1, *leaf.shape[1:])
    return leaf.reshape(num_kv_heads, group, *leaf.shape[1:])


def vmap_over_heads(per_head: Callable[..., Any], q, k, v, operands: Any = ()):
    """Apply ``per_head(q [T,H], k [S,H], v [S,Hv], operands) -> [T, Hv]`` to every head.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]``.
      operands: pytree of arrays with leading ``[B|1, N|1]`` dims.
    Returns:
      ``[B, T, N, Hv]``.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads

    def one_kv_head(q_k, k_h, v_h, ops_k):  # q_k [T, G, H], leaves [G|1, ...]
        ops_g, axes = _split(ops_k, group, "query-group")
        fn = jax.vmap(per_head, in_axes=(1, None, None, axes), out_axes=1)
        return fn(q_k, k_h, v_h, ops_g)  # [T, G, Hv]

    def one_batch(q_b, k_b, v_b, ops_b):  # q_b [T, N, H], k_b [S, K, H], leaves [N|1, ...]
        q_b = q_b.reshape(q_len, num_kv_heads, group, head_dim)
        ops_b = jax.tree.map(lambda x: _group_heads(x, num_kv_heads, group), ops_b)
        ops_k, axes = _split(ops_b, num_kv_heads, "key/value-head")
        fn = jax.vmap(one_kv_head, in_axes=(1, 1, 1, axes), out_axes=1)
        out = fn(q_b, k_b, v_b, ops_k)  # [T, K, G, Hv]
        return out.reshape(q_len, num_heads, out.shape[-1])

    ops, axes = _split(operands, batch, "batch")
    return jax.vmap(one_batch, in_axes=(0, 0, 0, axes))(q, k, v, ops)
