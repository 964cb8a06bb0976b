"""The flash kernels through Pallas' Mosaic TPU lowering.

Same design as ``gpu.py`` with TPU pipelining: the tile schedule is scalar-prefetched
(``pltpu.PrefetchScalarGridSpec``) and the index maps read it, so the grid's last axis walks the
listed kv tiles of each q tile (``(B, N, num_q_blocks, W)``) and Mosaic only DMAs listed tiles;
entries past a row's count repeat its last tile (no new DMA) and are skipped with ``pl.when``.
Running statistics live in VMEM scratch across the last grid axis. The dk/dv pass walks
``(B, K, num_kv_blocks, G, Wt)``: the G query heads of a kv head accumulate into one scratch.

Operands are transposed to ``[B, N, T, H]`` here (Mosaic wants the last two block dims to be
(sublane, lane) tiles). Tiles are multiples of 128; head dims are taken as they are (a block
dim equal to the full array dim is always legal).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jattn.core._common import output_like, varying_axes, varying_over
from jattn.kernels import _tile
from jattn.kernels._config import HEADER, KernelAux, KernelConfig, row_length, split_refs
from jattn.kernels.blocks import as_index

MIN_BLOCK = 128


def padded_head_dim(head_dim: int) -> int:
    """Mosaic takes any head dim as a full-width block."""
    return head_dim


def _buffer_bytes(rows: int, cols: int, itemsize: int) -> int:
    """Bytes of a ``[rows, cols]`` VMEM buffer laid out in Mosaic's (sublane, 128-lane) tiles:
    8 sublanes of 32-bit values, 16 of 16-bit, 32 of 8-bit."""
    sublanes = 32 // itemsize
    return -(-rows // sublanes) * sublanes * -(-cols // 128) * 128 * itemsize


def vmem_bytes(
    block_q: int,
    block_kv: int,
    *,
    head_dim: int,
    value_dim: int,
    itemsize: int,
    has_bias: bool,
    has_table: bool,
    num_q_vectors: int,
    num_kv_vectors: int,
) -> int:
    """An estimate of the VMEM of the largest of the three kernels' grid steps: the blocks it
    streams, double-buffered by the pipeline; its scratch; and the ``[bq, bkv]`` tiles of its tile
    math (float32 scores, probabilities, dP, dS, and their casts to the input dtype). A bias is
    counted as float32, the widest it can be. Not measured on a TPU: Mosaic's own temporaries come
    on top."""
    q_rows = lambda cols, size: _buffer_bytes(block_q, cols, size)  # noqa: E731
    kv_rows = lambda cols, size: _buffer_bytes(block_kv, cols, size)  # noqa: E731
    tile = lambda size: _buffer_bytes(block_q, block_kv, size)  # noqa: E731
    # q, k, v and the mask's operands, which every kernel streams.
    streamed = q_rows(head_dim, itemsize) + kv_rows(head_dim, itemsize) + kv_rows(value_dim, itemsize)
    streamed += has_bias * tile(4) + has_table * tile(1)
    streamed += num_q_vectors * q_rows(1, 4) + num_kv_vectors * _buffer_bytes(1, block_kv, 4)
    # d_out, lse and delta, which both backward kernels stream.
    backward_streamed = streamed + q_rows(value_dim, itemsize) + 2 * q_rows(1, 4)
    forward = (
        2 * (streamed + q_rows(value_dim, itemsize) + q_rows(1, 4))  # + out, lse
        + 2 * q_rows(1, 4)  # running max and sum
        + q_rows(value_dim, 4)  # accumulator
        + 2 * tile(4)  # scores, probabilities
        + tile(itemsize)
    )
    dq = (
        2 * (backward_streamed + q_rows(head_dim, itemsize) + has_bias * 2 * tile(4))  # + dq, dbias in/out
        + q_rows(head_dim, 4)  # accumulator
        + 4 * tile(4)  # scores, probabilities, dP, dS
        + tile(itemsize)
    )
    dkv = (
        2 * (backward_streamed + kv_rows(head_dim, itemsize) + kv_rows(value_dim, itemsize))  # + dk, dv
        + kv_rows(head_dim, 4)
        + kv_rows(value_dim, 4)  # accumulators
        + 4 * tile(4)
        + 2 * tile(itemsize)
    )
    return max(forward, dq, dkv)


def _select(batched: bool, index):
    return index if batched else 0


def _count(sched_ref, row, width: int):
    """How many entries packed row ``row`` (of ``width`` entries, flattened in SMEM) lists."""
    return sched_ref[row * row_length(width)]


def _entry(sched_ref, row, width: int, j):
    """(tile id, whether it is masked, table index) of entry j of packed row ``row`` (flattened in
    SMEM). A row lists its full tiles before its masked ones (``blocks.Schedule``)."""
    start = row * row_length(width)
    base = start + HEADER
    return sched_ref[base + j], j >= sched_ref[start + 1], sched_ref[base + width + j]


def _heads_first(x):
    """[B, L, N, H] <-> [B, N, L, H]."""
    return jnp.swapaxes(x, 1, 2)


def _optional_specs(aux: KernelAux, bias, block_q: int, block_kv: int, index_of):
    """BlockSpecs (and operands) of bias, table and mask vectors.

    ``index_of(*grid ids, sched) -> (b, head, q tile, kv tile, table index)``.
    """
    specs, operands = [], []
    if bias is not None:  # [B|1, N|1, T', S']
        b_dim, n_dim = bias.shape[:2]

        def bias_map(*ids):
            b, n, qi, kj, _ = index_of(*ids)
            return _select(b_dim > 1, b), _select(n_dim > 1, n), qi, kj

        specs.append(pl.BlockSpec((None, None, block_q, block_kv), bias_map))
        operands.append(bias)
    if aux.table is not None:  # [B|1, N|1, P, bq, bkv]
        table_b, table_n = aux.table.shape[:2]

        def table_map(*ids):
            b, n, _, _, t = index_of(*ids)
            return _select(table_b > 1, b), _select(table_n > 1, n), t, 0, 0

        specs.append(pl.BlockSpec((None, None, None, block_q, block_kv), table_map))
        operands.append(aux.table)
    for vec in aux.q_vectors:  # [B|1, T', 1]
        batched = vec.shape[0] > 1
        specs.append(
            pl.BlockSpec(
                (None, block_q, 1),
                lambda *ids, bb=batched: (_select(bb, index_of(*ids)[0]), index_of(*ids)[2], 0),
            )
        )
        operands.append(vec)
    for vec in aux.kv_vectors:  # [B|1, 1, S']
        batched = vec.shape[0] > 1
        specs.append(
            pl.BlockSpec(
                (None, 1, block_kv),
                lambda *ids, bb=batched: (_select(bb, index_of(*ids)[0]), 0, index_of(*ids)[3]),
            )
        )
        operands.append(vec)
    return specs, operands


def _tile_allowed(cfg, q_start, kv_start, q_vec_refs, kv_vec_refs, table_ref):
    table_tile = None if table_ref is None else table_ref[...]
    return _tile.allowed_in_tile(
        cfg.formula,
        q_start,
        kv_start,
        cfg.block_q,
        cfg.block_kv,
        cfg.q_len,
        cfg.kv_len,
        [ref[...] for ref in q_vec_refs],
        [ref[...] for ref in kv_vec_refs],
        table_tile,
    )


def _on_tile(masked, run, allowed_fn):
    """Run ``run(allowed)`` for a masked tile and ``run(None)`` for a full one."""

    @pl.when(masked)
    def _():
        run(allowed_fn())

    @pl.when(jnp.logical_not(masked))
    def _():
        run(None)


def _params(num_parallel: int, num_arbitrary: int):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * num_parallel + ("arbitrary",) * num_arbitrary,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def _forward_kernel(sched_ref, *refs, cfg: KernelConfig, aux: KernelAux, has_bias: bool, width: int):
    fixed, bias_ref, table_ref, q_vec_refs, kv_vec_refs, rest = split_refs(refs, aux, has_bias, 3)
    q_ref, k_ref, v_ref = fixed
    out_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    i, j = pl.program_id(2), pl.program_id(3)
    kv_id, masked, _ = _entry(sched_ref, i, width, j)

    @pl.when(j == 0)
    def _():
        m_ref[...], l_ref[...], acc_ref[...] = _tile.init_statistics(cfg.block_q, acc_ref.shape[-1])

    def run(allowed):
        bias = None if bias_ref is None else bias_ref[...]
        stats = (m_ref[...], l_ref[...], acc_ref[...])
        m_ref[...], l_ref[...], acc_ref[...] = _tile.online_softmax_step(
            stats,
            q_ref[...],
            k_ref[...],
            v_ref[...],
            bias,
            allowed,
            scale=cfg.scale,
            softcap=cfg.softcap,
            zeroing=cfg.for_zeroing(allowed),
        )

    @pl.when(j < _count(sched_ref, i, width))
    def _():
        allowed = lambda: _tile_allowed(  # noqa: E731
            cfg, i * cfg.block_q, kv_id * cfg.block_kv, q_vec_refs, kv_vec_refs, table_ref
        )
        _on_tile(masked, run, allowed)

    @pl.when(j == width - 1)
    def _():
        out, lse = _tile.finish_statistics((m_ref[...], l_ref[...], acc_ref[...]), cfg.empty_lse)
        out_ref[...] = out.astype(out_ref.dtype)
        lse_ref[...] = lse


def _listed_tile_maps(width: int, group: int):
    """Index maps over the grid ``(B, N, q tiles, listed kv tiles)`` with the schedule prefetched:
    ``index_of`` gives ``(b, head, q tile, kv tile, table index)`` of step j of q tile i, and
    ``kv_map`` the K (or V) block of query head n's kv head at that kv tile."""

    def index_of(b, n, i, j, sched):
        kv_id, _, table_id = _entry(sched, i, width, j)
        return b, n, i, kv_id, table_id

    def kv_map(b, n, i, j, sched):
        return b, jax.lax.div(n, as_index(group, n)), index_of(b, n, i, j, sched)[3], 0

    return index_of, kv_map


def forward(cfg: KernelConfig, q, k, v, bias, aux: KernelAux):
    """q ``[B, T', N, H]``, k/v ``[B, S', K, H]`` -> (out ``[B, T', N, Hv]``, lse ``[B, N, T', 1]``)."""
    batch, q_padded, num_heads, head_dim = q.shape
    num_kv_heads, value_dim = k.shape[2], v.shape[3]
    group = num_heads // num_kv_heads
    bq, bkv = cfg.block_q, cfg.block_kv
    width = aux.row_width
    index_of, kv_map = _listed_tile_maps(width, group)
    specs = [
        pl.BlockSpec((None, None, bq, head_dim), lambda b, n, i, j, sched: (b, n, i, 0)),
        pl.BlockSpec((None, None, bkv, head_dim), kv_map),
        pl.BlockSpec((None, None, bkv, value_dim), kv_map),
    ]
    extra_specs, extra = _optional_specs(aux, bias, bq, bkv, index_of)
    out_map = lambda b, n, i, j, sched: (b, n, i, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, num_heads, q_padded // bq, width),
        in_specs=specs + extra_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, value_dim), out_map),
            pl.BlockSpec((None, None, bq, 1), out_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, value_dim), jnp.float32),
        ],
    )
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, aux=aux, has_bias=bias is not None, width=width),
        grid_spec=grid_spec,
        out_shape=[
            output_like((batch, num_heads, q_padded, value_dim), q.dtype, q),
            output_like((batch, num_heads, q_padded, 1), jnp.float32, q),
        ],
        compiler_params=_params(3, 1),
        interpret=cfg.interpret,
        name="jattn_flash_forward",
    )(aux.rows.reshape(-1), _heads_first(q), _heads_first(k), _heads_first(v), *extra)
    return _heads_first(out), lse


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


def _tile_grads(q, k, v, d_out, lse_ref, delta_ref, bias_ref, allowed, cfg: KernelConfig):
    """``(p, ds)`` of both backward kernels on the current blocks (see ``_tile``)."""
    bias = None if bias_ref is None else bias_ref[...]
    return _tile.probs_and_dscores(
        q, k, v, d_out, lse_ref[...], delta_ref[...], bias, allowed, scale=cfg.scale, softcap=cfg.softcap
    )


def _dq_kernel(sched_ref, *refs, cfg: KernelConfig, aux: KernelAux, has_bias: bool, width: int):
    fixed, bias_ref, table_ref, q_vec_refs, kv_vec_refs, rest = split_refs(refs, aux, has_bias, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = fixed
    if has_bias:
        _, dq_ref, dbias_ref, dq_acc = rest  # the first is the zero-filled dbias input aliased to dbias
    else:
        (dq_ref, dq_acc), dbias_ref = rest, None
    i, j = pl.program_id(2), pl.program_id(3)
    kv_id, masked, _ = _entry(sched_ref, i, width, j)
    count = _count(sched_ref, i, width)

    @pl.when(j == 0)
    def _():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
        if dbias_ref is not None:  # a q tile that visits nothing still owns one dbias block
            dbias_ref[...] = jnp.zeros(dbias_ref.shape, jnp.float32)

    def run(allowed):
        k = _tile.zero_unused(_tile.keys_used(cfg.for_zeroing(allowed)), k_ref[...])  # dq sums over keys
        _, ds = _tile_grads(
            q_ref[...], k, v_ref[...], do_ref[...], lse_ref, delta_ref, bias_ref, allowed, cfg
        )
        if dbias_ref is not None:
            dbias_ref[...] = ds
        dq_acc[...] += cfg.scale * _tile.matmul(ds, k)

    @pl.when(j < count)
    def _():
        allowed = lambda: _tile_allowed(  # noqa: E731
            cfg, i * cfg.block_q, kv_id * cfg.block_kv, q_vec_refs, kv_vec_refs, table_ref
        )
        _on_tile(masked, run, allowed)

    @pl.when(j == width - 1)
    def _():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def _dkv_kernel(sched_ref, *refs, cfg: KernelConfig, aux: KernelAux, has_bias: bool, width: int, group: int):
    fixed, bias_ref, table_ref, q_vec_refs, kv_vec_refs, rest = split_refs(refs, aux, has_bias, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = fixed
    dk_ref, dv_ref, dk_acc, dv_acc = rest
    kj, g, jq = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    q_id, masked, _ = _entry(sched_ref, kj, width, jq)

    @pl.when((g == 0) & (jq == 0))
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def run(allowed):
        used = _tile.queries_used(cfg.for_zeroing(allowed))  # [bq, 1]: dk and dv sum over the queries
        q, d_out = _tile.zero_unused(used, q_ref[...]), _tile.zero_unused(used, do_ref[...])
        p, ds = _tile_grads(q, k_ref[...], v_ref[...], d_out, lse_ref, delta_ref, bias_ref, allowed, cfg)
        dv_acc[...] += _tile.matmul(p, d_out, transpose_a=True)  # [bkv, Hv]
        dk_acc[...] += cfg.scale * _tile.matmul(ds, q, transpose_a=True)  # [bkv, H]

    @pl.when(jq < _count(sched_ref, kj, width))
    def _():
        allowed = lambda: _tile_allowed(  # noqa: E731
            cfg, q_id * cfg.block_q, kj * cfg.block_kv, q_vec_refs, kv_vec_refs, table_ref
        )
        _on_tile(masked, run, allowed)

    @pl.when((g == group - 1) & (jq == width - 1))
    def _():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(cfg: KernelConfig, q, k, v, bias, aux: KernelAux, lse, delta, d_out):
    """Gradients (dq, dk, dv, dbias ``[B, N, T', S']`` float32 or None), layouts as in ``gpu.backward``."""
    batch, q_padded, num_heads, head_dim = q.shape
    kv_padded, num_kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = num_heads // num_kv_heads
    bq, bkv = cfg.block_q, cfg.block_kv
    has_bias = bias is not None
    qt, kt, vt, dot = _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(d_out)

    # dq (and dS for the bias): grid (B, N, q tiles, listed kv tiles).
    width = aux.row_width
    index_of, kv_map = _listed_tile_maps(width, group)
    q_map = lambda b, n, i, j, sched: (b, n, i, 0)  # noqa: E731
    specs = [
        pl.BlockSpec((None, None, bq, head_dim), q_map),
        pl.BlockSpec((None, None, bkv, head_dim), kv_map),
        pl.BlockSpec((None, None, bkv, value_dim), kv_map),
        pl.BlockSpec((None, None, bq, value_dim), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
    ]
    operands = [qt, kt, vt, dot, lse, delta]
    extra_specs, extra = _optional_specs(aux, bias, bq, bkv, index_of)
    out_specs = [pl.BlockSpec((None, None, bq, head_dim), q_map)]
    out_shape = [output_like(qt.shape, q.dtype, q)]
    aliases = {}
    if has_bias:
        dbias_shape = (batch, num_heads, q_padded, kv_padded)
        dbias_spec = pl.BlockSpec((None, None, bq, bkv), lambda *ids: index_of(*ids)[:4])
        aliases = {1 + len(operands) + len(extra): 1}  # +1: the scalar-prefetch operand comes first
        dbias_zeros = varying_over(varying_axes(q), jnp.zeros(dbias_shape, jnp.float32))
        extra_specs, extra = [*extra_specs, dbias_spec], [*extra, dbias_zeros]
        out_specs.append(dbias_spec)
        out_shape.append(output_like(dbias_shape, jnp.float32, q))
    results = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, aux=aux, has_bias=has_bias, width=width),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, num_heads, q_padded // bq, width),
            in_specs=specs + extra_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        ),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_params(3, 1),
        interpret=cfg.interpret,
        name="jattn_flash_dq",
    )(aux.rows.reshape(-1), *operands, *extra)
    dq, dbias = _heads_first(results[0]), (results[1] if has_bias else None)

    # dk, dv: grid (B, K, kv tiles, G query heads, listed q tiles).
    width = aux.col_width

    def index_t(b, h, kj, g, jq, sched):
        q_id, _, table_id = _entry(sched, kj, width, jq)
        return b, h * group + g, q_id, kj, table_id

    def q_map_t(*ids):
        return (*index_t(*ids)[:3], 0)

    def kv_map_t(b, h, kj, g, jq, sched):
        return b, h, kj, 0

    specs = [
        pl.BlockSpec((None, None, bq, head_dim), q_map_t),
        pl.BlockSpec((None, None, bkv, head_dim), kv_map_t),
        pl.BlockSpec((None, None, bkv, value_dim), kv_map_t),
        pl.BlockSpec((None, None, bq, value_dim), q_map_t),
        pl.BlockSpec((None, None, bq, 1), q_map_t),
        pl.BlockSpec((None, None, bq, 1), q_map_t),
    ]
    extra_specs, extra = _optional_specs(aux, bias, bq, bkv, index_t)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, aux=aux, has_bias=has_bias, width=width, group=group),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, num_kv_heads, kv_padded // bkv, group, width),
            in_specs=specs + extra_specs,
            out_specs=[
                pl.BlockSpec((None, None, bkv, head_dim), kv_map_t),
                pl.BlockSpec((None, None, bkv, value_dim), kv_map_t),
            ],
            scratch_shapes=[
                pltpu.VMEM((bkv, head_dim), jnp.float32),
                pltpu.VMEM((bkv, value_dim), jnp.float32),
            ],
        ),
        out_shape=[output_like(kt.shape, k.dtype, q), output_like(vt.shape, v.dtype, q)],
        compiler_params=_params(3, 2),
        interpret=cfg.interpret,
        name="jattn_flash_dkv",
    )(aux.cols.reshape(-1), *operands, *extra)
    return dq, _heads_first(dk), _heads_first(dv), dbias
