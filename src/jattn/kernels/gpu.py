"""The flash kernels through Pallas' Triton lowering (NVIDIA GPUs; interpret mode on CPU).

Layout ``[B, T, N, H]`` as given (no transposes). Pallas Triton has no scalar prefetch, so each
program reads its row of the tile schedule as an ordinary int32 input and loops over dynamic
``pl.ds`` loads of the listed kv tiles, first the full ones, then the masked ones, in two loops
without a branch inside (``_loop_full_then_masked``): empty tiles are never loaded. Grids put the
q (or kv) tile first so that neighbouring programs share K/V in L2.

* forward, grid ``(num_q_blocks, B, N)``, last q tile first, ``forward_kv_step`` keys per step of
  a listed kv tile: out ``[B, T', N, Hv]``, lse ``[B, N, T', 1]``.
* dq, same grid, over the same kv-tile lists, ``backward_kv_step`` keys per step; also writes dS
  tiles when there is a bias.
* dk/dv, grid ``(num_kv_blocks, B, K)``: loops over the G query heads of the kv head and the
  listed q tiles, ``backward_q_step`` queries per step, so grouped-query gradients are summed in
  registers (no atomics, no repeat). Under a causal mask the first kv tiles are the longest, and
  they already run first.

Triton needs power-of-two tiles of at least 16 in each matmul dim; ``padded_head_dim`` says to
what the wrapper pads head dims (80 and 96 run as 128).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # deprecated since jax 0.11: a JAX without it still imports jattn, and flash declines on GPUs
    from jax.experimental.pallas import triton as pl_triton
except ImportError:
    pl_triton = None  # type: ignore[assignment]

from jattn.core._common import output_like, varying_axes, varying_over
from jattn.kernels import _tile
from jattn.kernels._config import HEADER, KernelAux, KernelConfig, split_refs
from jattn.kernels.blocks import as_index

MIN_BLOCK = 16


def padded_head_dim(head_dim: int) -> int:
    """Triton's ``tl.dot`` wants power-of-two dims of at least 16."""
    return max(MIN_BLOCK, 1 << (head_dim - 1).bit_length())


def missing_backend_reason() -> str | None:
    """Why the kernels cannot be compiled for a GPU by this JAX, or None when they can."""
    if pl_triton is not None:
        return None
    return (
        f"the flash kernel compiles through Pallas' Triton backend, which jax {jax.__version__} does not have"
    )


def _compiler_params(cfg: KernelConfig, backward: bool = False):
    if pl_triton is None:  # interpret mode only: flash.unsupported_reason refuses compiled runs
        return None
    if backward:
        return pl_triton.CompilerParams(num_warps=cfg.backward_num_warps, num_stages=cfg.backward_num_stages)
    return pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _select(batched: bool, index):
    return index if batched else 0


def _last_q_tile_first(specs, num_q_blocks: int):
    """Index maps over grid ``(q tiles, B, N)`` that run the q tiles from last to first.

    Under a causal mask the last q tiles list the most kv tiles; launched first, they no longer
    make the tail of the grid (FlashAttention's tile schedulers order causal work longest first).
    """
    return [
        dataclasses.replace(spec, index_map=lambda r, b, n, f=spec.index_map: f(num_q_blocks - 1 - r, b, n))
        for spec in specs
    ]


def _kv_head_map(group: int):
    """The index map over grid ``(q tiles, B, N)`` of all of K (or V) of query head n's kv head."""
    return lambda i, b, n: (b, 0, jax.lax.div(n, as_index(group, n)), 0)


def _q_tile():
    """The q tile of this program under ``_last_q_tile_first``."""
    return pl.num_programs(0) - 1 - pl.program_id(0)


def _optional_specs(aux: KernelAux, bias, heads: int, q_block: int, kv_block: int, index_of):
    """BlockSpecs (and operands) of the bias and the tile table.

    ``heads``: the head-axis block (1 per query head, G per kv head); ``q_block``/``kv_block``:
    the bias block along T'/S'; ``index_of(grid ids) -> (b, head block, q block, kv block)``.
    """
    specs, operands = [], []
    if bias is not None:  # [B|1, N|1, T', S']
        b_dim, n_dim = bias.shape[:2]

        def bias_map(*ids):
            b, n, qi, kj = index_of(*ids)
            return _select(b_dim > 1, b), _select(n_dim > 1, n), qi, kj

        specs.append(pl.BlockSpec((None, heads if n_dim > 1 else 1, q_block, kv_block), bias_map))
        operands.append(bias)
    if aux.table is not None:  # [B|1, N|1, P, bq, bkv]
        table_b, table_n = aux.table.shape[:2]

        def table_map(*ids):
            b, n, _, _ = index_of(*ids)
            return _select(table_b > 1, b), _select(table_n > 1, n), 0, 0, 0

        specs.append(pl.BlockSpec((None, heads if table_n > 1 else 1, *aux.table.shape[2:]), table_map))
        operands.append(aux.table)
    return specs, operands


def _vector_specs(aux: KernelAux, q_vec_block, q_vec_index, kv_vec_block, kv_vec_index, b_of):
    specs, operands = [], []
    for vec in aux.q_vectors:  # [B|1, T', 1]
        batched = vec.shape[0] > 1
        specs.append(
            pl.BlockSpec(
                (None, q_vec_block, 1),
                lambda *ids, bb=batched: (_select(bb, b_of(*ids)), q_vec_index(*ids), 0),
            )
        )
        operands.append(vec)
    for vec in aux.kv_vectors:  # [B|1, 1, S']
        batched = vec.shape[0] > 1
        specs.append(
            pl.BlockSpec(
                (None, 1, kv_vec_block),
                lambda *ids, bb=batched: (_select(bb, b_of(*ids)), 0, kv_vec_index(*ids)),
            )
        )
        operands.append(vec)
    return specs, operands


def _kv_tile_allowed(
    cfg, q_start, kv_start, width, q_vectors, kv_vec_refs, table_ref, head, table_id, offset
):
    """The mask of ``width`` keys from ``kv_start`` (``offset`` into their tile) in a loop that
    loads kv-side data with ``pl.ds``: bool ``[bq, width]``."""
    kv_vectors = [ref[:, pl.ds(kv_start, width)] for ref in kv_vec_refs]  # [1, width]
    table_tile = None if table_ref is None else table_ref[head, table_id, :, pl.ds(offset, width)]
    return _tile.allowed_in_tile(
        cfg.formula,
        q_start,
        kv_start,
        cfg.block_q,
        width,
        cfg.q_len,
        cfg.kv_len,
        q_vectors,
        kv_vectors,
        table_tile,
    )


def _entry(sched_ref, width: int, j):
    """(tile id, table index) of entry j of a packed schedule row."""
    return sched_ref[HEADER + j], sched_ref[HEADER + width + j]


def _kv_step(cfg, aux, refs, q_start, q_vectors, masked: bool, j, step, kv_step: int):
    """Keys ``[kv_start, kv_start + kv_step)`` of the j-th listed kv tile of a q tile's row, for the
    forward and dq kernels: ``(kv_start, k [kv_step, H], v [kv_step, Hv], bias [bq, kv_step] | None,
    allowed [bq, kv_step] | None)``. ``refs``: (sched, k, v, bias | None, table | None, kv vectors)."""
    sched_ref, k_ref, v_ref, bias_ref, table_ref, kv_vec_refs = refs
    kv_id, table_id = _entry(sched_ref, aux.row_width, j)
    kv_start = pl.multiple_of(kv_id * cfg.block_kv + step * kv_step, kv_step)
    k = k_ref[pl.ds(kv_start, kv_step), :]
    v = v_ref[pl.ds(kv_start, kv_step), :]
    bias = None if bias_ref is None else bias_ref[0, :, pl.ds(kv_start, kv_step)]
    allowed = None
    if masked:
        allowed = _kv_tile_allowed(
            cfg, q_start, kv_start, kv_step, q_vectors, kv_vec_refs, table_ref, 0, table_id, step * kv_step
        )
    return kv_start, k, v, bias, allowed


def _loop_full_then_masked(sched_ref, visit, init, steps_per_tile: int = 1):
    """Fold ``visit(masked, j, step, carry)`` over a row's full entries, then over its masked
    ones, in ``steps_per_tile`` steps per listed tile.

    Two loops with straight bodies rather than one loop with a branch: Triton software-pipelines
    the K/V loads (cp.async) and the matmuls (async wgmma) only of a loop body without one.
    """
    count, num_full = sched_ref[0], sched_ref[1]

    def one_step(masked: bool, i, carry):
        if steps_per_tile == 1:
            return visit(masked, i, 0, carry)
        steps = as_index(steps_per_tile, i)
        return visit(masked, jax.lax.div(i, steps), jax.lax.rem(i, steps), carry)

    carry = jax.lax.fori_loop(0, num_full * steps_per_tile, functools.partial(one_step, False), init)
    return jax.lax.fori_loop(
        num_full * steps_per_tile, count * steps_per_tile, functools.partial(one_step, True), carry
    )


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def _forward_kernel(*refs, cfg: KernelConfig, aux: KernelAux, has_bias: bool):
    fixed, bias_ref, table_ref, q_vec_refs, kv_vec_refs, (out_ref, lse_ref) = split_refs(
        refs, aux, has_bias, 4
    )
    sched_ref, q_ref, k_ref, v_ref = fixed
    q_start = _q_tile() * cfg.block_q
    q = q_ref[...]  # [bq, H]
    q_vectors = [ref[...] for ref in q_vec_refs]  # [bq, 1]
    kv_refs = (sched_ref, k_ref, v_ref, bias_ref, table_ref, kv_vec_refs)
    kv_step = cfg.forward_kv_step

    def visit(masked: bool, j, step, stats):  # keys [kv_start, kv_start + kv_step) of the j-th tile
        _, k, v, bias, allowed = _kv_step(cfg, aux, kv_refs, q_start, q_vectors, masked, j, step, kv_step)
        return _tile.online_softmax_step(
            stats,
            q,
            k,
            v,
            bias,
            allowed,
            scale=cfg.scale,
            softcap=cfg.softcap,
            zeroing=cfg.for_zeroing(allowed),
        )

    init = _tile.init_statistics(cfg.block_q, v_ref.shape[-1])
    stats = _loop_full_then_masked(sched_ref, visit, init, cfg.block_kv // kv_step)
    out, lse = _tile.finish_statistics(stats, cfg.empty_lse)
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


def forward(cfg: KernelConfig, q, k, v, bias, aux: KernelAux):
    """q ``[B, T', N, H]``, k ``[B, S', K, H]``, v ``[B, S', K, Hv]`` (padded).

    Returns:
      (out ``[B, T', N, Hv]``, lse ``[B, N, T', 1]`` float32).
    """
    batch, q_padded, num_heads, head_dim = q.shape
    kv_padded, num_kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = num_heads // num_kv_heads
    bq = cfg.block_q
    kv_map = _kv_head_map(group)
    specs = [
        pl.BlockSpec((None, aux.rows.shape[1]), lambda i, b, n: (i, 0)),
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, kv_padded, None, head_dim), kv_map),
        pl.BlockSpec((None, kv_padded, None, value_dim), kv_map),
    ]
    operands = [aux.rows, q, k, v]
    extra_specs, extra = _optional_specs(aux, bias, 1, bq, kv_padded, lambda i, b, n: (b, n, i, 0))
    vec_specs, vecs = _vector_specs(
        aux, bq, lambda i, b, n: i, kv_padded, lambda i, b, n: 0, lambda i, b, n: b
    )
    kernel = functools.partial(_forward_kernel, cfg=cfg, aux=aux, has_bias=bias is not None)
    num_q_blocks = q_padded // bq
    return pl.pallas_call(
        kernel,
        grid=(num_q_blocks, batch, num_heads),
        in_specs=_last_q_tile_first(specs + extra_specs + vec_specs, num_q_blocks),
        out_specs=_last_q_tile_first(
            [
                pl.BlockSpec((None, bq, None, value_dim), lambda i, b, n: (b, i, n, 0)),
                pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0)),
            ],
            num_q_blocks,
        ),
        out_shape=[
            output_like((batch, q_padded, num_heads, value_dim), q.dtype, q),
            output_like((batch, num_heads, q_padded, 1), jnp.float32, q),
        ],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="jattn_flash_forward",
    )(*operands, *extra, *vecs)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


def _dq_kernel(*refs, cfg: KernelConfig, aux: KernelAux, has_bias: bool):
    num_fixed = 7
    fixed, bias_ref, table_ref, q_vec_refs, kv_vec_refs, rest = split_refs(refs, aux, has_bias, num_fixed)
    sched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = fixed
    if has_bias:
        _, dq_ref, dbias_ref = rest  # the first is the zero-filled dbias input aliased to dbias
    else:
        (dq_ref,), dbias_ref = rest, None
    q_start = _q_tile() * cfg.block_q
    q, d_out = q_ref[...], do_ref[...]  # [bq, H], [bq, Hv]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1]
    q_vectors = [ref[...] for ref in q_vec_refs]

    kv_refs = (sched_ref, k_ref, v_ref, bias_ref, table_ref, kv_vec_refs)
    kv_step = cfg.backward_kv_step

    def visit(masked: bool, j, step, dq):  # keys [kv_start, kv_start + kv_step) of the j-th tile
        kv_start, k, v, bias, allowed = _kv_step(
            cfg, aux, kv_refs, q_start, q_vectors, masked, j, step, kv_step
        )
        k = _tile.zero_unused(_tile.keys_used(cfg.for_zeroing(allowed)), k)  # dq sums over keys
        _, ds = _tile.probs_and_dscores(
            q, k, v, d_out, lse, delta, bias, allowed, scale=cfg.scale, softcap=cfg.softcap
        )
        if dbias_ref is not None:
            dbias_ref[0, :, pl.ds(kv_start, kv_step)] = ds
        return dq + _tile.matmul(ds, k)  # the scale once, after the loop: the wgmma accumulates

    steps = cfg.block_kv // kv_step
    dq = _loop_full_then_masked(sched_ref, visit, jnp.zeros(q.shape, jnp.float32), steps)
    dq_ref[...] = (cfg.scale * dq).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: KernelConfig, aux: KernelAux, has_bias: bool, group: int):
    fixed, bias_ref, table_ref, q_vec_refs, kv_vec_refs, (dk_ref, dv_ref) = split_refs(refs, aux, has_bias, 7)
    sched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = fixed
    kv_start = pl.program_id(0) * cfg.block_kv
    k, v = k_ref[...], v_ref[...]  # [bkv, H], [bkv, Hv]
    kv_vectors = [ref[0, :][:, None] for ref in kv_vec_refs]  # [bkv, 1]: the tiles are keys first
    q_step = cfg.backward_q_step

    def visit(g, masked: bool, j, step, grads):  # queries [q_start, q_start + q_step) of the j-th tile
        q_id, table_id = _entry(sched_ref, aux.col_width, j)
        q_start = pl.multiple_of(q_id * cfg.block_q + step * q_step, q_step)
        q = q_ref[pl.ds(q_start, q_step), g, :]  # [q_step, H]
        d_out = do_ref[pl.ds(q_start, q_step), g, :]  # [q_step, Hv]
        lse = lse_ref[g, pl.ds(q_start, q_step), 0][None, :]  # [1, q_step]
        delta = delta_ref[g, pl.ds(q_start, q_step), 0][None, :]
        bias_head = g if bias_ref is not None and bias_ref.shape[0] > 1 else 0
        bias = None if bias_ref is None else bias_ref[bias_head, pl.ds(q_start, q_step), :].T  # [bkv, q_step]
        allowed = None
        if masked:
            q_vectors = [ref[pl.ds(q_start, q_step), 0][None, :] for ref in q_vec_refs]  # [1, q_step]
            table_head = g if table_ref is not None and table_ref.shape[0] > 1 else 0
            table_tile = None
            if table_ref is not None:
                table_tile = table_ref[table_head, table_id, pl.ds(step * q_step, q_step), :].T
            allowed = _tile.allowed_in_tile(
                cfg.formula,
                q_start,
                kv_start,
                q_step,
                cfg.block_kv,
                cfg.q_len,
                cfg.kv_len,
                q_vectors,
                kv_vectors,
                table_tile,
                keys_first=True,
            )
        dk, dv = grads
        used = _tile.queries_used(cfg.for_zeroing(allowed), keys_first=True)  # [q_step, 1]
        q, d_out = _tile.zero_unused(used, q), _tile.zero_unused(used, d_out)  # dk, dv sum over queries
        p_t, ds_t = _tile.probs_and_dscores(
            q, k, v, d_out, lse, delta, bias, allowed, scale=cfg.scale, softcap=cfg.softcap, keys_first=True
        )  # pᵀ, dSᵀ [bkv, q_step]
        dv = dv + _tile.matmul(p_t, d_out)  # [bkv, Hv]
        return dk + _tile.matmul(ds_t, q), dv  # the scale once, after the loops

    def one_head(g, grads):
        return _loop_full_then_masked(sched_ref, functools.partial(visit, g), grads, cfg.block_q // q_step)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, group, one_head, init)
    dk_ref[...] = (cfg.scale * dk).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(cfg: KernelConfig, q, k, v, bias, aux: KernelAux, lse, delta, d_out):
    """Gradients (dq, dk, dv, dbias ``[B, N, T', S']`` float32 or None) of the padded problem.

    lse, delta: ``[B, N, T', 1]`` float32; d_out ``[B, T', N, Hv]``.
    """
    batch, q_padded, num_heads, head_dim = q.shape
    kv_padded, num_kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = num_heads // num_kv_heads
    bq, bkv = cfg.block_q, cfg.block_kv
    has_bias = bias is not None

    # dq (and dS for the bias): grid over q tiles, loops over their kv tiles.
    kv_map = _kv_head_map(group)
    specs = [
        pl.BlockSpec((None, aux.rows.shape[1]), lambda i, b, n: (i, 0)),
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, kv_padded, None, head_dim), kv_map),
        pl.BlockSpec((None, kv_padded, None, value_dim), kv_map),
        pl.BlockSpec((None, bq, None, value_dim), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0)),
    ]
    operands = [aux.rows, q, k, v, d_out, lse, delta]
    extra_specs, extra = _optional_specs(aux, bias, 1, bq, kv_padded, lambda i, b, n: (b, n, i, 0))
    vec_specs, vecs = _vector_specs(
        aux, bq, lambda i, b, n: i, kv_padded, lambda i, b, n: 0, lambda i, b, n: b
    )
    out_specs = [pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0))]
    out_shape = [output_like(q.shape, q.dtype, q)]
    aliases = {}
    if has_bias:  # dS is written only on visited tiles: start from zeros
        dbias_shape = (batch, num_heads, q_padded, kv_padded)
        dbias_spec = pl.BlockSpec((None, 1, bq, kv_padded), lambda i, b, n: (b, n, i, 0))
        aliases = {len(operands) + len(extra) + len(vecs): 1}
        vec_specs = [*vec_specs, dbias_spec]
        vecs = [*vecs, varying_over(varying_axes(q), jnp.zeros(dbias_shape, jnp.float32))]
        out_specs.append(dbias_spec)
        out_shape.append(output_like(dbias_shape, jnp.float32, q))
    num_q_blocks = q_padded // bq
    dq_and_dbias = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, aux=aux, has_bias=has_bias),
        grid=(num_q_blocks, batch, num_heads),
        in_specs=_last_q_tile_first(specs + extra_specs + vec_specs, num_q_blocks),
        out_specs=_last_q_tile_first(out_specs, num_q_blocks),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(cfg, backward=True),
        interpret=cfg.interpret,
        name="jattn_flash_dq",
    )(*operands, *extra, *vecs)
    dq, dbias = (dq_and_dbias[0], dq_and_dbias[1]) if has_bias else (dq_and_dbias[0], None)

    # dk, dv: grid over kv tiles of each kv head, loops over its G query heads and their q tiles.
    specs = [
        pl.BlockSpec((None, aux.cols.shape[1]), lambda j, b, h: (j, 0)),
        pl.BlockSpec((None, q_padded, group, head_dim), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, bkv, None, head_dim), lambda j, b, h: (b, j, h, 0)),
        pl.BlockSpec((None, bkv, None, value_dim), lambda j, b, h: (b, j, h, 0)),
        pl.BlockSpec((None, q_padded, group, value_dim), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, group, q_padded, 1), lambda j, b, h: (b, h, 0, 0)),
        pl.BlockSpec((None, group, q_padded, 1), lambda j, b, h: (b, h, 0, 0)),
    ]
    operands = [aux.cols, q, k, v, d_out, lse, delta]
    extra_specs, extra = _optional_specs(aux, bias, group, q_padded, bkv, lambda j, b, h: (b, h, 0, j))
    vec_specs, vecs = _vector_specs(
        aux, q_padded, lambda j, b, h: 0, bkv, lambda j, b, h: j, lambda j, b, h: b
    )
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, aux=aux, has_bias=has_bias, group=group),
        grid=(kv_padded // bkv, batch, num_kv_heads),
        in_specs=specs + extra_specs + vec_specs,
        out_specs=[
            pl.BlockSpec((None, bkv, None, head_dim), lambda j, b, h: (b, j, h, 0)),
            pl.BlockSpec((None, bkv, None, value_dim), lambda j, b, h: (b, j, h, 0)),
        ],
        out_shape=[output_like(k.shape, k.dtype, q), output_like(v.shape, v.dtype, q)],
        compiler_params=_compiler_params(cfg, backward=True),
        interpret=cfg.interpret,
        name="jattn_flash_dkv",
    )(*operands, *extra, *vecs)
    return dq, dk, dv, dbias
