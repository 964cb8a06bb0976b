"""Attention masks: lazy objects that say *what* may be attended, never *how*.

True means "the query may attend this key". A mask is a predicate on integer positions,
``mask.tile(q_idx, kv_idx) -> bool [..., len(q_idx), len(kv_idx)]``, from which every
implementation takes what it needs:

* ``mask.dense(T, S)``: the boolean matrix, broadcastable to ``[B..., N, T, S]``
  (position-only masks give a NumPy ``[T, S]`` array).
* ``mask.blocks(T, S, block_q, block_kv)``: the block layout, an ``int8`` array
  ``[ceil(T / block_q), ceil(S / block_kv)]`` of ``EMPTY`` / ``PARTIAL`` / ``FULL`` tiles, which the
  chunked, block-sparse and flash implementations read to skip work. Positions past ``T`` or ``S``
  are ignored when classifying a tile.

Masks combine with ``&``, ``|`` and ``~``. ``bool(mask)`` raises, so ``mask_a and mask_b`` fails
loudly instead of silently picking one operand.

Masks are pytrees: data-dependent masks (``padding``, ``segments``, boolean arrays) carry their
arrays as leaves, so they pass through ``jax.jit`` and ``jax.vmap``; position-only masks have no
leaves and are hashable. Data-dependent masks whose arrays are traced have an all-``PARTIAL``
layout (nothing can be skipped that is not known at trace time).

Builders follow the papers they come from: ``strided`` and ``fixed`` (Child et al. 2019, Sparse
Transformer), ``global_tokens`` and ``longformer`` (Beltagy et al. 2020), ``random_blocks`` and
``bigbird`` (Zaheer et al. 2020).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn._checks import check_bool, check_int

EMPTY, PARTIAL, FULL = 0, 1, 2
"""Tile classes in a block layout: nothing attended / some attended / everything attended."""

_PAIRS_PER_EVAL = 1 << 22  # (query, key) pairs evaluated at once when a layout comes from the predicate


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


class Mask:
    """Base class of all masks. Subclasses implement ``tile`` and, where it is cheap, ``_layout``."""

    #: NumPy defers to the reflected operators below (``array & mask``) instead of broadcasting
    #: the operator over the mask as if it were a scalar.
    __array_ufunc__ = None

    #: True when the mask depends only on positions (no arrays), so its layout is known statically.
    position_only: bool = True

    def tile(self, q_idx, kv_idx):
        """Whether query ``q_idx[i]`` may attend key ``kv_idx[j]``.

        Args:
          q_idx: int ``[bq]`` query positions. kv_idx: int ``[bkv]`` key positions.
            NumPy inputs give a NumPy result for position-only masks; JAX inputs a JAX result.
        Returns:
          bool ``[..., bq, bkv]`` where ``...`` are the mask's own batch (and head) dims.
        """
        raise NotImplementedError

    # -- public views -------------------------------------------------------------------------
    def dense(self, q_len: int, kv_len: int):
        """The boolean matrix, broadcastable to ``[B..., N, T, S]`` (NumPy ``[T, S]`` for position-only
        masks; per-batch lengths or segment ids give ``[B..., 1, T, S]``)."""
        q_len = check_int("q_len", q_len)
        kv_len = check_int("kv_len", kv_len)
        _check_data_lengths(self, q_len, kv_len)
        xp = np if self.position_only else jnp
        resolved = self.for_lengths(q_len, kv_len)._with_head_axis()
        return resolved.tile(xp.arange(q_len), xp.arange(kv_len))

    def blocks(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        """Block layout ``int8 [ceil(T/block_q), ceil(S/block_kv)]`` of EMPTY/PARTIAL/FULL.

        The layout holds for every batch element and head: a tile is EMPTY (FULL) only if it is
        empty (full) for all of them.
        """
        args = (
            check_int("q_len", q_len),
            check_int("kv_len", kv_len),
            check_int("block_q", block_q),
            check_int("block_kv", block_kv),
        )
        resolved = self.for_lengths(*args[:2])
        if resolved.position_only:
            return _cached_layout(resolved, *args)
        _check_data_lengths(resolved, *args[:2])
        return resolved._layout(*args)

    def for_lengths(self, q_len: int, kv_len: int) -> Mask:
        """This mask with its length-dependent parts fixed for a ``T × S`` problem.

        Only ``random_blocks`` has such parts (its picks are drawn among the key blocks of the actual
        sequence); every other mask returns itself. ``dense``, ``blocks`` and ``jattn.attention`` call
        it; call it yourself before ``tile`` on a mask that holds random blocks.
        """
        del q_len, kv_len
        return self

    def _attends_every_row(self, q_len: int, kv_len: int) -> bool:
        """True if, for these lengths, every query attends some key and every key is attended by
        some query; False if not or not known (the default).

        The flash kernels zero the rows of a masked tile that nothing in the tile attends, so
        that NaN in a key or query nothing attends at all (padding, an unfilled cache) stays out
        of the matmuls. Where every row is attended somewhere, a NaN reaches the outputs under
        any masking, and they skip that zeroing.
        """
        del q_len, kv_len
        return False

    def _layout(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        """Exact layout from the predicate, evaluated a band of query blocks at a time."""
        if not self._concrete():
            return _all_partial(q_len, kv_len, block_q, block_kv)
        return _layout_from_predicate(self.tile, q_len, kv_len, block_q, block_kv)

    def _concrete(self) -> bool:
        return all(_is_concrete(leaf) for leaf in jax.tree.leaves(self))

    def _canonical(self, batch_shape: tuple[int, ...], num_heads: int) -> Mask:
        """This mask with array leaves reshaped to ``[B|1, N|1, ...]`` (B = prod(batch_shape))."""
        del batch_shape, num_heads
        return self

    def _with_head_axis(self) -> Mask:
        """This mask with a unit head axis after the batch dims of its per-batch data (lengths,
        segment ids), so that ``tile`` gives ``[B..., 1, bq, bkv]`` as a boolean array mask would."""
        return self

    # -- combinators --------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return And(self, _as_mask(other, "other"))

    def __or__(self, other: Mask) -> Mask:
        return Or(self, _as_mask(other, "other"))

    def __rand__(self, other: Mask) -> Mask:
        return And(_as_mask(other, "other"), self)

    def __ror__(self, other: Mask) -> Mask:
        return Or(_as_mask(other, "other"), self)

    def __invert__(self) -> Mask:
        return Not(self)

    def __bool__(self):
        raise TypeError(
            "a Mask has no truth value: combine masks with `&`, `|` and `~`, not `and`, `or`, `not`"
        )


@functools.lru_cache(maxsize=256)
def _cached_layout(mask: Mask, q_len, kv_len, block_q, block_kv) -> np.ndarray:
    layout = mask._layout(q_len, kv_len, block_q, block_kv)
    layout.setflags(write=False)
    return layout


def _all_partial(q_len, kv_len, block_q, block_kv) -> np.ndarray:
    return np.full((-(-q_len // block_q), -(-kv_len // block_kv)), PARTIAL, np.int8)


def evaluate_in_numpy(tile_fn, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
    """``tile_fn(q_idx, kv_idx)`` of a position-only mask as a NumPy array, also while JAX traces:
    a ``from_fn`` predicate built from jnp functions (``jnp.abs``) would otherwise give a tracer."""
    with jax.ensure_compile_time_eval():
        return np.asarray(tile_fn(q_idx, kv_idx))


def _layout_from_predicate(tile_fn, q_len, kv_len, block_q, block_kv) -> np.ndarray:
    """Exact layout from ``tile_fn`` evaluated on every (query, key) pair, a rectangle of tiles of
    about ``_PAIRS_PER_EVAL`` pairs at a time (so memory stays bounded at any length)."""
    num_q_blocks, num_kv_blocks = -(-q_len // block_q), -(-kv_len // block_kv)
    kv_step = max(1, min(num_kv_blocks, _PAIRS_PER_EVAL // (block_q * block_kv)))  # kv tiles per call
    q_step = max(1, _PAIRS_PER_EVAL // (block_q * block_kv * kv_step))  # q tiles per call
    layout = np.empty((num_q_blocks, num_kv_blocks), np.int8)
    for q_start in range(0, num_q_blocks, q_step):
        q_idx = np.arange(q_start * block_q, min(num_q_blocks, q_start + q_step) * block_q)
        for kv_start in range(0, num_kv_blocks, kv_step):
            kv_idx = np.arange(kv_start * block_kv, min(num_kv_blocks, kv_start + kv_step) * block_kv)
            layout[q_start : q_start + q_step, kv_start : kv_start + kv_step] = _classify_rectangle(
                tile_fn, q_idx, kv_idx, q_len, kv_len, block_q, block_kv
            )
    return layout


def _classify_rectangle(tile_fn, q_idx, kv_idx, q_len, kv_len, block_q, block_kv) -> np.ndarray:
    """EMPTY/PARTIAL/FULL of the tiles ``q_idx [nq·bq] × kv_idx [nk·bkv]`` cover (positions past the
    lengths count for neither), over every batch element and head of the mask."""
    nq, nk = len(q_idx) // block_q, len(kv_idx) // block_kv
    allowed = evaluate_in_numpy(tile_fn, np.minimum(q_idx, q_len - 1), np.minimum(kv_idx, kv_len - 1))
    allowed = allowed.reshape(-1, nq, block_q, nk, block_kv)
    valid = (q_idx < q_len).reshape(1, nq, block_q, 1, 1) & (kv_idx < kv_len).reshape(1, 1, 1, nk, block_kv)
    any_true = (allowed & valid).any(axis=(2, 4))  # [batch, nq, nk]
    all_true = (allowed | ~valid).all(axis=(2, 4))
    tiles = _classify(any_true, all_true)
    # A tile may be skipped (EMPTY) or left unmasked (FULL) only if that holds everywhere.
    return np.where((tiles == EMPTY).all(0), EMPTY, np.where((tiles == FULL).all(0), FULL, PARTIAL))


def _tile_bounds(q_len, kv_len, block_q, block_kv):
    """First and last position of every query tile ``[nq, 1]`` and key tile ``[1, nk]``."""
    q0 = np.arange(0, q_len, block_q)[:, None]
    k0 = np.arange(0, kv_len, block_kv)[None, :]
    return q0, np.minimum(q0 + block_q, q_len) - 1, k0, np.minimum(k0 + block_kv, kv_len) - 1


def _classify(any_true, all_true) -> np.ndarray:
    return np.where(all_true, FULL, np.where(any_true, PARTIAL, EMPTY)).astype(np.int8)


def _layout_of_cells(cells, cell_q: int, cell_kv: int, q_len, kv_len, block_q, block_kv) -> np.ndarray:
    """Layout of a mask that is constant on ``cell_q × cell_kv`` cells: ``cells`` bool ``[rows, cols]``
    says which cells are attended (cells past it are not). A tile is FULL (EMPTY) when every (no) cell
    it overlaps is attended, counted with a summed-area table: O(cells + tiles), not O(T·S)."""
    q0, q1, k0, k1 = _tile_bounds(q_len, kv_len, block_q, block_kv)
    q0, q1, k0, k1 = q0 // cell_q, q1 // cell_q, k0 // cell_kv, k1 // cell_kv  # cells each tile overlaps
    reached = np.zeros((int(q1.max()) + 1, int(k1.max()) + 1), bool)  # [cell rows, cell cols]
    rows, cols = min(reached.shape[0], cells.shape[0]), min(reached.shape[1], cells.shape[1])
    reached[:rows, :cols] = cells[:rows, :cols]
    sums = np.zeros((reached.shape[0] + 1, reached.shape[1] + 1), np.int64)
    sums[1:, 1:] = reached.cumsum(0).cumsum(1)
    count = sums[q1 + 1, k1 + 1] - sums[q0, k1 + 1] - sums[q1 + 1, k0] + sums[q0, k0]  # [nq, nk]
    return _classify(count > 0, count == (q1 - q0 + 1) * (k1 - k0 + 1))


def _as_mask(value: Any, name: str) -> Mask:
    if isinstance(value, Mask):
        return value
    if isinstance(value, (np.ndarray, jax.Array)):
        return from_array(value)
    raise TypeError(f"{name} must be a jattn.masks.Mask or a boolean array, got {type(value).__name__}")


@typing.dataclass_transform(frozen_default=True)
def _register(cls=None, *, data_fields: Sequence[str] = (), eq: bool | None = None):
    """Frozen dataclass registered as a pytree; ``data_fields`` are leaves, the rest static.

    Masks without array leaves compare and hash by value (so jit and layout caches hit); masks
    holding arrays compare by identity unless ``eq`` says otherwise.
    """

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True, eq=(not data_fields) if eq is None else eq)(cls)
        meta = [f.name for f in dataclasses.fields(cls) if f.name not in data_fields]
        return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=meta)

    return wrap(cls) if cls is not None else wrap


# ---------------------------------------------------------------------------------------------
# Position-only masks
# ---------------------------------------------------------------------------------------------


class _PositionMask(Mask):
    """A mask given by a predicate ``_allowed(q [bq, 1], kv [1, bkv]) -> bool [bq, bkv]``."""

    def _allowed(self, q, kv):
        raise NotImplementedError

    def tile(self, q_idx, kv_idx):
        return self._allowed(q_idx[:, None], kv_idx[None, :])


@_register
class Full(_PositionMask):
    """Every query attends every key (plain O(T·S) attention)."""

    def _allowed(self, q, kv):
        return (q >= 0) & (kv >= 0)

    def _attends_every_row(self, q_len, kv_len):
        return q_len > 0 and kv_len > 0

    def _layout(self, q_len, kv_len, block_q, block_kv):
        return np.full((-(-q_len // block_q), -(-kv_len // block_kv)), FULL, np.int8)


@_register
class SlidingWindow(_PositionMask):
    """Query ``t`` attends keys ``s`` with ``t - left <= s - offset <= t + right``.

    ``offset = kv_len - q_len`` is not applied: positions are absolute, as in self-attention.
    ``left=None`` means unbounded to the left; ``right=None`` unbounded to the right.
    ``causal`` is ``SlidingWindow(None, 0)``.
    """

    left: int | None = None
    right: int | None = 0

    def _allowed(self, q, kv):
        ok = (q >= 0) & (kv >= 0)
        if self.left is not None:
            ok = ok & (kv >= q - self.left)
        if self.right is not None:
            ok = ok & (kv <= q + self.right)
        return ok

    def _attends_every_row(self, q_len, kv_len):
        # Query t reaches keys [t - left, t + right]. Every query reaches a key if the last one
        # does (q_len - 1 - left <= kv_len - 1); every key is reached if the last one is, by a
        # query t >= kv_len - 1 - right.
        if q_len == 0 or kv_len == 0:
            return False
        last_query_reaches = self.left is None or q_len - 1 - self.left <= kv_len - 1
        last_key_reached = self.right is None or kv_len - 1 - self.right <= q_len - 1
        return last_query_reaches and last_key_reached

    def _layout(self, q_len, kv_len, block_q, block_kv):
        # Analytic. Row t allows keys [lo(t), hi(t)], both increasing in t, so a tile with rows
        # [q0, q1] and keys [k0, k1] meets the band iff k1 >= lo(q0) and k0 <= hi(q1), and lies
        # inside it iff k0 >= lo(q1) and k1 <= hi(q0).
        q0, q1, k0, k1 = _tile_bounds(q_len, kv_len, block_q, block_kv)
        unbounded = q_len + kv_len  # further than any position
        left = unbounded if self.left is None else self.left
        right = unbounded if self.right is None else self.right
        return _classify((k1 >= q0 - left) & (k0 <= q1 + right), (k0 >= q1 - left) & (k1 <= q0 + right))


@_register
class BlockWindow(_PositionMask):
    """Query block ``i`` attends key blocks ``i - half_blocks ... i + half_blocks`` (BigBird)."""

    block: int = 1
    half_blocks: int = 0

    def _allowed(self, q, kv):
        return abs(q // self.block - kv // self.block) <= self.half_blocks

    def _layout(self, q_len, kv_len, block_q, block_kv):
        q0, q1, k0, k1 = (x // self.block for x in _tile_bounds(q_len, kv_len, block_q, block_kv))
        h = self.half_blocks
        return _classify((k1 >= q0 - h) & (k0 <= q1 + h), np.maximum(q1 - k0, k1 - q0) <= h)


@_register
class PrefixLM(_PositionMask):
    """Bidirectional attention within the first ``prefix`` positions, causal after them."""

    prefix: int = 0

    def _allowed(self, q, kv):
        return (kv <= q) | (kv < self.prefix)


@_register
class Strided(_PositionMask):
    """Sparse Transformer strided pattern: keys ``s`` within ``stride`` of the query, plus every
    key with ``(t - s) % stride == 0``; only ``s <= t`` when ``causal``."""

    stride: int = 1
    causal: bool = True

    def _allowed(self, q, kv):
        distance = q - kv if self.causal else abs(q - kv)
        pattern = (distance < self.stride) | (distance % self.stride == 0)
        return pattern & (distance >= 0) & (kv >= 0)


@_register
class Fixed(_PositionMask):
    """Sparse Transformer fixed pattern: keys in the query's own block of ``block`` positions,
    plus the last ``summary`` positions of every block (the summary cells); only ``s <= t`` when
    ``causal``."""

    block: int = 1
    summary: int = 1
    causal: bool = True

    def _allowed(self, q, kv):
        same_block = (q // self.block) == (kv // self.block)
        summary_cell = (kv % self.block) >= (self.block - self.summary)
        allowed = (same_block | summary_cell) & (kv >= 0) & (q >= 0)
        return allowed & (kv <= q) if self.causal else allowed


@_register
class GlobalTokens(_PositionMask):
    """Global positions attend everything and are attended by everything (Longformer)."""

    indices: tuple[int, ...] = ()

    def _allowed(self, q, kv):
        xp = np if isinstance(q, np.ndarray) else jnp
        idx = xp.asarray(self.indices, dtype=q.dtype)
        is_global_q = (q[..., None] == idx).any(-1)
        is_global_kv = (kv[..., None] == idx).any(-1)
        return is_global_q | is_global_kv

    def _layout(self, q_len, kv_len, block_q, block_kv):
        # A tile is touched iff it holds a global query or key; it is full iff all its queries or
        # all its keys are global (otherwise one non-global pair is masked).
        def per_tile(length, block):
            is_global = np.zeros(-(-length // block) * block, bool)
            is_global[[i for i in self.indices if i < length]] = True
            is_global[length:] = True  # positions past the end do not count against "all"
            tiles = is_global.reshape(-1, block)
            real = (np.arange(tiles.size) < length).reshape(-1, block)
            return (tiles & real).any(1), tiles.all(1)

        q_any, q_all = per_tile(q_len, block_q)
        kv_any, kv_all = per_tile(kv_len, block_kv)
        return _classify(q_any[:, None] | kv_any[None, :], q_all[:, None] | kv_all[None, :])


@_register
class BlockLayout(_PositionMask):
    """Explicit block pattern: tile ``(i, j)`` of size ``block_q × block_kv`` is allowed when
    ``layout[i][j]``. A layout must cover the lengths it is used at; blocks past them are ignored."""

    layout: tuple[tuple[bool, ...], ...] = ()
    block_q: int = 1
    block_kv: int = 1

    def for_lengths(self, q_len, kv_len):
        needed = (-(-q_len // self.block_q), -(-kv_len // self.block_kv))
        shape = (len(self.layout), len(self.layout[0]) if self.layout else 0)
        if shape[0] < needed[0] or shape[1] < needed[1]:
            raise ValueError(
                f"from_blocks layout of shape {list(shape)} with {self.block_q}x{self.block_kv} blocks "
                f"covers {shape[0] * self.block_q} queries and {shape[1] * self.block_kv} keys; "
                f"T={q_len}, S={kv_len} need at least {list(needed)} blocks"
            )
        return self

    def _allowed(self, q, kv):
        xp = np if isinstance(q, np.ndarray) else jnp
        table = xp.asarray(self.layout, dtype=bool)
        qb, kb = q // self.block_q, kv // self.block_kv
        in_range = (qb < table.shape[0]) & (kb < table.shape[1])
        rows = xp.minimum(qb, table.shape[0] - 1)
        cols = xp.minimum(kb, table.shape[1] - 1)
        return in_range & table[rows, cols]

    def _layout(self, q_len, kv_len, block_q, block_kv):
        return _layout_of_cells(
            np.asarray(self.layout, bool), self.block_q, self.block_kv, q_len, kv_len, block_q, block_kv
        )


@_register
class RandomBlocks(_PositionMask):
    """Query block ``i`` (of ``block`` positions) attends ``num_random`` key blocks drawn at random
    from ``seed`` among the key blocks of the sequence; ``picks[i]`` once the lengths are known."""

    block: int = 1
    num_random: int = 0
    seed: int = 0
    picks: tuple[tuple[int, ...], ...] | None = None

    def for_lengths(self, q_len, kv_len):
        picks = _draw_random_blocks(self.block, self.num_random, self.seed, q_len, kv_len)
        return self if picks == self.picks else dataclasses.replace(self, picks=picks)

    def _allowed(self, q, kv):
        if self.picks is None:
            raise ValueError(
                "random_blocks are drawn for given lengths: call mask.for_lengths(T, S) before tile(), "
                "or use mask.dense(T, S), mask.blocks(...) or jattn.attention"
            )
        xp = np if isinstance(q, np.ndarray) else jnp
        table = xp.asarray(self.picks, dtype=q.dtype).reshape(len(self.picks), -1)  # [rows, num_random]
        q_block = q // self.block
        rows = table[xp.minimum(q_block, len(self.picks) - 1)]  # [bq, 1, num_random]
        hit = ((kv // self.block)[..., None] == rows).any(-1)
        return hit & (q_block < len(self.picks)) & (kv >= 0)

    def _layout(self, q_len, kv_len, block_q, block_kv):
        picks = self.picks or ()  # drawn by for_lengths: [query block][num_random]
        cells = np.zeros((len(picks), -(-kv_len // self.block)), bool)  # [query block, key block]
        if picks and picks[0]:
            cells[np.arange(len(picks))[:, None], np.array(picks)] = True
        return _layout_of_cells(cells, self.block, self.block, q_len, kv_len, block_q, block_kv)


@_register
class FromFn(_PositionMask):
    """Any predicate ``fn(q_idx, kv_idx) -> bool`` built from array operations (NumPy and jnp)."""

    fn: Callable[[Any, Any], Any] = None  # type: ignore[assignment]

    def _allowed(self, q, kv):
        try:
            allowed = self.fn(q, kv)
        except jax.errors.TracerArrayConversionError as error:
            raise TypeError(
                "from_fn: fn called a NumPy function on traced positions (implementations evaluate "
                "masks inside jit); use operators and jnp functions (jnp.abs, jnp.logical_and), "
                "which work on NumPy and traced positions alike"
            ) from error
        # Checked on every evaluation (dense, layouts, tables, traced): integers would pass as
        # "allowed where non-zero", and ``~`` would turn them into non-zero bitwise nots.
        dtype = allowed.dtype if hasattr(allowed, "dtype") else np.asarray(allowed).dtype
        if dtype != np.bool_:
            raise TypeError(f"from_fn: fn must return booleans (a comparison such as q >= k), got {dtype}")
        return allowed & (q >= 0) & (kv >= 0)


# ---------------------------------------------------------------------------------------------
# Combinations
# ---------------------------------------------------------------------------------------------


def _combine_layouts(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if op == "and":
        full = (a == FULL) & (b == FULL)
        empty = (a == EMPTY) | (b == EMPTY)
    else:
        full = (a == FULL) | (b == FULL)
        empty = (a == EMPTY) & (b == EMPTY)
    return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)


class _Binary(Mask):
    a: Mask
    b: Mask
    _op = ""

    @property
    def position_only(self):  # type: ignore[override]
        return self.a.position_only and self.b.position_only

    def _layout(self, q_len, kv_len, block_q, block_kv):
        # Combines the operands' layouts: exact for EMPTY/FULL, conservative (PARTIAL) where both
        # operands are PARTIAL and the result happens to be empty or full.
        la = self.a.blocks(q_len, kv_len, block_q, block_kv)
        lb = self.b.blocks(q_len, kv_len, block_q, block_kv)
        return _combine_layouts(self._op, la, lb)

    def _canonical(self, batch_shape, num_heads):
        return type(self)(
            self.a._canonical(batch_shape, num_heads), self.b._canonical(batch_shape, num_heads)
        )

    def for_lengths(self, q_len, kv_len):
        return type(self)(self.a.for_lengths(q_len, kv_len), self.b.for_lengths(q_len, kv_len))

    def _with_head_axis(self):
        return type(self)(self.a._with_head_axis(), self.b._with_head_axis())


@_register(data_fields=("a", "b"), eq=True)
class And(_Binary):
    a: Mask
    b: Mask
    _op = "and"

    def tile(self, q_idx, kv_idx):
        return self.a.tile(q_idx, kv_idx) & self.b.tile(q_idx, kv_idx)


@_register(data_fields=("a", "b"), eq=True)
class Or(_Binary):
    a: Mask
    b: Mask
    _op = "or"

    def tile(self, q_idx, kv_idx):
        return self.a.tile(q_idx, kv_idx) | self.b.tile(q_idx, kv_idx)


@_register(data_fields=("a",), eq=True)
class Not(Mask):
    a: Mask

    @property
    def position_only(self):  # type: ignore[override]
        return self.a.position_only

    def tile(self, q_idx, kv_idx):
        return ~self.a.tile(q_idx, kv_idx)

    def _layout(self, q_len, kv_len, block_q, block_kv):
        layout = self.a.blocks(q_len, kv_len, block_q, block_kv)
        return (FULL - layout).astype(np.int8)

    def _canonical(self, batch_shape, num_heads):
        return Not(self.a._canonical(batch_shape, num_heads))

    def for_lengths(self, q_len, kv_len):
        return Not(self.a.for_lengths(q_len, kv_len))

    def _with_head_axis(self):
        return Not(self.a._with_head_axis())


# ---------------------------------------------------------------------------------------------
# Data-dependent masks
# ---------------------------------------------------------------------------------------------


def _flatten_batch(x, batch_shape: tuple[int, ...], trailing: int):
    """``x [b..., *trailing dims]`` with ``b...`` broadcastable to batch_shape -> ``[B|1, ...]``."""
    lead = x.shape[: x.ndim - trailing]
    rest = x.shape[x.ndim - trailing :]
    if all(d == 1 for d in lead):
        return x.reshape(1, *rest)
    x = jnp.broadcast_to(x, (*batch_shape, *rest))
    return x.reshape(math.prod(batch_shape), *rest)


@_register(data_fields=("q_lengths", "kv_lengths"))
class Padding(Mask):
    """Queries ``t < q_lengths`` attend keys ``s < kv_lengths`` (per batch element)."""

    q_lengths: Any
    kv_lengths: Any
    position_only = False

    def tile(self, q_idx, kv_idx):
        q_ok = q_idx < jnp.asarray(self.q_lengths)[..., None]  # [..., bq]
        kv_ok = kv_idx < jnp.asarray(self.kv_lengths)[..., None]  # [..., bkv]
        return q_ok[..., :, None] & kv_ok[..., None, :]

    def _canonical(self, batch_shape, num_heads):
        flat = [
            _flatten_batch(jnp.asarray(x), batch_shape, 0)[:, None]  # [B|1, 1]
            for x in (self.q_lengths, self.kv_lengths)
        ]
        return Padding(*flat)

    def _with_head_axis(self):
        lengths = [jnp.asarray(x) for x in (self.q_lengths, self.kv_lengths)]
        if all(x.ndim == 0 for x in lengths):  # one length for all: no batch axis to follow
            return self
        return Padding(*(x[..., None] for x in lengths))  # [B..., 1]


@_register(data_fields=("q_segment_ids", "kv_segment_ids"))
class Segments(Mask):
    """Packed sequences: a query attends keys with the same segment id."""

    q_segment_ids: Any
    kv_segment_ids: Any
    position_only = False

    def tile(self, q_idx, kv_idx):
        q_seg = jnp.take(jnp.asarray(self.q_segment_ids), q_idx, axis=-1, mode="clip")  # [..., bq]
        kv_seg = jnp.take(jnp.asarray(self.kv_segment_ids), kv_idx, axis=-1, mode="clip")
        return q_seg[..., :, None] == kv_seg[..., None, :]

    def _canonical(self, batch_shape, num_heads):
        flat = [
            _flatten_batch(jnp.asarray(x), batch_shape, 1)[:, None]  # [B|1, 1, len]
            for x in (self.q_segment_ids, self.kv_segment_ids)
        ]
        return Segments(*flat)

    def _with_head_axis(self):
        ids = [jnp.asarray(x) for x in (self.q_segment_ids, self.kv_segment_ids)]
        if all(x.ndim == 1 for x in ids):  # one sequence for all: no batch axis to follow
            return self
        return Segments(*(x[..., None, :] for x in ids))  # [B..., 1, len]


@_register(data_fields=("array",))
class ArrayMask(Mask):
    """A boolean array broadcastable to ``[B..., N, T, S]`` used as a mask."""

    array: Any
    position_only = False

    def tile(self, q_idx, kv_idx):
        arr = jnp.asarray(self.array)
        rows = jnp.take(arr, q_idx, axis=-2, mode="clip")
        return jnp.take(rows, kv_idx, axis=-1, mode="clip")

    def _canonical(self, batch_shape, num_heads):
        arr = jnp.asarray(self.array)
        arr = arr.reshape((1,) * (len(batch_shape) + 3 - arr.ndim) + arr.shape)  # [b..., n, t, s]
        return ArrayMask(_flatten_batch(arr, batch_shape, 3))


def _data_parts(mask: Mask) -> list[Mask]:
    """The parts of ``mask`` that hold arrays (lengths, segment ids, boolean arrays)."""
    data = (Padding, Segments, ArrayMask)
    return [
        part
        for part in jax.tree.leaves(mask, is_leaf=lambda x: isinstance(x, data))
        if isinstance(part, data)
    ]


def _check_data_lengths(mask: Mask, q_len: int, kv_len: int) -> None:
    """Segment ids and boolean arrays must cover ``q_len`` queries and ``kv_len`` keys (or broadcast
    from 1): ``tile`` clips positions beyond them, which would repeat the last one."""
    for part in _data_parts(mask):
        if isinstance(part, Segments):
            for name, ids, length in (
                ("q_segment_ids", part.q_segment_ids, q_len),
                ("kv_segment_ids", part.kv_segment_ids, kv_len),
            ):
                if np.shape(ids)[-1] != length:
                    raise ValueError(
                        f"{name} must have shape [B..., {length}] for q_len={q_len}, kv_len={kv_len}, "
                        f"got shape {np.shape(ids)}"
                    )
        elif isinstance(part, ArrayMask):
            trailing = np.shape(part.array)[-2:]
            if any(dim not in (1, length) for dim, length in zip(trailing, (q_len, kv_len), strict=True)):
                raise ValueError(
                    f"mask array must end in [T, S] = [{q_len}, {kv_len}] (or 1 to broadcast), got shape "
                    f"{np.shape(part.array)}"
                )


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def full() -> Mask:
    """No masking: every query attends every key."""
    return Full()


def causal(offset: int = 0) -> Mask:
    """Query ``t`` attends keys ``s <= t + offset`` (decoder self-attention).

    Args:
      offset: the position of the first query among the keys. With the default 0 the mask is
        aligned at the top left, as ``jax.nn.dot_product_attention(is_causal=True)`` is when
        T != S; decoding T new tokens after a cache of S - T keys takes ``offset=S - T``, which
        aligns the last query with the last key.
    """
    return SlidingWindow(None, check_int("offset", offset, minimum=0))


def sliding_window(left: int, right: int = 0) -> Mask:
    """Local attention: query ``t`` attends keys ``t - left <= s <= t + right``.

    ``sliding_window(w)`` is causal local attention over the last ``w + 1`` positions;
    ``sliding_window(w, w)`` is the symmetric window of an encoder (Longformer's local part). A
    reach of ``2**30`` or more (``sys.maxsize`` for "no limit") is unbounded: in int32 positions,
    ``t + right`` would wrap.
    """
    bounded = lambda reach: None if reach >= _UNBOUNDED_REACH else reach  # noqa: E731
    return SlidingWindow(
        bounded(check_int("left", left, minimum=0)),
        bounded(check_int("right", right, minimum=0)),
    )


_UNBOUNDED_REACH = 1 << 30  # a window reaching this far reaches every position of any sequence


def _lengths(name: str, value: Any):
    arr = jnp.asarray(value) if not isinstance(value, np.ndarray) else value
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if _is_concrete(arr) and np.any(np.asarray(arr) < 0):
        raise ValueError(f"{name} must be >= 0, got {np.asarray(arr)}")
    return arr


def padding(q_lengths: Any, kv_lengths: Any | None = None) -> Mask:
    """Valid-length masking for padded batches: int ``[B...]`` lengths of queries and keys.

    ``kv_lengths`` defaults to ``q_lengths`` (self-attention). Padded queries get zero output.
    """
    q_lengths = _lengths("q_lengths", q_lengths)
    kv_lengths = q_lengths if kv_lengths is None else _lengths("kv_lengths", kv_lengths)
    _check_batches_broadcast("q_lengths", q_lengths.shape, "kv_lengths", kv_lengths.shape)
    return Padding(q_lengths, kv_lengths)


def _check_batches_broadcast(q_name: str, q_batch: tuple, kv_name: str, kv_batch: tuple) -> None:
    try:
        np.broadcast_shapes(q_batch, kv_batch)
    except ValueError:
        raise ValueError(
            f"the batch dims of {q_name} and {kv_name} must broadcast together, got {q_batch} and {kv_batch}"
        ) from None


def segments(q_segment_ids: Any, kv_segment_ids: Any | None = None) -> Mask:
    """Packed sequences: int ``[B..., T]`` and ``[B..., S]`` segment ids; equal ids attend."""
    q_ids = _lengths("q_segment_ids", q_segment_ids)
    kv_ids = q_ids if kv_segment_ids is None else _lengths("kv_segment_ids", kv_segment_ids)
    if q_ids.ndim == 0 or kv_ids.ndim == 0:
        raise ValueError(
            f"segment ids must have a sequence axis, got q_segment_ids.shape={q_ids.shape} and "
            f"kv_segment_ids.shape={kv_ids.shape}"
        )
    _check_batches_broadcast("q_segment_ids", q_ids.shape[:-1], "kv_segment_ids", kv_ids.shape[:-1])
    return Segments(q_ids, kv_ids)


def prefix_lm(prefix: int) -> Mask:
    """Prefix language model: full attention over the first ``prefix`` positions, causal after."""
    return PrefixLM(check_int("prefix", prefix, minimum=0))


def strided(stride: int, *, causal: bool = True) -> Mask:
    """Sparse Transformer strided attention (Child et al. 2019)."""
    return Strided(check_int("stride", stride), check_bool("causal", causal))


def fixed(block: int, summary: int = 1, *, causal: bool = True) -> Mask:
    """Sparse Transformer fixed attention (Child et al. 2019)."""
    block = check_int("block", block)
    summary = check_int("summary", summary)
    if summary > block:
        raise ValueError(f"summary must be <= block, got summary={summary}, block={block}")
    return Fixed(block, summary, check_bool("causal", causal))


def global_tokens(indices: Sequence[int]) -> Mask:
    """Positions ``indices`` attend and are attended by all positions (Longformer's global part)."""
    array = np.asarray(indices)
    if array.size and (array.dtype == bool or not np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"indices must be integer positions, got {array.dtype} {indices!r}")
    indices = tuple(int(i) for i in array.reshape(-1))
    if any(i < 0 for i in indices):
        raise ValueError(f"indices must be >= 0, got {indices}")
    return GlobalTokens(indices)


def random_blocks(block: int, num_random: int, seed: int = 0) -> Mask:
    """BigBird's random part: each query block attends ``num_random`` key blocks drawn at random.

    The draw depends on ``seed``, the query block and the number of key blocks of the sequence it is
    used with (fixed by ``for_lengths``), so every row has ``num_random`` random blocks at any length
    (all the key blocks there are, when the sequence has fewer).
    """
    return RandomBlocks(
        check_int("block", block),
        check_int("num_random", num_random, minimum=0),
        check_int("seed", seed, minimum=0),
    )


@functools.lru_cache(maxsize=64)
def _draw_random_blocks(block, num_random, seed, q_len, kv_len) -> tuple[tuple[int, ...], ...]:
    num_q_blocks, num_kv_blocks = -(-q_len // block), -(-kv_len // block)
    take = min(num_random, num_kv_blocks)
    return tuple(
        tuple(
            sorted(
                int(j) for j in np.random.default_rng([seed, i]).choice(num_kv_blocks, take, replace=False)
            )
        )
        for i in range(num_q_blocks)
    )


def from_blocks(layout: Any, block_q: int, block_kv: int | None = None) -> Mask:
    """An explicit block pattern: bool (or 0/1) ``[num_q_blocks, num_kv_blocks]``, true where the
    whole tile is attended. It must cover the lengths it is used at (blocks past them are ignored)."""
    arr = np.asarray(layout)
    if arr.ndim != 2:
        raise ValueError(f"layout must be 2-D [num_q_blocks, num_kv_blocks], got shape {arr.shape}")
    stray = [] if arr.dtype == bool else sorted(set(np.unique(arr).tolist()) - {0, 1})
    if stray:
        raise ValueError(
            f"layout must be boolean or 0/1 (1: the tile is attended), got values {stray[:5]}; a "
            "mask.blocks() layout (PARTIAL 1, FULL 2) describes a mask's tiles: pass that mask instead"
        )
    block_q = check_int("block_q", block_q)
    block_kv = block_q if block_kv is None else check_int("block_kv", block_kv)
    return BlockLayout(tuple(map(tuple, arr.astype(bool).tolist())), block_q, block_kv)


def from_fn(fn: Callable[[Any, Any], Any]) -> Mask:
    """Any predicate of query and key positions, e.g. ``from_fn(lambda q, k: (q - k) % 3 == 0)``.

    ``fn`` receives broadcastable integer arrays, NumPy ones for layouts and traced ones inside the
    implementations, so it must use operators and jnp functions (``jnp.abs``, not ``np.abs``) and
    must return booleans (a ``TypeError`` is raised when the mask is evaluated otherwise).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    return FromFn(fn)


def from_array(array: Any) -> Mask:
    """A boolean array broadcastable to ``[B..., N, T, S]`` as a mask."""
    arr = array if isinstance(array, (np.ndarray, jax.Array)) else np.asarray(array)
    if arr.dtype != bool:
        raise TypeError(f"a mask array must have dtype bool, got {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"a mask array needs at least [T, S] dims, got shape {arr.shape}")
    return ArrayMask(arr)


def longformer(window: int, global_indices: Sequence[int] = (0,), *, causal: bool = False) -> Mask:
    """Longformer (Beltagy et al. 2020): a sliding window of ``window`` on each side plus global
    tokens. ``causal``: the whole pattern restricted to keys ``s <= t`` (the window on the left only,
    and the global tokens attend and are attended by the past only)."""
    window = check_int("window", window, minimum=0)
    pattern = sliding_window(window, 0 if check_bool("causal", causal) else window) | global_tokens(
        global_indices
    )
    return pattern & SlidingWindow(None, 0) if causal else pattern  # ``causal()``, shadowed here


def bigbird(
    block: int,
    num_window_blocks: int = 3,
    num_global_blocks: int = 1,
    num_random: int = 2,
    seed: int = 0,
) -> Mask:
    """BigBird (Zaheer et al. 2020) at block granularity: a window of ``num_window_blocks`` blocks
    centred on the query's block (so an odd number: ``num_window_blocks // 2`` on each side), the
    first ``num_global_blocks`` blocks global, ``num_random`` random blocks per query block."""
    block = check_int("block", block)
    w = check_int("num_window_blocks", num_window_blocks)
    if w % 2 == 0:
        raise ValueError(
            "num_window_blocks must be odd (the window is centred on the query's block), "
            f"got num_window_blocks={w}"
        )
    g = check_int("num_global_blocks", num_global_blocks, minimum=0)
    random = random_blocks(block, num_random, seed)  # checks num_random and seed
    pattern: Mask = BlockWindow(block, w // 2)
    if num_random:  # none: a window and globals, which banded attention runs
        pattern = pattern | random
    if g:
        pattern = pattern | global_tokens(range(g * block))
    return pattern
