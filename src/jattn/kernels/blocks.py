"""From a mask to what the flash kernel is given: tile schedules, an in-kernel mask formula, a table.

* ``make_schedule``: the block layout (``mask.blocks``) as per-q-tile lists of the non-empty kv
  tiles (forward and dq pass) and the transposed per-kv-tile lists of q tiles (dk/dv pass), full
  tiles before masked ones, each entry with an index into the compact tile table. Empty tiles are
  not in the lists, so the kernels never load or compute them.
* ``mask_formula``: masks the kernel can compute from positions (causal, sliding window, prefix
  LM) and from per-position vectors (padding lengths, segment ids), combined with ``& | ~``.
* ``tile_table``: any other mask (BigBird/random blocks, ``from_fn``, boolean arrays, global
  tokens...) as a compact ``[B|1, N|1, P, bq, bkv]`` table holding only its P partial tiles.
* ``as_index``: a static int in the dtype of a kernel's grid or loop index.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jattn import masks as masks_lib
from jattn.core.chunked import make_plan
from jattn.kernels._config import HEADER, entries_per_row, row_length

# Position-only masks whose ``_allowed`` uses only comparisons, so Triton and Mosaic lower it.
IN_KERNEL_POSITION_MASKS = (masks_lib.Full, masks_lib.SlidingWindow, masks_lib.PrefixLM)


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Which tiles each kernel pass visits, as packed int32 rows the kernels index directly.

    Row ``r`` of ``rows`` (one per q tile, forward/dq; ``cols`` is one per kv tile, dk/dv) is
    ``[count, num_full, ids[W], table[W]]``: the first ``count`` entries of ``ids`` are the
    visited tiles, the ``num_full`` full ones first and then the masked ones, each in increasing
    order, so entry j is masked exactly when ``num_full <= j < count``. A loop-based kernel thus
    runs two loops with no branch inside (a branch around the tile math stops Triton from
    pipelining the loads and the matmuls). Entries past ``count`` repeat the last visited id (a
    grid-based kernel then re-uses the block it already holds instead of fetching a new one).
    ``table[j]`` is the index of a masked entry's tile in the compact tile table.

    Attributes:
      rows: int32 ``[num_q_blocks, HEADER + 2 * W]``. cols: int32 ``[num_kv_blocks, HEADER + 2 * Wt]``.
      partial_tiles: int32 ``[P, 2]`` (q tile, kv tile) of the tiles the table holds.
      block_q, block_kv: tile sizes.
    """

    rows: np.ndarray
    cols: np.ndarray
    partial_tiles: np.ndarray
    block_q: int
    block_kv: int

    @property
    def width(self) -> int:
        return entries_per_row(self.rows.shape[1])

    @property
    def transposed_width(self) -> int:
        return entries_per_row(self.cols.shape[1])

    @property
    def num_q_blocks(self) -> int:
        return self.rows.shape[0]

    @property
    def num_kv_blocks(self) -> int:
        return self.cols.shape[0]


def _tiles(ids: np.ndarray, r: int, transposed: bool):
    """Index of the (q tile, kv tile) pairs of entries ``ids`` in schedule row ``r``."""
    row = np.full(len(ids), r)
    return (ids, row) if transposed else (row, ids)


def _pack(lists, masked: np.ndarray, table_index: np.ndarray, transposed: bool) -> np.ndarray:
    """Visiting lists -> packed rows ``[count, num_full, ids, table]`` (see ``Schedule``)."""
    width = max([len(ids) for ids in lists] + [1])
    packed = np.zeros((len(lists), row_length(width)), np.int32)
    for r, ids in enumerate(lists):
        ids = np.asarray(ids, np.int32)
        count = len(ids)
        is_masked = masked[_tiles(ids, r, transposed)]
        ids = np.concatenate([ids[~is_masked], ids[is_masked]])  # full tiles first, both sorted
        padded = np.full(width, ids[-1] if count else 0, np.int32)
        padded[:count] = ids
        packed[r, 0] = count
        packed[r, 1] = count - int(is_masked.sum())
        body = packed[r, HEADER:]
        body[:width] = padded
        body[width:] = table_index[_tiles(padded, r, transposed)]
    return packed


def make_schedule(layout: np.ndarray, q_len: int, kv_len: int, block_q: int, block_kv: int) -> Schedule:
    """Build the kernel schedule from a block layout (``int8 [num_q_blocks, num_kv_blocks]``)."""
    plan = make_plan(np.array(layout), q_len, kv_len, block_q, block_kv)
    masked = np.asarray(plan.masked, bool)  # [nq, nk]: PARTIAL or crossing the end of the keys
    partial = np.argwhere(masked & (np.asarray(layout) != masks_lib.EMPTY)).astype(np.int32)  # [P, 2]
    table_index = np.zeros(masked.shape, np.int32)
    table_index[partial[:, 0], partial[:, 1]] = np.arange(len(partial))
    return Schedule(
        rows=_pack(plan.kv_ids, masked, table_index, transposed=False),
        cols=_pack(plan.q_ids, masked, table_index, transposed=True),
        partial_tiles=partial,
        block_q=block_q,
        block_kv=block_kv,
    )


def schedule_for_plan(plan) -> Schedule:
    """The kernel schedule of a ``jattn.core.chunked`` plan (its visited and masked tiles, as given)."""
    layout = np.full((plan.num_q_blocks, plan.num_kv_blocks), masks_lib.EMPTY, np.int8)
    for qi, kv_ids in enumerate(plan.kv_ids):
        for kj in kv_ids:
            layout[qi, kj] = masks_lib.PARTIAL if plan.masked[qi][kj] else masks_lib.FULL
    return make_schedule(layout, plan.q_len, plan.kv_len, plan.block_q, plan.block_kv)


def visited_tiles(schedule: Schedule) -> tuple[int, int]:
    """(tiles the forward/dq loops visit, tiles the dk/dv loops visit), read from the counts."""
    return int(schedule.rows[:, 0].sum()), int(schedule.cols[:, 0].sum())


def as_index(value: int, index):
    """The static int ``value`` in the dtype of a grid or loop ``index`` (int32), for the kernels'
    ``lax.div`` and ``lax.rem``, which take one dtype: under ``jax_enable_x64`` a Python int is
    int64. (They truncate; ``//`` would lower to a floor division with selects.)"""
    return jnp.asarray(value, jnp.result_type(index))


# ---------------------------------------------------------------------------------------------
# The in-kernel formula
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Vectors:
    """Per-position vectors the formula reads: q-side ``[B|1, T]``, kv-side ``[B|1, S]``."""

    q_len: int
    kv_len: int
    q: list
    kv: list


def _formula(mask: masks_lib.Mask, vectors: _Vectors):
    """The static formula of ``mask``, appending its vectors; None if the kernel cannot compute it."""
    if isinstance(mask, IN_KERNEL_POSITION_MASKS):
        return ("position", mask)
    if isinstance(mask, masks_lib.Padding):  # canonical lengths [B|1, 1]
        vectors.q.append(jnp.arange(vectors.q_len)[None, :] < mask.q_lengths)
        vectors.kv.append(jnp.arange(vectors.kv_len)[None, :] < mask.kv_lengths)
        return ("padding", len(vectors.q) - 1, len(vectors.kv) - 1)
    if isinstance(mask, masks_lib.Segments):  # canonical ids [B|1, 1, len]
        vectors.q.append(mask.q_segment_ids[:, 0])
        vectors.kv.append(mask.kv_segment_ids[:, 0])
        return ("segments", len(vectors.q) - 1, len(vectors.kv) - 1)
    if isinstance(mask, masks_lib.Not):
        inner = _formula(mask.a, vectors)
        return None if inner is None else ("not", inner)
    if isinstance(mask, (masks_lib.And, masks_lib.Or)):
        a, b = _formula(mask.a, vectors), _formula(mask.b, vectors)
        if a is None or b is None:
            return None
        return ("and" if isinstance(mask, masks_lib.And) else "or", a, b)
    return None


def mask_formula(mask: masks_lib.Mask | None, q_len: int, kv_len: int):
    """``(formula, q_vectors, kv_vectors)`` for a canonical mask.

    ``formula`` is None without a mask, ``("table",)`` when some part of the mask is not a
    position formula (then the whole mask goes through ``tile_table``). Vectors are int32
    ``[B|1, T]`` / ``[B|1, S]``.
    """
    if mask is None:
        return None, [], []
    vectors = _Vectors(q_len, kv_len, [], [])
    formula = _formula(mask, vectors)
    if formula is None:
        return ("table",), [], []
    as_int = lambda xs: [jnp.asarray(x).astype(jnp.int32) for x in xs]  # noqa: E731
    return formula, as_int(vectors.q), as_int(vectors.kv)


def tile_table(mask, schedule: Schedule, q_len: int, kv_len: int):
    """The mask on the schedule's partial tiles: int8 ``[B|1, N|1, P, bq, bkv]`` (P >= 1).

    ``mask`` is anything with ``tile(q_idx [bq], kv_idx [bkv]) -> bool [..., bq, bkv]`` (a canonical
    ``jattn.masks.Mask``, whose leading dims are ``[B|1, N|1]``). It is evaluated on the P partial
    tiles only, vmapped over them inside the traced computation: P·bq·bkv entries per batch element
    and head, never the ``[T, S]`` matrix, and no constant baked into the program. Positions past
    the end read as the last one, so a mask may look them up in data of the true length (as
    ``masks._layout_from_predicate`` evaluates it); the kernels exclude keys past ``kv_len`` and
    the wrapper drops padded query rows, so those bits are unused.
    """
    bq, bkv = schedule.block_q, schedule.block_kv
    partial = jnp.asarray(schedule.partial_tiles)  # [P, 2]
    if partial.shape[0] == 0:
        return jnp.zeros((1, 1, 1, bq, bkv), jnp.int8)
    q_idx = jnp.minimum(partial[:, :1] * bq + jnp.arange(bq), q_len - 1)  # [P, bq]
    kv_idx = jnp.minimum(partial[:, 1:] * bkv + jnp.arange(bkv), kv_len - 1)  # [P, bkv]
    tiles = jax.vmap(mask.tile, out_axes=-3)(q_idx, kv_idx)  # [..., P, bq, bkv]
    return tiles.reshape((1,) * (5 - tiles.ndim) + tiles.shape).astype(jnp.int8)
