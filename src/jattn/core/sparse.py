"""``implementation="banded"`` and ``"block_sparse"``: exact attention over only what the mask allows.

Both compute the same numbers as dense attention with the same mask, but never form the ``[T, S]``
scores. Queries are cut into blocks; each query block gathers the key/value positions it may need
into a ``[C]`` list (C much smaller than S) and runs the dense per-head math of
``dense.dense_attention_one_head`` on that ``[block, C]`` tile, with the mask evaluated elementwise
on the gathered positions. Query blocks run a bounded group at a time, and the backward pass
recomputes each group (autodiff through the gather: a scatter-add into dk, dv, in float32 for
16-bit inputs), so time and memory grow linearly with the number of gathered tiles, forward and
backward.

* ``"banded"`` (sliding-window masks, Beltagy et al. 2020 Longformer): the mask must lie inside a
  band ``t - left <= s <= t + right`` plus global tokens. Query block ``i`` takes the contiguous key
  span ``[i·b - left, (i + 1)·b + right)`` plus the global key columns; global query rows attend all
  keys densely. Cost O(T·(left + right + b) + g·(T + S)) for g global tokens.
* ``"block_sparse"`` (Child et al. 2019 Sparse Transformer; Zaheer et al. 2020 BigBird): any mask;
  each query block gathers only the key/value blocks its row of the block layout lists as
  non-empty. Rows are bucketed by their number of non-empty blocks (rounded up to a power of two),
  so a few dense rows (BigBird's global blocks) do not make every row dense: the cost is at most
  twice the number of non-empty tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn import masks as masks_lib
from jattn.attention import Problem, register_implementation
from jattn.core._batching import vmap_over_heads
from jattn.core.dense import dense_attention_one_head

_BLOCK_CANDIDATES = (128, 64, 32)  # block_sparse tries these tile sizes, largest first
_BLOCK_SLACK = 1.25  # and keeps the largest whose gathered area is within this factor of the best
_MIN_BAND_BLOCK, _MAX_BAND_BLOCK = 16, 128
# Query blocks are processed a group at a time, each group computing about this many logits over all
# heads. On a CPU, 2^20 (4 MiB in float32): a bounded working set keeps time linear in the length, where
# vmapping every block at once made the gathered tiles outgrow the caches between 4096 and 8192 tokens
# (forward 2.5-3x slower at 32768, a fitted time exponent of 1.25-1.35 instead of 1.0). On a GPU or TPU
# the aim is to fill the device, not a cache: groups 64x larger bound the memory of very long inputs
# without a long serial loop (not yet measured on one).
_LOGITS_PER_STEP = {"cpu": 1 << 20, "accelerator": 1 << 26}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Shared core: attention of query blocks over gathered key/value positions
# ---------------------------------------------------------------------------------------------


def _rows_per_step(heads, block_logits: int) -> int:
    """Query blocks per group: about ``_LOGITS_PER_STEP`` logits over all heads, at least one block.

    ``heads`` (batch × heads) is symbolic when ``jax.export`` leaves the batch dim symbolic; the
    exported function may then be called with any batch, so a group is one block: the smallest
    working set, ``heads · block_logits``, which any batch would get with concrete shapes once large
    enough (a small batch pays with more, smaller steps).
    """
    if jax.export.is_symbolic_dim(heads):
        return 1
    budget = _LOGITS_PER_STEP["cpu" if jax.default_backend() == "cpu" else "accelerator"]
    return max(1, budget // (max(heads, 1) * block_logits))  # heads is 0 for an empty batch


def _attend_gathered(q, k, v, mask, bias, q_pos, kv_pos, kv_valid, *, heads, scale, softcap):
    """Attention of query blocks over per-block lists of key positions, for one head.

    Args:
      q: ``[T, H]``. k: ``[S, H]``. v: ``[S, Hv]``: float32 for a 16-bit q (see ``_per_head``).
      mask: per-head mask or None. bias: ``[T|1, S|1]`` or None.
      q_pos: int ``[R, bq]`` query positions of each block (may run past T).
      kv_pos: int ``[R, C]`` key positions each block gathers (may run past S or below 0).
      kv_valid: bool ``[R, C]``: slots that hold a real key position listed once.
      heads: how many heads (batch × heads) the caller vmaps this over, to size the groups.
    Returns:
      ``[R, bq, Hv]`` in q's dtype; rows past T or with nothing allowed are zero.

    Blocks run in groups of about ``_LOGITS_PER_STEP`` logits (per backend) over all heads (``lax.map`` over
    groups, ``vmap`` within one), so the working set does not grow with R. The backward pass
    recomputes a group's probabilities rather than saving them (as FlashAttention does), so the
    saved residuals are the inputs, not the ``[R, bq, C]`` tiles with their gathered keys and values.
    """
    q_len, kv_len = q.shape[0], k.shape[0]

    def one_block(q_pos_b, kv_pos_b, kv_valid_b):  # [bq], [C], [C]
        q_idx = jnp.clip(q_pos_b, 0, q_len - 1)
        kv_idx = jnp.clip(kv_pos_b, 0, kv_len - 1)
        in_range = kv_valid_b & (kv_pos_b >= 0) & (kv_pos_b < kv_len)
        allowed = (q_pos_b < q_len)[:, None] & in_range[None, :]  # [bq, C]
        if mask is not None:
            allowed = allowed & mask.tile(q_idx, kv_idx)
        tile_bias = None
        if bias is not None:
            rows = q_idx[:, None] if bias.shape[0] > 1 else jnp.zeros((1, 1), jnp.int32)
            cols = kv_idx[None, :] if bias.shape[1] > 1 else jnp.zeros((1, 1), jnp.int32)
            tile_bias = bias[rows, cols]  # [bq|1, C|1]
        k_tile, v_tile = k[kv_idx].astype(q.dtype), v[kv_idx].astype(q.dtype)
        return dense_attention_one_head(
            q[q_idx], k_tile, v_tile, allowed, tile_bias, scale=scale, softcap=softcap
        )

    rows_per_step = _rows_per_step(heads, q_pos.shape[1] * kv_pos.shape[1])
    if q_pos.shape[0] <= rows_per_step:
        return jax.vmap(one_block)(q_pos, kv_pos, kv_valid)
    group = jax.checkpoint(lambda xs: one_block(*xs))  # the backward pass recomputes each group
    return jax.lax.map(group, (q_pos, kv_pos, kv_valid), batch_size=rows_per_step)


def _set_rows(out, rows: np.ndarray, values):
    """``out.at[rows].set(values)`` for static distinct ``rows`` ``[g]``, as a gather and a select.

    ``out``: ``[n, ...]``; ``values``: ``[g, ...]``. On a mesh with Explicit axes JAX infers no
    output sharding for a scatter of batch-sharded ``values`` into an unsharded array: block_sparse's
    ``jnp.zeros`` in the forward pass, and in the gradient the ids that the JVP of ``.at[].set``
    scatters. A gather and a select take their sharding from their operands.
    """
    is_set = np.zeros(out.shape[0], bool)  # [n]
    is_set[rows] = True
    source = np.zeros(out.shape[0], np.int32)  # [n]: the row of values each set row takes
    source[rows] = np.arange(len(rows))
    return jnp.where(is_set.reshape(-1, *[1] * (out.ndim - 1)), values[source], out)


def _per_head(problem: Problem, attend_one_head):
    """vmap ``attend_one_head(q [T, H], k [S, H], v [S, Hv], mask, bias, *, heads, scale, softcap)
    -> [T, Hv]`` over the batch and heads.

    16-bit keys and values reach ``attend_one_head`` in float32 (each gathered tile is cast back),
    so that their gradients, scatter-added over every tile that gathered a key, sum in float32.
    """
    heads = problem.q.shape[0] * problem.num_heads
    wide = jnp.promote_types(problem.dtype, jnp.float32)
    cfg = {"heads": heads, "scale": problem.scale, "softcap": problem.softcap}

    def per_head(q_h, k_h, v_h, ops):
        mask_h, bias_h = ops
        return attend_one_head(q_h, k_h, v_h, mask_h, bias_h, **cfg)

    k, v = problem.k.astype(wide), problem.v.astype(wide)
    return vmap_over_heads(per_head, problem.q, k, v, (problem.mask, problem.bias))


# ---------------------------------------------------------------------------------------------
# "banded": sliding windows (and global tokens)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Band:
    """Where a mask may be True: ``t - left <= s <= t + right``, plus every row and column of a
    global token (Longformer's pattern). ``left``/``right`` are ints, ``math.inf`` (unbounded) or
    ``-math.inf`` (no band at all, only global tokens)."""

    left: float
    right: float
    global_indices: frozenset[int] = frozenset()

    @property
    def bounded(self) -> bool:
        return self.left < math.inf and self.right < math.inf

    @property
    def empty(self) -> bool:
        return self.left == -math.inf or self.right == -math.inf

    def union(self, other: Band) -> Band:
        return Band(
            max(self.left, other.left),
            max(self.right, other.right),
            self.global_indices | other.global_indices,
        )

    def intersect(self, other: Band) -> Band:
        """A band holding the intersection (their global tokens kept, which over-covers)."""
        return Band(
            min(self.left, other.left),
            min(self.right, other.right),
            self.global_indices | other.global_indices,
        )

    def cost(self, q_len: int, kv_len: int) -> float:
        """Logits computed by ``banded`` for this band, about."""
        if not self.bounded:
            return math.inf
        width = 0 if self.empty else min(self.left + self.right + 1, kv_len)
        return q_len * width + len(self.global_indices) * (q_len + kv_len)


_UNBOUNDED = Band(math.inf, math.inf)


def mask_band(mask: masks_lib.Mask | None, q_len: int, kv_len: int) -> Band:
    """The narrowest band (with global tokens) this analysis proves contains the mask.

    Sliding windows and BigBird block windows give a band, global tokens their rows and columns;
    ``a | b`` covers both bands, ``a & b`` keeps the cheaper of a, b and their intersection (so
    ``sliding_window(w) & padding(...)`` is banded). Anything else may be True anywhere.
    """
    if isinstance(mask, masks_lib.SlidingWindow):
        unbounded = lambda width: math.inf if width is None else width  # noqa: E731
        return Band(unbounded(mask.left), unbounded(mask.right))
    if isinstance(mask, masks_lib.BlockWindow):
        reach = (mask.half_blocks + 1) * mask.block - 1
        return Band(reach, reach)
    if isinstance(mask, masks_lib.GlobalTokens):
        return Band(-math.inf, -math.inf, frozenset(mask.indices))
    if isinstance(mask, masks_lib.Or):
        return mask_band(mask.a, q_len, kv_len).union(mask_band(mask.b, q_len, kv_len))
    if isinstance(mask, masks_lib.And):
        a, b = mask_band(mask.a, q_len, kv_len), mask_band(mask.b, q_len, kv_len)
        return min((a, b, a.intersect(b)), key=lambda band: band.cost(q_len, kv_len))
    return _UNBOUNDED


def supports_banded(problem: Problem) -> str | None:
    """None when the mask lies in a band of finite width (plus global tokens), else why not."""
    if problem.mask is None:
        return "no mask: every query attends every key; banded needs a sliding-window mask"
    band = mask_band(problem.mask, problem.q_len, problem.kv_len)
    if not band.bounded:
        return (
            "the mask is not inside a band of finite width: banded takes sliding_window(left, right) "
            "(or a BigBird block window), optionally | global_tokens(...), optionally & any other mask; "
            f"got {type(problem.mask).__name__}"
        )
    return None


@dataclasses.dataclass(frozen=True)
class _BandPlan:
    """Static schedule of ``banded``: query blocks of ``block`` against a key span of ``width``."""

    block: int
    left: int
    width: int  # keys in each query block's span (0: no band, only global keys)
    global_q: tuple[int, ...]  # global query rows (attend every key)
    global_kv: tuple[int, ...]  # global key columns (attended by every query)


def _band_plan(band: Band, q_len: int, kv_len: int) -> _BandPlan:
    global_q = tuple(sorted(i for i in band.global_indices if i < q_len))
    global_kv = tuple(sorted(i for i in band.global_indices if i < kv_len))
    if band.empty:
        return _BandPlan(min(_MAX_BAND_BLOCK, _next_pow2(q_len)), 0, 0, global_q, global_kv)
    left = int(min(band.left, q_len - 1))  # t - s <= T - 1 always
    right = int(min(band.right, kv_len - 1))  # s - t <= S - 1 always
    block = min(max(_next_pow2((left + right + 1) // 4), _MIN_BAND_BLOCK), _MAX_BAND_BLOCK, _next_pow2(q_len))
    return _BandPlan(block, left, block + left + right, global_q, global_kv)


def _banded_one_head(q, k, v, mask, bias, plan: _BandPlan, *, heads, scale, softcap):
    """One head of ``banded``: q ``[T, H]``, k ``[S, H]``, v ``[S, Hv]`` -> ``[T, Hv]``."""
    q_len, kv_len = q.shape[0], k.shape[0]
    num_blocks = -(-q_len // plan.block)
    q_pos = np.arange(num_blocks * plan.block).reshape(num_blocks, plan.block)  # [nq, b]
    span_start = q_pos[:, :1] - plan.left  # [nq, 1]
    kv_pos = span_start + np.arange(plan.width)  # [nq, W]
    kv_valid = np.ones(kv_pos.shape, bool)
    if plan.global_kv:
        globals_kv = np.broadcast_to(np.asarray(plan.global_kv), (num_blocks, len(plan.global_kv)))
        in_span = (globals_kv >= span_start) & (globals_kv < span_start + plan.width)  # already listed
        kv_pos = np.concatenate([kv_pos, globals_kv], axis=1)  # [nq, W + g]
        kv_valid = np.concatenate([kv_valid, ~in_span], axis=1)
    cfg = {"heads": heads, "scale": scale, "softcap": softcap}
    if kv_pos.shape[1]:
        out = _attend_gathered(q, k, v, mask, bias, q_pos, kv_pos, kv_valid, **cfg)
        out = out.reshape(-1, out.shape[-1])[:q_len]  # [T, Hv]
    else:
        out = jnp.zeros((q_len, v.shape[-1]), q.dtype)
    if plan.global_q:
        rows = np.asarray(plan.global_q)[None, :]  # [1, g]
        every_key = np.arange(kv_len)[None, :]  # [1, S]
        dense_rows = _attend_gathered(q, k, v, mask, bias, rows, every_key, every_key >= 0, **cfg)
        out = _set_rows(out, rows[0], dense_rows[0])
    return out


def run_banded(problem: Problem):
    """``implementation="banded"``: q ``[B, T, N, H]``, k/v ``[B, S, K, H]`` -> ``[B, T, N, Hv]``."""
    band = mask_band(problem.mask, problem.q_len, problem.kv_len)
    plan = _band_plan(band, problem.q_len, problem.kv_len)
    return _per_head(problem, functools.partial(_banded_one_head, plan=plan))


# ---------------------------------------------------------------------------------------------
# "block_sparse": gather the non-empty key/value blocks of each query block
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Bucket:
    """Query blocks with the same (power-of-two) number of gathered key/value blocks.

    Attributes:
      rows: int ``[R]`` query block indices.
      kv_blocks: int ``[R, W]`` key/value block indices of each row (padded with 0).
      valid: bool ``[R, W]``: which entries of ``kv_blocks`` are real.
    """

    rows: np.ndarray
    kv_blocks: np.ndarray
    valid: np.ndarray


def block_buckets(layout: np.ndarray) -> list[_Bucket]:
    """Group the query block rows of a block layout by their number of non-empty tiles.

    Rows with no non-empty tile appear in no bucket (their output is zero).
    """
    nonempty = layout != masks_lib.EMPTY  # [nq, nk]
    counts = nonempty.sum(1)
    widths = np.array([_next_pow2(c) if c else 0 for c in counts])
    buckets = []
    for width in sorted(set(widths.tolist()) - {0}):
        rows = np.flatnonzero(widths == width)
        kv_blocks = np.zeros((len(rows), width), np.int32)
        valid = np.zeros((len(rows), width), bool)
        for r, row in enumerate(rows):
            ids = np.flatnonzero(nonempty[row])
            kv_blocks[r, : len(ids)] = ids
            valid[r, : len(ids)] = True
        buckets.append(_Bucket(rows, kv_blocks, valid))
    return buckets


def gathered_area(buckets: list[_Bucket], block: int) -> int:
    """Logits ``block_sparse`` computes with these buckets: Σ rows · width · block²."""
    return sum(b.kv_blocks.size for b in buckets) * block * block


def coarser_layout(layout: np.ndarray, factor: int) -> np.ndarray:
    """The layout at tiles ``factor`` times larger on each side, from ``layout``'s: a large tile is
    FULL (EMPTY) when every small tile in it is; small tiles past the end count for neither."""
    nq, nk = layout.shape
    shape = (-(-nq // factor) * factor, -(-nk // factor) * factor)

    def every_small_tile(kind):  # [nq / factor, nk / factor]
        padded = np.ones(shape, bool)
        padded[:nq, :nk] = layout == kind
        return padded.reshape(shape[0] // factor, factor, shape[1] // factor, factor).all(axis=(1, 3))

    return masks_lib._classify(~every_small_tile(masks_lib.EMPTY), every_small_tile(masks_lib.FULL))


def choose_layout(mask: masks_lib.Mask, q_len: int, kv_len: int) -> tuple[int, np.ndarray]:
    """``(block, layout)``: the largest candidate tile size whose gathered area is within
    ``_BLOCK_SLACK`` of the best, and the mask's layout at it. The mask is evaluated once, at the
    smallest candidate; the larger ones are grouped from it."""
    longest = _next_pow2(max(q_len, kv_len))
    candidates = sorted({min(b, longest) for b in _BLOCK_CANDIDATES}, reverse=True)
    finest = candidates[-1]
    layout = mask.blocks(q_len, kv_len, finest, finest)
    layouts = {b: coarser_layout(layout, b // finest) for b in candidates}
    areas = {b: gathered_area(block_buckets(layouts[b]), b) for b in candidates}
    best = min(areas.values())
    block = next(b for b in candidates if areas[b] <= _BLOCK_SLACK * best)
    return block, layouts[block]


def _block_sparse_one_head(q, k, v, mask, bias, block: int, buckets: list[_Bucket], *, heads, scale, softcap):
    """One head of ``block_sparse``: q ``[T, H]``, k ``[S, H]``, v ``[S, Hv]`` -> ``[T, Hv]``."""
    num_blocks = -(-q.shape[0] // block)
    out = jnp.zeros((num_blocks, block, v.shape[-1]), q.dtype)  # [nq, b, Hv]: rows in no bucket stay 0
    offsets = np.arange(block)
    cfg = {"heads": heads, "scale": scale, "softcap": softcap}
    rows_out = []  # per bucket, [R, b, Hv]
    for bucket in buckets:
        q_pos = bucket.rows[:, None] * block + offsets  # [R, b]
        kv_pos = (bucket.kv_blocks[:, :, None] * block + offsets).reshape(len(bucket.rows), -1)  # [R, W·b]
        kv_valid = np.repeat(bucket.valid, block, axis=1)  # [R, W·b]
        rows_out.append(_attend_gathered(q, k, v, mask, bias, q_pos, kv_pos, kv_valid, **cfg))
    if rows_out:
        rows = np.concatenate([bucket.rows for bucket in buckets])  # [ΣR]
        out = _set_rows(out, rows, jnp.concatenate(rows_out))  # [nq, b, Hv]
    return out.reshape(-1, v.shape[-1])[: q.shape[0]]


def run_block_sparse(problem: Problem):
    """``implementation="block_sparse"``: q ``[B, T, N, H]``, k/v ``[B, S, K, H]`` -> ``[B, T, N, Hv]``."""
    mask = masks_lib.full() if problem.mask is None else problem.mask
    block, layout = choose_layout(mask, problem.q_len, problem.kv_len)
    buckets = block_buckets(layout)
    return _per_head(problem, functools.partial(_block_sparse_one_head, block=block, buckets=buckets))


register_implementation(
    "banded",
    run_banded,
    supports_banded,
    summary="sliding windows (+ global tokens) in O(T·w): query blocks against their key span only",
)
register_implementation(
    "block_sparse",
    run_block_sparse,
    summary="any mask; each query block gathers only its non-empty key/value blocks; cost ∝ non-empty tiles",
)
