"""``implementation="chunked"``: blockwise online-softmax attention in pure JAX.

Exact, O(T + S) memory for forward *and* backward on every backend (Rabe & Staats 2021;
Dao et al. 2022, FlashAttention's algorithm without a custom kernel):

* forward: for each query block, a loop over the key/value blocks that the mask's block layout
  lists as non-empty keeps a running max ``m``, sum ``l`` and accumulator in float32, and saves
  ``out`` and the log-sum-exp ``lse = m + log l``;
* backward (``jax.custom_vjp``): recomputes each tile's probabilities from ``lse``; one pass over
  query blocks gives dq (and the bias gradient), one pass over key/value blocks gives dk and dv.
  Deterministic, no scatter-adds.

Tiles the layout marks EMPTY are never visited (so a causal mask costs about half of full, a
sliding window O(T·w)); FULL tiles skip the elementwise mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jattn import masks as masks_lib
from jattn.core._batching import vmap_over_heads
from jattn.core._common import (
    MASK_VALUE,
    first_order_only,
    logits,
    varying_axes,
    varying_over,
    zero_unattended,
)

DEFAULT_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static schedule of one call: block sizes and, per block row/column, the tiles to visit."""

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    kv_ids: tuple  # [nq][<= nk] key/value block indices visited by each query block
    q_ids: tuple  # [nk][<= nq] query block indices visited by each key/value block
    masked: tuple  # [nq][nk] whether the tile needs the elementwise mask

    @property
    def num_q_blocks(self):
        return len(self.kv_ids)

    @property
    def num_kv_blocks(self):
        return len(self.q_ids)


def make_plan(layout: np.ndarray, q_len: int, kv_len: int, block_q: int, block_kv: int) -> _Plan:
    """Turn a block layout into visiting lists (EMPTY tiles dropped)."""
    nonempty = layout != masks_lib.EMPTY
    masked = layout == masks_lib.PARTIAL
    if kv_len % block_kv:
        masked[:, -1] = True  # the last key block runs past kv_len
    kv_ids = tuple(tuple(np.flatnonzero(row).tolist()) for row in nonempty)
    q_ids = tuple(tuple(np.flatnonzero(col).tolist()) for col in nonempty.T)
    return _Plan(q_len, kv_len, block_q, block_kv, kv_ids, q_ids, tuple(map(tuple, masked.tolist())))


def _ragged_table(rows: tuple) -> tuple[jax.Array, jax.Array]:
    """Visiting lists -> (ids [R, max_len] int32 padded with 0, counts [R] int32)."""
    width = max([len(r) for r in rows] + [1])
    ids = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return jnp.asarray(ids), jnp.asarray([len(r) for r in rows], jnp.int32)


def _block_indices(num_blocks: int) -> jax.Array:
    """``[num_blocks]`` int32 block indices, the dtype of the ``_ragged_table`` entries they meet in a
    tile's slice starts (``jnp.arange`` alone would give int64 under ``jax_enable_x64``)."""
    return jnp.arange(num_blocks, dtype=jnp.int32)


def _pad_rows(x, length: int):
    return jnp.pad(x, [(0, length - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _tile_start(shape: tuple[int, int], qi, kj, plan: _Plan) -> tuple:
    """Where tile (qi, kj) starts in a padded ``[T'|1, S'|1]`` array: int32 block offsets, 0 along a
    broadcast dim (an int32 0: a Python 0 is int64 under ``jax_enable_x64``, and ``dynamic_slice``
    takes starts of one dtype)."""
    row = qi * plan.block_q if shape[0] > 1 else jnp.int32(0)
    col = kj * plan.block_kv if shape[1] > 1 else jnp.int32(0)
    return row, col


def _bias_tile(bias, qi, kj, plan: _Plan):
    """The [block_q|1, block_kv|1] slice of a padded per-head bias [T'|1, S'|1]."""
    if bias is None:
        return None
    rows = plan.block_q if bias.shape[0] > 1 else 1
    cols = plan.block_kv if bias.shape[1] > 1 else 1
    return jax.lax.dynamic_slice(bias, _tile_start(bias.shape, qi, kj, plan), (rows, cols))


def _tile(q_blk, k_blk, v_blk, bias, mask, qi, kj, plan, cfg, apply_mask: bool):
    """Logits of tile (qi, kj) with the mask applied: (s [bq, bkv], tanh | None, allowed | None,
    q, k, v with unattended rows zeroed)."""
    allowed = None
    if apply_mask:
        q_idx = qi * plan.block_q + jnp.arange(plan.block_q)
        kv_idx = kj * plan.block_kv + jnp.arange(plan.block_kv)
        # Padded query rows attend nothing (a causal tile would give them keys no real query
        # attends, and NaN there would reach every row through 0 · NaN).
        allowed = (q_idx[:, None] < plan.q_len) & (kv_idx[None, :] < plan.kv_len)  # [bq, bkv]
        if mask is not None:
            allowed = allowed & mask.tile(q_idx, kv_idx)  # [bq, bkv]
        q_blk, k_blk, v_blk = zero_unattended(allowed, q_blk, k_blk, v_blk)
    s, capped = logits(q_blk, k_blk, _bias_tile(bias, qi, kj, plan), allowed=allowed, **cfg)
    if allowed is not None:
        s = jnp.where(allowed, s, MASK_VALUE)
    return s, capped, allowed, q_blk, k_blk, v_blk


def _blocks(x, block: int):
    return x.reshape(-1, block, x.shape[-1])


def _visitor(make_update, plan: _Plan):
    """``visit(qi, kj, carry)``: the tile update built by ``make_update(apply_mask)``, masked only
    where the plan says the tile needs it."""
    needs_mask = jnp.asarray(plan.masked, bool)  # [nq, nk]

    def visit(qi, kj, carry):
        return jax.lax.cond(needs_mask[qi, kj], make_update(True), make_update(False), qi, kj, carry)

    return visit


def _forward(q, k, v, mask, bias, plan: _Plan, cfg, empty_lse: float = 0.0):
    """q [T', H], k/v [S', H] padded to block multiples -> (out [T', Hv] f32, lse [T'] f32).

    Rows with nothing to attend get ``out`` 0 and ``lse = empty_lse``."""
    q_blocks, k_blocks, v_blocks = (
        _blocks(q, plan.block_q),
        _blocks(k, plan.block_kv),
        _blocks(v, plan.block_kv),
    )
    kv_ids, counts = _ragged_table(plan.kv_ids)

    def tile_update(apply_mask):
        def update(qi, kj, carry):
            m, row_sum, acc = carry
            s, _, allowed, _, _, v_blk = _tile(
                q_blocks[qi], k_blocks[kj], v_blocks[kj], bias, mask, qi, kj, plan, cfg, apply_mask
            )
            m_new = jnp.maximum(m, s.max(-1))  # [bq]
            p = jnp.exp(s - m_new[:, None])  # [bq, bkv]
            if allowed is not None:
                p = jnp.where(allowed, p, 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("ts,sh->th", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
            return m_new, alpha * row_sum + p.sum(-1), alpha[:, None] * acc + pv

        return update

    visit = _visitor(tile_update, plan)

    axes = varying_axes(q, k, v, mask, bias)

    def one_q_block(qi):
        init = (
            jnp.full((plan.block_q,), MASK_VALUE, jnp.float32),
            jnp.zeros((plan.block_q,), jnp.float32),
            jnp.zeros((plan.block_q, v.shape[-1]), jnp.float32),
        )
        init = tuple(varying_over(axes, x) for x in init)
        m, row_sum, acc = jax.lax.fori_loop(0, counts[qi], lambda j, c: visit(qi, kv_ids[qi, j], c), init)
        attends = row_sum > 0
        safe_sum = jnp.where(attends, row_sum, 1.0)
        out = acc / safe_sum[:, None]
        lse = jnp.where(attends, m + jnp.log(safe_sum), empty_lse)
        return out, lse

    out, lse = jax.lax.map(one_q_block, _block_indices(plan.num_q_blocks))
    return out.reshape(-1, v.shape[-1]), lse.reshape(-1)


def _probs_and_dscores(s, v_blk, do_blk, lse_blk, delta_blk, allowed, capped):
    """Recompute p [bq, bkv] from lse and form dS = p (dP - delta), through the softcap."""
    p = jnp.exp(s - lse_blk[:, None])  # [bq, bkv]
    if allowed is not None:
        p = jnp.where(allowed, p, 0.0)
    dp = jnp.einsum("th,sh->ts", do_blk, v_blk, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_blk[:, None])
    if capped is not None:
        ds = ds * (1.0 - capped * capped)
    return p, ds


def _backward(q, k, v, mask, bias, out, lse, do, plan: _Plan, cfg):
    """Gradients of the padded per-head problem: (dq, dk, dv, dbias)."""
    scale = cfg["scale"]
    q_blocks, do_blocks = _blocks(q, plan.block_q), _blocks(do, plan.block_q)
    k_blocks, v_blocks = _blocks(k, plan.block_kv), _blocks(v, plan.block_kv)
    lse_blocks = lse.reshape(-1, plan.block_q)
    delta_blocks = jnp.einsum("th,th->t", do.astype(jnp.float32), out).reshape(-1, plan.block_q)

    def tile_grads(qi, kj, apply_mask):
        s, capped, allowed, q_blk, k_blk, v_blk = _tile(
            q_blocks[qi], k_blocks[kj], v_blocks[kj], bias, mask, qi, kj, plan, cfg, apply_mask
        )
        do_blk = do_blocks[qi]
        if allowed is not None:
            do_blk = jnp.where(allowed.any(-1)[:, None], do_blk, 0)
        p, ds = _probs_and_dscores(s, v_blk, do_blk, lse_blocks[qi], delta_blocks[qi], allowed, capped)
        return p, ds, q_blk, k_blk, do_blk

    # dq (and dbias): rows of query blocks.
    kv_ids, kv_counts = _ragged_table(plan.kv_ids)

    def dq_update(apply_mask):
        def update(qi, kj, carry):
            dq, dbias = carry
            _, ds, _, k_blk, _ = tile_grads(qi, kj, apply_mask)
            dq = dq + scale * jnp.einsum(
                "ts,sh->th", ds.astype(k_blk.dtype), k_blk, preferred_element_type=jnp.float32
            )
            return dq, _accumulate_bias(dbias, ds, qi, kj, plan)

        return update

    dq_visit = _visitor(dq_update, plan)
    axes = varying_axes(q, k, v, mask, bias, out, lse, do)
    dbias0 = None if bias is None else varying_over(axes, jnp.zeros(bias.shape, jnp.float32))

    def dq_row(carry_bias, qi):
        init = (varying_over(axes, jnp.zeros((plan.block_q, q.shape[-1]), jnp.float32)), carry_bias)
        dq, carry_bias = jax.lax.fori_loop(
            0, kv_counts[qi], lambda j, c: dq_visit(qi, kv_ids[qi, j], c), init
        )
        return carry_bias, dq

    dbias, dq = jax.lax.scan(dq_row, dbias0, _block_indices(plan.num_q_blocks))

    # dk, dv: columns of key/value blocks.
    q_ids, q_counts = _ragged_table(plan.q_ids)

    def dkv_update(apply_mask):
        def update(qi, kj, carry):
            dk, dv = carry
            p, ds, q_blk, _, do_blk = tile_grads(qi, kj, apply_mask)
            dv = dv + jnp.einsum(
                "ts,th->sh", p.astype(do_blk.dtype), do_blk, preferred_element_type=jnp.float32
            )
            dk = dk + scale * jnp.einsum(
                "ts,th->sh", ds.astype(q_blk.dtype), q_blk, preferred_element_type=jnp.float32
            )
            return dk, dv

        return update

    dkv_visit = _visitor(dkv_update, plan)

    def dkv_column(kj):
        init = (
            varying_over(axes, jnp.zeros((plan.block_kv, k.shape[-1]), jnp.float32)),
            varying_over(axes, jnp.zeros((plan.block_kv, v.shape[-1]), jnp.float32)),
        )
        return jax.lax.fori_loop(0, q_counts[kj], lambda i, c: dkv_visit(q_ids[kj, i], kj, c), init)

    dk, dv = jax.lax.map(dkv_column, _block_indices(plan.num_kv_blocks))
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    return flat(dq), flat(dk), flat(dv), dbias


def _accumulate_bias(dbias, ds, qi, kj, plan: _Plan):
    """Add tile dS into the padded bias gradient [T'|1, S'|1], summing over broadcast dims."""
    if dbias is None:
        return None
    rows, cols = dbias.shape
    tile = ds
    if rows == 1:
        tile = tile.sum(0, keepdims=True)
    if cols == 1:
        tile = tile.sum(1, keepdims=True)
    start = _tile_start(dbias.shape, qi, kj, plan)
    current = jax.lax.dynamic_slice(dbias, start, tile.shape)
    return jax.lax.dynamic_update_slice(dbias, current + tile, start)


def pad_to_plan(q, k, v, bias, *, plan: _Plan):
    """Pad one head's q ``[T, H]``, k/v ``[S, H]`` and bias ``[T|1, S|1]`` (or None) with zeros to
    whole blocks of ``plan``; the padded keys are masked by the plan's last column."""
    padded_q = plan.num_q_blocks * plan.block_q
    padded_kv = plan.num_kv_blocks * plan.block_kv
    q, k, v = _pad_rows(q, padded_q), _pad_rows(k, padded_kv), _pad_rows(v, padded_kv)
    if bias is not None:
        rows = padded_q if bias.shape[0] > 1 else 1
        cols = padded_kv if bias.shape[1] > 1 else 1
        bias = jnp.pad(bias, [(0, rows - bias.shape[0]), (0, cols - bias.shape[1])])
    return q, k, v, bias


def _forward_unpadded(q, k, v, mask, bias, plan: _Plan, cfg, empty_lse: float):
    """``_forward`` on one head's unpadded inputs: (out ``[T, Hv]`` float32, lse ``[T]`` float32)."""
    qp, kp, vp, bp = pad_to_plan(q, k, v, bias, plan=plan)
    out, lse = _forward(qp, kp, vp, mask, bp, plan, cfg, empty_lse=empty_lse)
    return out[: plan.q_len], lse[: plan.q_len]


def _backward_unpadded(q, k, v, mask, bias, out, lse, d_out, plan: _Plan, cfg):
    """``_backward`` on one head's unpadded inputs: float32 (dq, dk, dv, dbias | None)."""
    padded_q = plan.num_q_blocks * plan.block_q
    qp, kp, vp, bp = pad_to_plan(q, k, v, bias, plan=plan)
    outp, dop = _pad_rows(out.astype(jnp.float32), padded_q), _pad_rows(d_out, padded_q)
    # Padded rows get lse = +inf, so their probabilities are exp(s - inf) = 0 in unmasked tiles too
    # (with 0 a large bias overflowed to inf, and inf · 0 made dk, dv and dbias NaN).
    lsep = jnp.pad(lse, (0, padded_q - lse.shape[0]), constant_values=jnp.inf)
    dq, dk, dv, dbias = _backward(qp, kp, vp, mask, bp, outp, lsep, dop, plan, cfg)
    if dbias is not None:
        dbias = dbias[: bias.shape[0], : bias.shape[1]]
    return dq[: plan.q_len], dk[: plan.kv_len], dv[: plan.kv_len], dbias


@functools.lru_cache(maxsize=64)
def _chunked_one_head_fn(plan: _Plan, scale: float, softcap: float | None):
    """A custom_vjp per-head function for one static plan."""
    cfg = {"scale": scale, "softcap": softcap}

    @jax.custom_vjp
    def attend(q, k, v, mask, bias):
        return attend_fwd(q, k, v, mask, bias)[0]

    forward = first_order_only(
        functools.partial(_forward_unpadded, plan=plan, cfg=cfg, empty_lse=0.0), "chunked"
    )
    backward = first_order_only(functools.partial(_backward_unpadded, plan=plan, cfg=cfg), "chunked")

    def attend_fwd(q, k, v, mask, bias):
        out, lse = forward(q, k, v, mask, bias)
        out = out.astype(q.dtype)
        return out, (q, k, v, mask, bias, out, lse)

    def attend_bwd(res, d_out):
        q, k, v, mask, bias, out, lse = res
        dq, dk, dv, dbias = backward(q, k, v, mask, bias, out, lse, d_out)
        d_mask = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)
        return (
            dq.astype(q.dtype),
            dk.astype(k.dtype),
            dv.astype(v.dtype),
            d_mask,
            None if dbias is None else dbias.astype(bias.dtype),
        )

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def chunked_forward_with_lse(q, k, v, mask, *, plan: _Plan, scale: float, softcap=None):
    """One head's forward with its log-sum-exp, for callers that merge partial softmaxes (ring attention).

    Args:
      q: ``[T, H]``; k: ``[S, H]``; v: ``[S, Hv]`` with T, S = ``plan.q_len``, ``plan.kv_len``.
      mask: anything with ``tile(q_idx, kv_idx) -> bool [bq, bkv]`` over local indices, or None;
        ``plan`` (from ``make_plan``) must list every tile it leaves non-empty.
    Returns:
      ``(out [T, Hv] float32, lse [T] float32)``; a row with nothing to attend has out 0 and
      lse ``MASK_VALUE``, so it weighs nothing when merged.
    """
    cfg = {"scale": scale, "softcap": softcap}
    return _forward_unpadded(q, k, v, mask, None, plan, cfg, empty_lse=MASK_VALUE)


def chunked_backward_with_lse(q, k, v, mask, out, lse, d_out, *, plan: _Plan, scale: float, softcap=None):
    """One head's (dq, dk, dv), all float32, given the final ``out [T, Hv]`` and ``lse [T]``.

    ``out`` and ``lse`` may belong to a larger softmax of which these keys are one block (ring
    attention): the result is then this block's share of the gradients. Shapes and ``mask`` as in
    ``chunked_forward_with_lse``; ``d_out``: ``[T, Hv]``.
    """
    cfg = {"scale": scale, "softcap": softcap}
    return _backward_unpadded(q, k, v, mask, None, out, lse, d_out, plan, cfg)[:3]


def default_block(length: int) -> int:
    """Largest power of two <= DEFAULT_BLOCK that does not exceed the length much."""
    return min(DEFAULT_BLOCK, max(16, 1 << (max(length, 1) - 1).bit_length()))


def chunked_attention(q, k, v, mask, bias, *, scale: float, softcap=None, block_q=None, block_kv=None):
    """Canonical-layout entry: q ``[B, T, N, H]``, k/v ``[B, S, K, H]`` -> ``[B, T, N, Hv]``.

    ``mask``: canonical ``jattn.masks.Mask`` or None; ``bias``: ``[B|1, N|1, T|1, S|1]`` or None.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    block_q = block_q or default_block(q_len)
    block_kv = block_kv or default_block(kv_len)
    layout = (masks_lib.full() if mask is None else mask).blocks(q_len, kv_len, block_q, block_kv)
    plan = make_plan(np.array(layout), q_len, kv_len, block_q, block_kv)
    attend = _chunked_one_head_fn(plan, float(scale), None if softcap is None else float(softcap))

    def per_head(q_h, k_h, v_h, ops):
        mask_h, bias_h = ops
        return attend(q_h, k_h, v_h, mask_h, bias_h)

    return vmap_over_heads(per_head, q, k, v, (mask, bias))
