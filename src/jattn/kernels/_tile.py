"""The math of one ``[block_q, block_kv]`` tile, shared by the Triton and the Mosaic TPU kernels.

Everything here works on values already loaded from refs, so both lowerings call the same
functions and differ only in how tiles reach them (a loop over a kv-tile list on GPU, a grid axis
over a prefetched list on TPU). Running statistics are kept as 2-D ``[block_q, 1]`` columns: TPU
Mosaic has no cheap 1-D <-> 2-D reshapes, and Triton is indifferent.

A tile is *masked* (the layout said PARTIAL, or it crosses the end of the keys) or *full*; full
tiles call these functions with ``allowed=None`` and pay no elementwise masking at all.

A kernel that accumulates per-key gradients (dk, dv ``[bkv, H]``) wants its tiles *keys first*,
``[bkv, bq]``: then ``dv += pᵀ·dO`` and ``dk += dSᵀ·q`` take them as they come, with no transpose
through shared memory, and every matmul has ``bkv`` rows (Triton issues Hopper's wgmma only for
at least 64 rows). ``allowed_in_tile`` and ``probs_and_dscores`` take ``keys_first``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.core._common import MASK_VALUE, logits

LOG2_E = 1.4426950408889634


def exp(x):
    """``e ** x`` as ``2 ** (x · log2 e)``. On NVIDIA GPUs ``jnp.exp`` becomes libdevice's accurate
    ``expf``, about ten instructions around one ``ex2.approx``; ``exp2`` is that one instruction
    (and a multiply), and the softmax's exponentials compete with the matmuls for issue slots."""
    return jnp.exp2(x * LOG2_E)


def exp_of_difference(s, row):
    """``e ** (s - row)`` for a score ``s`` and its row's running max or log-sum-exp (``row >= s``
    where ``s`` is not masked; a masked ``s`` is MASK_VALUE or -inf, and the caller zeroes it).

    The difference is taken before the scaling by ``log2 e``. FlashAttention's fused form
    ``2 ** (s · log2 e - row · log2 e)``, one FFMA, rounds ``s · log2 e`` at the magnitude of
    ``s``: at a large finite additive mask (-1e10, T5X's) the exponent of ``s == row`` came out
    near +800 instead of 0, ``p`` was inf and the row NaN, and logits of 1e4-1e5 lost digits. The
    subtraction costs an FADD per score on the FMA pipe, not on the ``ex2`` unit that bounds it."""
    return jnp.exp2((s - row) * LOG2_E)


def evaluate_formula(formula, q_pos, kv_pos, q_vectors, kv_vectors, table_tile):
    """The ``[bq, bkv]`` bool mask of a tile from a static formula (see ``blocks.mask_formula``).

    Args:
      formula: nested tuple, e.g. ``("and", ("position", causal), ("segments", 0, 0))``.
      q_pos: int32 ``[bq, 1]`` query positions. kv_pos: int32 ``[1, bkv]`` key positions.
      q_vectors: per-query int32 columns ``[bq, 1]`` (padding validity, segment ids).
      kv_vectors: per-key int32 rows ``[1, bkv]``.
      table_tile: the tile of the compact table (int ``[bq, bkv]``) or None.
    """
    op = formula[0]
    if op == "position":  # a position-only mask evaluates its own predicate in the kernel
        return formula[1]._allowed(q_pos, kv_pos)
    if op == "padding":
        return (q_vectors[formula[1]] != 0) & (kv_vectors[formula[2]] != 0)
    if op == "segments":
        return q_vectors[formula[1]] == kv_vectors[formula[2]]
    if op == "table":
        return table_tile != 0
    if op == "not":
        return jnp.logical_not(evaluate_formula(formula[1], q_pos, kv_pos, q_vectors, kv_vectors, table_tile))
    parts = [evaluate_formula(f, q_pos, kv_pos, q_vectors, kv_vectors, table_tile) for f in formula[1:]]
    return (parts[0] & parts[1]) if op == "and" else (parts[0] | parts[1])


def allowed_in_tile(
    formula,
    q_start,
    kv_start,
    block_q,
    block_kv,
    q_len,
    kv_len,
    q_vectors,
    kv_vectors,
    table_tile,
    *,
    keys_first: bool = False,
):
    """The formula's mask of the tile at (q_start, kv_start), queries past ``q_len`` and keys past
    ``kv_len`` excluded. A padded query row must attend nothing: from positions alone a causal
    formula gives it keys no real query attends, and NaN there (an unfilled cache) would reach
    every row of the tile through ``0 · NaN``.

    With ``keys_first`` the tile is ``[bkv, bq]``: the query vectors are rows ``[1, bq]``, the key
    vectors columns ``[bkv, 1]`` and the table tile ``[bkv, bq]``.

    Returns:
      bool ``[bq, bkv]``, or ``[bkv, bq]`` with ``keys_first``.
    """
    q_axis, kv_axis = (1, 0) if keys_first else (0, 1)
    shape = (block_kv, block_q) if keys_first else (block_q, block_kv)
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, _along(q_axis, block_q), q_axis)
    kv_pos = kv_start + jax.lax.broadcasted_iota(jnp.int32, _along(kv_axis, block_kv), kv_axis)
    allowed = (q_pos < q_len) & (kv_pos < kv_len)
    if formula is not None:
        allowed = allowed & evaluate_formula(formula, q_pos, kv_pos, q_vectors, kv_vectors, table_tile)
    return jnp.broadcast_to(allowed, shape)


def _along(axis: int, size: int) -> tuple[int, int]:
    """The 2-D shape of ``size`` positions along ``axis``: ``(size, 1)`` or ``(1, size)``."""
    return (size, 1) if axis == 0 else (1, size)


def queries_used(allowed, *, keys_first: bool = False):
    """Which queries of a masked tile attend any key: bool ``[bq, 1]``; None for a full tile
    (``allowed`` None), whose queries all do."""
    if allowed is None:
        return None
    as_float = allowed.astype(jnp.float32)  # [bq, bkv], or [bkv, bq] keys first
    return jnp.max(as_float.T if keys_first else as_float, axis=1, keepdims=True) > 0


def keys_used(allowed, *, keys_first: bool = False):
    """Which keys of a masked tile any query attends: bool ``[bkv, 1]``; None for a full tile."""
    if allowed is None:
        return None
    as_float = allowed.astype(jnp.float32)
    return jnp.max(as_float if keys_first else as_float.T, axis=1, keepdims=True) > 0


def zero_unused(used, x):
    """``x`` ``[n, H]`` with the rows not ``used`` (``[n, 1]``; None: a full tile, all used) zeroed.

    A matmul that sums over the tile's queries or keys meets the unused ones with a zero weight,
    and ``0 · NaN`` is NaN: padding may hold NaN (an unfilled cache), so the rows it sums over are
    zeroed first. Only those: an operand that meets the unused rows in scores, whose masked entries
    are replaced, needs nothing, and a loop-invariant operand zeroed in every step costs a copy of
    it (the dk/dv kernel's k and v, the dq kernel's q and dO)."""
    return x if used is None else jnp.where(used, x, jnp.zeros_like(x))


def masked_logits(q, k, bias, allowed, *, scale, softcap):
    """Logits of a tile in float32 with masked entries at MASK_VALUE: (s [bq, bkv], tanh | None)."""
    s, capped = logits(q, k, bias, scale=scale, softcap=softcap, allowed=allowed)
    if allowed is not None:
        s = jnp.where(allowed, s, MASK_VALUE)
    return s, capped


def init_statistics(block_q: int, value_dim: int):
    """Running max ``m [bq, 1]``, sum ``l [bq, 1]`` and accumulator ``[bq, Hv]``, all float32."""
    return (
        jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, value_dim), jnp.float32),
    )


def online_softmax_step(stats, q, k, v, bias, allowed, *, scale, softcap, zeroing):
    """Fold one kv tile into the running softmax statistics (FlashAttention-2, Dao 2023).

    Args:
      stats: ``(m [bq, 1], l [bq, 1], acc [bq, Hv])`` float32.
      q: ``[bq, H]``; k: ``[bkv, H]``; v: ``[bkv, Hv]``; bias ``[bq, bkv]`` or None;
      allowed: bool ``[bq, bkv]`` for a masked tile, None for a full one.
      zeroing: ``allowed`` where the rows of v no query of the tile attends are zeroed, else None
        (``KernelConfig.for_zeroing``).
    """
    m, row_sum, acc = stats
    # p·v sums over the keys; q and k reach only s, whose masked entries are replaced
    v = zero_unused(keys_used(zeroing), v)
    s, _ = masked_logits(q, k, bias, allowed, scale=scale, softcap=softcap)  # [bq, bkv]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [bq, 1]
    p = exp_of_difference(s, m_new)
    if allowed is not None:
        p = jnp.where(allowed, p, 0.0)
    alpha = exp(m - m_new)
    pv = jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return m_new, alpha * row_sum + jnp.sum(p, axis=1, keepdims=True), alpha * acc + pv


def finish_statistics(stats, empty_lse: float = 0.0):
    """``(out [bq, Hv] float32, lse [bq, 1] float32)``; rows that attended nothing give out 0 and
    lse ``empty_lse`` (``MASK_VALUE`` when partial softmaxes are merged, so they weigh nothing)."""
    m, row_sum, acc = stats
    attended = row_sum > 0
    safe_sum = jnp.where(attended, row_sum, 1.0)
    return acc / safe_sum, jnp.where(attended, m + jnp.log(safe_sum), empty_lse)


def probs_and_dscores(q, k, v, d_out, lse, delta, bias, allowed, *, scale, softcap, keys_first=False):
    """Recompute a tile's probabilities from the saved log-sum-exp and form dS.

    Args:
      q ``[bq, H]``, k ``[bkv, H]``, v ``[bkv, Hv]``, d_out ``[bq, Hv]``; lse, delta ``[bq, 1]``
      float32 (delta = rowsum(dO ∘ O)); bias ``[bq, bkv]`` or None; allowed as in
      ``online_softmax_step``. With ``keys_first``: lse and delta ``[1, bq]``, bias and allowed
      ``[bkv, bq]``.
    Returns:
      ``(p, ds)``, ``[bq, bkv]`` (``[bkv, bq]`` keys first) float32, ds through the softcap and
      before ``scale``. Their masked entries are exact zeros even where q, k, v or dO hold NaN;
      the gradient matmuls zero the rows they sum over (``zero_unused``).
    """
    # Keys first, the same products transposed: S = (k·qᵀ)·scale and dP = v·dOᵀ.
    (rows, columns), (d_rows, d_columns) = ((k, q), (v, d_out)) if keys_first else ((q, k), (d_out, v))
    s, capped = masked_logits(rows, columns, bias, allowed, scale=scale, softcap=softcap)
    dp = jax.lax.dot_general(d_rows, d_columns, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    p = exp_of_difference(s, lse)
    ds = p * (dp - delta)
    if capped is not None:
        ds = ds * (1.0 - capped * capped)
    if allowed is not None:  # where dP is NaN (an unused row of v or dO), p · (dP - delta) is too
        p = jnp.where(allowed, p, 0.0)
        ds = jnp.where(allowed, ds, 0.0)
    return p, ds


def matmul(a, b, *, transpose_a: bool = False):
    """``a @ b`` (or ``aᵀ @ b``) in float32, operands cast to b's dtype."""
    contract = (0,) if transpose_a else (1,)
    return jax.lax.dot_general(
        a.astype(b.dtype), b, ((contract, (0,)), ((), ())), preferred_element_type=jnp.float32
    )
