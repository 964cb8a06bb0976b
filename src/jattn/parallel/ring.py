"""Ring attention: exact softmax attention with the sequence split over a mesh axis.

Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context".
Each of the D devices on the ring axis holds 1/D of the queries, keys and values. Key/value blocks
travel around the ring with ``jax.lax.ppermute`` (the next block is sent while the current one is
used, so transfer overlaps compute); each device attends its queries to every block in turn and
merges the partial results by their log-sum-exp, exactly as the online softmax does within one
device. The backward pass (``jax.custom_vjp``) circulates the key/value blocks again together with
their gradient accumulators, which arrive home after a full turn. No device ever holds the whole
sequence: memory per device is that of single-device attention at length L / D.

Load balancing: with a causal mask, contiguous shards leave the first device idle most of the
time. Zig-zag order cuts the sequence into 2D chunks and gives device d chunks d and 2D-1-d (one
early, one late), so every device has the same amount of unmasked work at every step. Inputs and
outputs stay in natural order: the reordering is two half-shard ``ppermute``s on the way in and two
on the way out.

Masks are position predicates, so a shard's mask is the global mask read at the shard's global
positions; the global block layout says which (query block, key block) tiles are empty, and every
ring step visits only the non-empty tiles of its shard pair. Per-shard compute is the blockwise
online softmax of ``jattn.core.chunked`` (``"chunked"``: tiles of at most 512 positions), dense
scores per chunk pair (``"xla"``: one tile per chunk pair) or the Pallas flash kernel (``"flash"``:
interpreted on CPU, compiled on GPU/TPU), whose per-step mask is the global mask read on the step's
masked tiles and handed to the kernel as its compact tile table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jattn import masks as masks_lib
from jattn.attention import (
    Problem,
    _check_positive_float,
    _check_shapes,
    attention,
    make_problem,
    register_implementation,
)
from jattn.core._batching import vmap_over_heads
from jattn.core._common import MASK_VALUE, first_order_only
from jattn.core.chunked import (
    DEFAULT_BLOCK,
    _Plan,
    chunked_backward_with_lse,
    chunked_forward_with_lse,
    make_plan,
)
from jattn.kernels import flash
from jattn.parallel.mesh import check_axis, context_mesh, reshard_for_shard_map, shard_map

IMPLEMENTATIONS = {
    "chunked": "blockwise online softmax per ring step (tiles of at most 512 positions)",
    "xla": "dense scores per ring step (one tile per chunk pair)",
    "flash": "the Pallas flash kernel per ring step (interpreted on CPU), masks as its tile table",
}
"""Per-shard computations ``ring_attention(implementation=...)`` takes."""


# ---------------------------------------------------------------------------------------------
# The static schedule
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring-attention call (hashable: it keys the compiled functions).

    Attributes:
      axis_name: the mesh axis the sequence is split over; num_devices: its size D.
      zigzag: chunks per device are (d, 2D-1-d) when True, (d,) when False.
      q_chunk, kv_chunk: positions per chunk (a multiple of block_q, block_kv).
      q_len, kv_len: the true lengths; positions at or past them are padding: a padded query
        attends nothing and a padded key is never attended.
      plans: the distinct per-step tile schedules; branch[step][device] indexes them.
      scale, softcap: as in ``jattn.attention``.
      implementation: the per-shard computation, a key of ``IMPLEMENTATIONS``.
    """

    axis_name: str
    num_devices: int
    zigzag: bool
    q_chunk: int
    kv_chunk: int
    q_len: int
    kv_len: int
    plans: tuple[_Plan, ...]
    branch: tuple[tuple[int, ...], ...]
    scale: float
    softcap: float | None
    implementation: str = "chunked"

    @property
    def chunks_per_device(self) -> int:
        return 2 if self.zigzag else 1

    def chunk_ids(self, device) -> list:
        """Chunk indices held by ``device`` (an int or a traced index), in local order."""
        if self.zigzag:
            return [device, 2 * self.num_devices - 1 - device]
        return [device]

    def positions(self, device, chunk: int):
        """Global positions of a device's local rows: int32 ``[chunks_per_device * chunk]``."""
        return jnp.concatenate(
            [j * chunk + jnp.arange(chunk, dtype=jnp.int32) for j in self.chunk_ids(device)]
        )

    def shift(self, x):
        """Send ``x`` one device along the ring (device d receives from d - 1)."""
        size = self.num_devices
        return jax.lax.ppermute(x, self.axis_name, [(d, (d + 1) % size) for d in range(size)])


def _per_shard(ring: _Ring):
    """(forward_with_lse, backward_with_lse) of the ring's per-shard computation."""
    if ring.implementation == "flash":
        return flash.flash_forward_with_lse, flash.flash_backward_with_lse
    return chunked_forward_with_lse, chunked_backward_with_lse


def _flash_chunks_and_blocks(problem: Problem, q_chunk: int, kv_chunk: int):
    """Chunks rounded up to the kernel's smallest tile (the extra positions are padding, never
    attended) and tiles: the largest power of two dividing a chunk, up to the tuned table's."""
    lowering = flash.lowering_for(problem.backend)
    minimum = flash.LOWERINGS[lowering].MIN_BLOCK
    head_dim = flash.LOWERINGS[lowering].padded_head_dim(max(problem.head_dim, problem.value_head_dim))
    table = flash.lookup_block_sizes(lowering, problem.dtype, head_dim)

    def fit(chunk, bound):
        chunk = -(-chunk // minimum) * minimum
        block = minimum
        while chunk % (2 * block) == 0 and 2 * block <= bound:
            block *= 2
        return chunk, block

    (q_chunk, block_q), (kv_chunk, block_kv) = fit(q_chunk, table.block_q), fit(kv_chunk, table.block_kv)
    return q_chunk, kv_chunk, block_q, block_kv


def _chunk_tiles(chunk: int, bound: int = DEFAULT_BLOCK) -> tuple[int, int]:
    """(chunk, tile) for the chunked per-shard computation: the largest divisor of the chunk up to
    ``bound`` if it is at least ``bound // 4``; else (a prime chunk of 521 has only 1, and 1x1 tiles
    ran 8-13x slower) the fewest tiles of at most ``bound`` positions, a multiple of 8, with the
    chunk rounded up to them (the extra positions are padding, never attended)."""
    divisor = max(d for d in range(1, min(chunk, bound) + 1) if chunk % d == 0)
    if divisor >= min(chunk, bound // 4):
        return chunk, divisor
    tiles = math.ceil(chunk / bound)
    tile = 8 * math.ceil(chunk / tiles / 8)
    return tiles * tile, tile


def _global_layout(mask, q_len, kv_len, padded_q, padded_kv, block_q, block_kv) -> np.ndarray:
    """The mask's block layout on the padded grid: tiles past the true lengths are EMPTY, and a key
    block that runs past ``kv_len`` is at most PARTIAL (its padded keys must be masked)."""
    layout = np.array((masks_lib.full() if mask is None else mask).blocks(q_len, kv_len, block_q, block_kv))
    if kv_len % block_kv:
        last = layout[:, -1]
        last[last == masks_lib.FULL] = masks_lib.PARTIAL
    grid = np.full((padded_q // block_q, padded_kv // block_kv), masks_lib.EMPTY, np.int8)
    grid[: layout.shape[0], : layout.shape[1]] = layout
    return grid


def _block_rows(chunk_ids: list[int], chunk: int, block: int) -> list[int]:
    per_chunk = chunk // block
    return [j * per_chunk + b for j in chunk_ids for b in range(per_chunk)]


def _schedule(layout: np.ndarray, num_devices, zigzag, q_chunk, kv_chunk, block_q, block_kv):
    """Distinct local plans and, per (step, device), which one applies.

    At step i device d holds the keys of device (d - i) mod D; its tiles are the rows of its own
    chunks and the columns of the visiting chunks in the global layout.
    """
    probe = _Ring("", num_devices, zigzag, q_chunk, kv_chunk, 0, 0, (), (), 1.0, None)
    local_q, local_kv = probe.chunks_per_device * q_chunk, probe.chunks_per_device * kv_chunk
    plans: dict[bytes, int] = {}
    plan_list: list[_Plan] = []
    branch = []
    for step in range(num_devices):
        row = []
        for device in range(num_devices):
            source = (device - step) % num_devices
            rows = _block_rows(probe.chunk_ids(device), q_chunk, block_q)
            cols = _block_rows(probe.chunk_ids(source), kv_chunk, block_kv)
            local = layout[np.ix_(rows, cols)]
            key = local.tobytes()
            if key not in plans:
                plans[key] = len(plan_list)
                plan_list.append(make_plan(local.copy(), local_q, local_kv, block_q, block_kv))
            row.append(plans[key])
        branch.append(tuple(row))
    return tuple(plan_list), tuple(branch)


# ---------------------------------------------------------------------------------------------
# One head, inside shard_map
# ---------------------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["mask", "q_pos", "kv_pos"],
    meta_fields=["q_len", "kv_len"],
)
@dataclasses.dataclass(frozen=True)
class _AtPositions:
    """A per-head mask read at global positions: local row i is query position ``q_pos[i]``, local
    column j key position ``kv_pos[j]``. Padding attends nothing and is never attended: queries at
    or past ``q_len`` (from positions alone, a causal padded row would reach keys no real query
    attends, and NaN there would reach the tile's real rows through 0 · NaN), keys at or past
    ``kv_len``."""

    mask: Any
    q_pos: Any  # int32 [T_local]
    kv_pos: Any  # int32 [S_local]
    q_len: int
    kv_len: int

    def tile(self, q_idx, kv_idx):
        q, kv = self.q_pos[q_idx], self.kv_pos[kv_idx]  # [bq], [bkv]
        allowed = (q < self.q_len)[:, None] & (kv < self.kv_len)[None, :]  # [bq, bkv]
        if self.mask is not None:
            allowed = allowed & self.mask.tile(q, kv)
        return allowed  # [bq, bkv]


def _merge(out, lse, block_out, block_lse):
    """Combine two normalized partial softmaxes by their log-sum-exp (rows with nothing: lse =
    MASK_VALUE, weight 0)."""
    new_lse = jnp.maximum(lse, block_lse)  # [T]
    old_weight, block_weight = jnp.exp(lse - new_lse), jnp.exp(block_lse - new_lse)
    total = old_weight + block_weight
    out = (old_weight[:, None] * out + block_weight[:, None] * block_out) / total[:, None]
    return out, new_lse + jnp.log(total)


def _step_call(ring: _Ring, fn, nothing, step, device, q, k, v, mask):
    """``fn(q, k, v, mask, plan=, scale=, softcap=)`` (the per-shard forward or backward) for ring
    step ``step`` on this device, with the step's tile schedule chosen by (step, device); a schedule
    with no tile to visit returns ``nothing()`` without tracing ``fn``."""
    source = (device - step) % ring.num_devices
    shifted = _AtPositions(
        mask,
        ring.positions(device, ring.q_chunk),
        ring.positions(source, ring.kv_chunk),
        ring.q_len,
        ring.kv_len,
    )
    cfg = {"scale": ring.scale, "softcap": ring.softcap}
    branches = [
        functools.partial(fn, plan=plan, **cfg) if any(plan.kv_ids) else lambda *_: nothing()
        for plan in ring.plans
    ]
    if len(branches) == 1:
        return branches[0](q, k, v, shifted)
    index = jnp.asarray(ring.branch, jnp.int32)[step, device]
    return jax.lax.switch(index, branches, q, k, v, shifted)


def _ring_forward(ring: _Ring, q, k, v, mask):
    """q ``[T_local, H]``, k/v ``[S_local, H|Hv]`` -> (out ``[T_local, Hv]`` f32, lse ``[T_local]`` f32).

    Every step sends its key/value block on before using it, so the transfer overlaps the compute;
    the last step's transfer (the block going home) is spent so that the loop body is traced once.
    """
    device = jax.lax.axis_index(ring.axis_name)

    def body(step, carry):
        out, lse, k, v = carry
        k_next, v_next = ring.shift(k), ring.shift(v)  # in flight while this block is used
        block_out, block_lse = _step_call(ring, _per_shard(ring)[0], nothing, step, device, q, k, v, mask)
        return (*_merge(out, lse, block_out, block_lse), k_next, v_next)

    nothing = lambda: (  # noqa: E731  out 0 and lse MASK_VALUE: no weight in the merge
        jnp.zeros((q.shape[0], v.shape[-1]), jnp.float32),
        jnp.full((q.shape[0],), MASK_VALUE, jnp.float32),
    )
    out, lse = nothing()
    out, lse, _, _ = jax.lax.fori_loop(0, ring.num_devices, body, (out, lse, k, v))
    return out, lse


def _ring_backward(ring: _Ring, q, k, v, mask, out, lse, d_out):
    """(dq, dk, dv) in float32; dk, dv accumulate while travelling with their block and arrive home
    after D shifts."""
    device = jax.lax.axis_index(ring.axis_name)

    def one(q, k, v, m, *, plan, scale, softcap):
        return _per_shard(ring)[1](q, k, v, m, out, lse, d_out, plan=plan, scale=scale, softcap=softcap)

    def body(step, carry):
        dq, k, v, dk, dv = carry
        k_next, v_next = ring.shift(k), ring.shift(v)
        dq_step, dk_step, dv_step = _step_call(ring, one, nothing, step, device, q, k, v, mask)
        return dq + dq_step, k_next, v_next, ring.shift(dk + dk_step), ring.shift(dv + dv_step)

    nothing = lambda: tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))  # noqa: E731
    dq, dk, dv = nothing()
    dq, _, _, dk, dv = jax.lax.fori_loop(0, ring.num_devices, body, (dq, k, v, dk, dv))
    return dq, dk, dv


@functools.lru_cache(maxsize=64)
def _ring_one_head_fn(ring: _Ring):
    """A custom_vjp ``attend(q [T_local, H], k, v, mask) -> [T_local, Hv]`` for one static ring."""

    @jax.custom_vjp
    def attend(q, k, v, mask):
        return attend_fwd(q, k, v, mask)[0]

    forward = first_order_only(functools.partial(_ring_forward, ring), "ring")
    backward = first_order_only(functools.partial(_ring_backward, ring), "ring")

    def attend_fwd(q, k, v, mask):
        out, lse = forward(q, k, v, mask)
        out = out.astype(q.dtype)
        return out, (q, k, v, mask, out, lse)

    def attend_bwd(residuals, d_out):
        q, k, v, mask, out, lse = residuals
        dq, dk, dv = backward(q, k, v, mask, out, lse, d_out)
        d_mask = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_mask

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


# ---------------------------------------------------------------------------------------------
# Zig-zag reordering inside shard_map
# ---------------------------------------------------------------------------------------------


def _zigzag_owner(chunk: int, num_devices: int) -> int:
    return chunk if chunk < num_devices else 2 * num_devices - 1 - chunk


def _to_zigzag(x, axis_name: str, num_devices: int):
    """Natural shard (chunks 2d, 2d+1) -> zig-zag shard (chunks d, 2D-1-d), along dim 1 of
    ``x [B, L_local, ...]``. Even and odd chunks each move by one permutation."""
    half = x.shape[1] // 2
    even = jax.lax.ppermute(
        x[:, :half], axis_name, [(d, _zigzag_owner(2 * d, num_devices)) for d in range(num_devices)]
    )
    odd = jax.lax.ppermute(
        x[:, half:], axis_name, [(d, _zigzag_owner(2 * d + 1, num_devices)) for d in range(num_devices)]
    )
    is_even = jax.lax.axis_index(axis_name) % 2 == 0  # my front chunk d has my parity
    return jnp.where(is_even, jnp.concatenate([even, odd], 1), jnp.concatenate([odd, even], 1))


def _from_zigzag(x, axis_name: str, num_devices: int):
    """Inverse of ``_to_zigzag``."""
    half = x.shape[1] // 2
    is_even = jax.lax.axis_index(axis_name) % 2 == 0
    front, back = x[:, :half], x[:, half:]
    even_chunk, odd_chunk = jnp.where(is_even, front, back), jnp.where(is_even, back, front)

    def home(chunk_of):  # chunk j lives on device j // 2 in natural order
        return [(d, chunk_of(d) // 2) for d in range(num_devices)]

    zig = lambda d: [d, 2 * num_devices - 1 - d]  # noqa: E731
    even = jax.lax.ppermute(even_chunk, axis_name, home(lambda d: zig(d)[d % 2]))
    odd = jax.lax.ppermute(odd_chunk, axis_name, home(lambda d: zig(d)[1 - d % 2]))
    return jnp.concatenate([even, odd], 1)


# ---------------------------------------------------------------------------------------------
# The public call
# ---------------------------------------------------------------------------------------------


def _contains_array_mask(mask) -> bool:
    if isinstance(mask, masks_lib.ArrayMask):
        return True
    if isinstance(mask, (masks_lib.And, masks_lib.Or)):
        return _contains_array_mask(mask.a) or _contains_array_mask(mask.b)
    if isinstance(mask, masks_lib.Not):
        return _contains_array_mask(mask.a)
    return False


def _sequence_spec(x) -> Any | None:
    """The mesh axes x's sequence dim is sharded over (None for tracers or non-named shardings)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(x, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return sharding.mesh, spec[x.ndim - 3]


def _check_shardings(q, k, v, mesh, axis_name) -> None:
    """q, k and v committed to named shardings must share the mesh and the sequence sharding."""
    specs = {name: _sequence_spec(x) for name, x in (("q", q), ("k", k), ("v", v))}
    for name, found in specs.items():
        if found is not None and (found[0] if isinstance(mesh, Mesh) else found[0].abstract_mesh) != mesh:
            raise ValueError(
                f"{name} is sharded over a different mesh ({dict(found[0].shape)}) than "
                f"mesh ({dict(mesh.shape)})"
            )
    seq = {name: found[1] for name, found in specs.items() if found is not None}
    if len(set(seq.values())) > 1:
        raise ValueError(
            "q, k and v must be sharded alike along the sequence (dim -3) for ring attention, got "
            + ", ".join(f"{name}: {axes!r}" for name, axes in seq.items())
            + f"; shard all three over {axis_name!r} (or leave them unsharded)"
        )


def _chunk_count(num_devices: int, zigzag: bool) -> int:
    return 2 * num_devices if zigzag else num_devices


def _check_lengths(q_len, kv_len, num_devices, zigzag, axis_name, pad) -> None:
    chunks = _chunk_count(num_devices, zigzag)
    why = f"2 chunks per device for zig-zag load balancing x {num_devices}" if zigzag else "devices"
    for argument, length in (("q.shape[-3]", q_len), ("k.shape[-3]", kv_len)):
        if length % chunks and not pad:
            raise ValueError(
                f"{argument}={length} (the sequence length) must be divisible by {chunks} ({why} on mesh "
                f"axis {axis_name!r}); pass pad=True to pad it with positions that are never attended"
            )


@functools.partial(
    jax.jit,
    static_argnames=("mesh", "axis_name", "batch_axis", "scale", "softcap", "implementation", "zigzag"),
)
def _ring_jit(q, k, v, mask, *, mesh, axis_name, batch_axis, scale, softcap, implementation, zigzag):
    problem = make_problem(q, k, v, mask=mask, scale=scale, softcap=softcap)
    out = _ring_problem(
        problem,
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=batch_axis,
        implementation=implementation,
        zigzag=zigzag,
    )
    return out.reshape(*problem.batch_shape, *out.shape[1:]).astype(q.dtype)


def _ring_problem(problem: Problem, *, mesh, axis_name, batch_axis, implementation, zigzag):
    """Ring attention of a canonical problem (batch dims flattened to B): ``[B, T, N, Hv]``.

    T and S are padded to the chunk size here; the caller restores batch dims and dtype.
    """
    num_devices = mesh.shape[axis_name]
    chunks = _chunk_count(num_devices, zigzag)
    q_chunk, kv_chunk = -(-problem.q_len // chunks), -(-problem.kv_len // chunks)
    if implementation == "flash":
        why_not = flash.unsupported_reason(problem)
        if why_not is not None:
            raise NotImplementedError(why_not)
        q_chunk, kv_chunk, block_q, block_kv = _flash_chunks_and_blocks(problem, q_chunk, kv_chunk)
    elif implementation == "chunked":
        (q_chunk, block_q), (kv_chunk, block_kv) = _chunk_tiles(q_chunk), _chunk_tiles(kv_chunk)
    else:  # xla: one tile per chunk pair
        block_q, block_kv = q_chunk, kv_chunk
    padded_q, padded_kv = chunks * q_chunk, chunks * kv_chunk
    layout = _global_layout(
        problem.mask, problem.q_len, problem.kv_len, padded_q, padded_kv, block_q, block_kv
    )
    plans, branch = _schedule(layout, num_devices, zigzag, q_chunk, kv_chunk, block_q, block_kv)
    ring = _Ring(
        axis_name,
        num_devices,
        zigzag,
        q_chunk,
        kv_chunk,
        problem.q_len,
        problem.kv_len,
        plans,
        branch,
        problem.scale,
        problem.softcap,
        implementation,
    )

    # Unpadded arrays are pinned to the batch sharding alone: left free, XLA's sharding propagation
    # carried the shard_map's sequence sharding back through the pad onto the uneven unpadded length,
    # and the gradient of a gather upstream (learned positions) then took a padding row into row 0.
    unpadded_sharding = NamedSharding(mesh, PartitionSpec(batch_axis))

    def pad_to(x, length):  # [B, L, N, H] -> [B, length, N, H]
        if length == x.shape[1]:
            return x
        x = jax.lax.with_sharding_constraint(x, unpadded_sharding)
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)])

    def local(q, k, v, mask):  # q [B_local, T_local, N, H] in natural order
        if zigzag:
            q, k, v = (_to_zigzag(x, axis_name, num_devices) for x in (q, k, v))
        attend = _ring_one_head_fn(ring)
        out = vmap_over_heads(lambda q_h, k_h, v_h, m: attend(q_h, k_h, v_h, m), q, k, v, mask)
        return _from_zigzag(out, axis_name, num_devices) if zigzag else out  # [B_local, T_local, N, Hv]

    seq_spec = PartitionSpec(batch_axis, axis_name, None, None)
    mask_spec = jax.tree.map(
        lambda leaf: PartitionSpec(batch_axis if leaf.shape[0] > 1 else None), problem.mask
    )
    in_specs = (seq_spec, seq_spec, seq_spec, mask_spec)
    args = (
        pad_to(problem.q, padded_q),
        pad_to(problem.k, padded_kv),
        pad_to(problem.v, padded_kv),
        problem.mask,
    )
    out = shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=seq_spec)(
        *reshard_for_shard_map(mesh, args, in_specs)
    )
    if padded_q == problem.q_len:
        return out  # [B, T, N, Hv]
    return jax.lax.with_sharding_constraint(out[:, : problem.q_len], unpadded_sharding)  # [B, T, N, Hv]


def ring_attention(
    q,
    k,
    v,
    *,
    mesh,
    axis_name: str,
    mask: masks_lib.Mask | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str = "chunked",
    load_balance: bool | None = None,
    pad: bool = False,
    batch_axis: str | None = None,
):
    """Exact softmax attention with the sequence split over the mesh axis ``axis_name``.

    Same numbers as ``jattn.attention`` (up to rounding), with each device holding 1/D of the
    sequence; see the module docstring for the algorithm.

    Args:
      q: queries ``[B..., T, N, H]``; k: keys ``[B..., S, K, H]`` (N % K == 0); v: ``[B..., S, K, Hv]``.
        Natural sequence order; may be sharded over ``axis_name`` along dim -3 (alike for all three).
      mesh: a ``jax.sharding.Mesh`` with an axis ``axis_name`` (and ``batch_axis`` if given), its
        axes Auto (``jattn.parallel.make_mesh``) or Explicit (``jax.make_mesh``'s default; there
        ``jax.grad`` of a jitted call needs the mesh set with ``jax.set_mesh``, as JAX says).
      axis_name: the mesh axis the sequence is split over (D devices).
      mask: a ``jattn.masks`` mask (position masks, padding, segments and their combinations), read
        at global positions; dense boolean arrays are not supported (they are O(T·S) per device).
      scale: defaults to ``1 / sqrt(H)``. softcap: as in ``jattn.attention``.
      implementation: per-shard computation, one of ``IMPLEMENTATIONS``.
      load_balance: zig-zag order (2 chunks per device, one early and one late); default: on when
        a mask is given (causal and windowed masks otherwise leave devices idle).
      pad: allow T and S that do not divide into the chunks; they are padded with positions that
        are never attended, and the output is cut back to T.
      batch_axis: optional mesh axis the batch (dim 0 of the flattened batch) is split over.
    Returns:
      ``[B..., T, N, Hv]`` in q's dtype.
    Raises:
      ValueError: an axis not in the mesh, a length that does not divide without ``pad``, q, k and
        v sharded differently. NotImplementedError: a dense array mask, an unknown implementation.
    """
    _check_shapes(q, k, v)
    num_devices = check_axis(mesh, axis_name, "axis_name")
    if batch_axis is not None:
        batch_size = check_axis(mesh, batch_axis, "batch_axis")
        if batch_axis == axis_name:
            raise ValueError(f"batch_axis and axis_name must differ, both are {axis_name!r}")
        batch = math.prod(q.shape[:-3])
        if batch % batch_size:
            raise ValueError(
                f"the batch ({batch} = prod(q.shape[:-3])) must be divisible by the size {batch_size} of "
                f"batch_axis={batch_axis!r}"
            )
    if implementation not in IMPLEMENTATIONS:
        raise NotImplementedError(
            f"implementation={implementation!r} cannot run inside ring attention; available: "
            f"{sorted(IMPLEMENTATIONS)}"
        )
    if mask is not None:
        mask = masks_lib._as_mask(mask, "mask")
        if _contains_array_mask(mask):
            raise NotImplementedError(
                "ring attention takes position masks, padding and segments, not a dense boolean array "
                "mask (it would be O(T·S) on every device)"
            )
    scale = _check_positive_float("scale", scale)
    softcap = _check_positive_float("softcap", softcap)
    if not isinstance(load_balance, (bool, type(None))) or not isinstance(pad, bool):
        raise TypeError(f"load_balance must be a bool or None and pad a bool, got {load_balance=}, {pad=}")
    zigzag = (mask is not None) if load_balance is None else load_balance
    _check_lengths(q.shape[-3], k.shape[-3], num_devices, zigzag, axis_name, pad)
    _check_shardings(q, k, v, mesh, axis_name)
    return _ring_jit(
        q,
        k,
        v,
        mask,
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=batch_axis,
        scale=scale,
        softcap=softcap,
        implementation=implementation,
        zigzag=zigzag,
    )


# ---------------------------------------------------------------------------------------------
# jattn.attention(..., implementation="ring"): the mesh set by jax.set_mesh
# ---------------------------------------------------------------------------------------------

SEQUENCE_AXIS = "seq"
"""The mesh axis ``jattn.attention(..., implementation="ring")`` splits the sequence over."""
BATCH_AXIS = "data"
"""The mesh axis it splits the batch over, where the mesh has one."""


def batch_axis_for(mesh, batch: int, batch_axis: str | None = BATCH_AXIS) -> str | None:
    """``batch_axis`` if ``mesh`` has it and its size divides ``batch``, else None (batch not split)."""
    if batch_axis is None or batch_axis not in mesh.axis_names or batch % mesh.shape[batch_axis]:
        return None
    return batch_axis


def ring_attention_in_context(
    q,
    k,
    v,
    *,
    mask: masks_lib.Mask | None = None,
    implementation: str = "chunked",
    axis_name: str = SEQUENCE_AXIS,
    batch_axis: str | None = BATCH_AXIS,
):
    """``ring_attention`` over the mesh set by ``jax.set_mesh``; one-device attention without one.

    What the ``ring`` attention variant calls: a model runs unchanged on one device and, inside
    ``with jax.set_mesh(mesh):`` (the training loop with ``parallel.mesh``), with its sequence split
    over ``axis_name`` and its batch over ``batch_axis`` (when the mesh has that axis and its size
    divides the batch). Lengths are padded to the chunks as needed.

    Args:
      q, k, v, mask: as in ``ring_attention``. implementation: the per-shard computation (one of
        ``IMPLEMENTATIONS``), also the one-device implementation.
    Returns:
      ``[B..., T, N, Hv]`` in q's dtype.
    Raises:
      ValueError: a mesh is set but has no axis ``axis_name``.
    """
    mesh = context_mesh()
    if mesh is None:
        return attention(q, k, v, mask=mask, implementation=implementation)
    batch_axis = batch_axis_for(mesh, math.prod(q.shape[:-3]), batch_axis)
    return ring_attention(
        q,
        k,
        v,
        mesh=mesh,
        axis_name=axis_name,
        mask=mask,
        implementation=implementation,
        pad=True,
        batch_axis=batch_axis,
    )


def _supports_ring(problem: Problem) -> str | None:
    mesh = context_mesh()
    if mesh is None:
        return f"no mesh is set: call it inside `with jax.set_mesh(mesh):` with a {SEQUENCE_AXIS!r} axis"
    if SEQUENCE_AXIS not in mesh.axis_names:
        return f"the mesh set by jax.set_mesh has axes {mesh.axis_names}, none named {SEQUENCE_AXIS!r}"
    if problem.bias is not None:
        return "ring attention takes no bias"
    if problem.mask is not None and _contains_array_mask(problem.mask):
        return "ring attention takes position masks, padding and segments, not a dense array mask"
    return None


def _run_ring(problem: Problem):
    mesh = context_mesh()
    return _ring_problem(
        problem,
        mesh=mesh,
        axis_name=SEQUENCE_AXIS,
        batch_axis=batch_axis_for(mesh, problem.q.shape[0]),
        implementation="chunked",
        zigzag=problem.mask is not None,
    )


register_implementation(
    "ring",
    _run_ring,
    _supports_ring,
    summary="ring attention over the 'seq' axis of the mesh set by jax.set_mesh; padded as needed; "
    "only when asked for",
)
