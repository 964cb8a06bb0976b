"""``jattn.flash_attention``: the Pallas tiled (flash) attention kernel, forward and backward.

FlashAttention (Dao et al. 2022; FlashAttention-2, Dao 2023): each q tile keeps a running max and
sum of the softmax in float32 while it visits the kv tiles; the forward saves the log-sum-exp;
the backward recomputes each tile's probabilities from it, one pass over q tiles for dq and one
over kv tiles for dk and dv (deterministic, no atomics). O(T + S) memory.

The mask's block layout (``mask.blocks``) decides which tiles are visited (``blocks.py``): empty
tiles are never loaded, full tiles run without elementwise masking, partial tiles are masked in
the kernel from positions, lengths and segment ids, or from a compact table of their bits.

Two lowerings of one design share the tile math (``_tile.py``): Triton on NVIDIA GPUs
(``gpu.py``, also the interpret-mode path on CPU) and Mosaic on TPUs (``tpu.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jattn import masks as masks_lib
from jattn._checks import check_int
from jattn.attention import Problem, _check_positive_float, _check_shapes, make_problem
from jattn.core._common import (
    GPU_BACKENDS,
    MASK_VALUE,
    attached_gpu,
    first_order_only,
    pre_ampere_reason,
    varying_axes,
    varying_over,
)
from jattn.kernels import blocks, gpu, tpu
from jattn.kernels._config import KernelAux, KernelConfig

LOWERINGS = {"triton": gpu, "mosaic_tpu": tpu}
MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


# Each step of BlockSizes and the tile it divides.
STEPS = (("backward_q_step", "block_q"), ("backward_kv_step", "block_kv"), ("forward_kv_step", "block_kv"))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of one flash call.

    Attributes:
      block_q: queries per tile. block_kv: keys per tile. Both powers of two >= 16.
      num_warps, num_stages: Triton launch settings of the forward kernel (ignored on TPU).
      backward_num_warps, backward_num_stages: those of the dq and dk/dv kernels, which hold
        more tiles at once (q, dO, dq or k, v, dk, dv) and spill with fewer warps; None: as forward.
      backward_q_step: query rows the Triton dk/dv kernel takes per step of a listed q tile, and
        backward_kv_step: keys the Triton dq kernel takes per step of a listed kv tile (powers of
        two >= 16, at most the tile; None: the whole tile). Smaller steps cut the shared memory and
        registers of the backward without changing the schedule, which all three kernels share.
      forward_kv_step: keys the Triton forward kernel takes per step of a listed kv tile (as
        backward_kv_step). Smaller steps let the forward run as on narrower tiles (less shared
        memory, so two programs may share a multiprocessor) while the backward keeps wide ones.
    """

    block_q: int
    block_kv: int
    num_warps: int = 4
    num_stages: int = 2
    backward_num_warps: int | None = None
    backward_num_stages: int | None = None
    backward_q_step: int | None = None
    backward_kv_step: int | None = None
    forward_kv_step: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            _check_block(name, getattr(self, name), gpu.MIN_BLOCK)
        for name in ("num_warps", "num_stages", "backward_num_warps", "backward_num_stages"):
            value = getattr(self, name)
            if name.startswith("backward") and value is None:
                object.__setattr__(self, name, getattr(self, name.removeprefix("backward_")))
            else:
                object.__setattr__(self, name, check_int(name, value))
        for name, tile in STEPS:
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, getattr(self, tile))
            elif _check_block(name, value, gpu.MIN_BLOCK) > getattr(self, tile):
                raise ValueError(f"{name} must be at most {tile}={getattr(self, tile)}, got {name}={value}")

    def with_tiles(self, block_q: int, block_kv: int) -> BlockSizes:
        """These settings on other tiles: a step of a whole tile stays the whole tile, a smaller
        step shrinks with the tile where it must."""
        tiles = {"block_q": block_q, "block_kv": block_kv}
        steps = {
            step: tiles[tile]
            if getattr(self, step) == getattr(self, tile)
            else min(getattr(self, step), tiles[tile])
            for step, tile in STEPS
        }
        return dataclasses.replace(self, block_q=block_q, block_kv=block_kv, **steps)


def _check_block(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{name} must be an int (a power of two >= {minimum}), got {type(value).__name__} {value!r}"
        )
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {name}={value}")
    return int(value)


# The Triton tables, by the shared memory a program may use (KiB), which decides what tiles fit.
TRITON_TARGETS = {"sm80": 163, "sm86": 99, "sm90": 227}
_DEFAULT_TRITON_TARGET = "sm90"


def triton_target(capability: tuple[int, int] | None) -> str:
    """The Triton table for a CUDA compute capability such as (8, 6).

    sm90: Hopper and datacenter Blackwell (227 KiB); sm80: A100, A30 and Jetson Orin (163 KiB);
    sm86: the 99 KiB parts (RTX 30xx/40xx/50xx, A10, L4, L40) and GPUs that report no CUDA
    capability, whose tiles are the smallest.
    """
    if capability is None:
        return "sm86"
    if capability[0] in (9, 10, 11):
        return "sm90"
    if capability in ((8, 0), (8, 7)):
        return "sm80"
    return "sm86"


def device_target(lowering: str) -> str:
    """The table target of the attached device: "tpu" for Mosaic; for Triton the GPU's architecture,
    or sm90 when no GPU is attached (lowering for CUDA with ``jax.export`` on a CPU)."""
    if lowering == "mosaic_tpu":
        return "tpu"
    gpu = attached_gpu()
    return _DEFAULT_TRITON_TARGET if gpu is None else triton_target(gpu[1])


@functools.cache
def block_size_table() -> dict:
    """The tuned table ``{lowering: {target: {dtype: {head_dim: BlockSizes}}}}`` of ``block_sizes.json``."""
    raw = json.loads(resources.files("jattn.kernels").joinpath("block_sizes.json").read_text())
    return {
        lowering: {
            target: {
                dtype: {int(h): BlockSizes(**sizes) for h, sizes in by_dim.items()}
                for dtype, by_dim in by_dtype.items()
            }
            for target, by_dtype in by_target.items()
        }
        for lowering, by_target in raw.items()
        if lowering in LOWERINGS
    }


def lookup_block_sizes(lowering: str, dtype, head_dim: int, target: str | None = None) -> BlockSizes:
    """The table entry for the smallest tabulated head dim >= ``head_dim`` (else the largest), from
    ``target``'s table (None: the attached device's, ``device_target``)."""
    by_dim = block_size_table()[lowering][target or device_target(lowering)][jnp.dtype(dtype).name]
    fitting = [h for h in sorted(by_dim) if h >= head_dim]
    return by_dim[fitting[0] if fitting else max(by_dim)]


# The largest Triton tiles for IEEE float32 matmuls (precision "highest" or "float32"). Triton runs
# those as FMA loops on CUDA cores, not as TF32 on tensor cores, and the table's float32 tiles, chosen
# for TF32, spill there: at head dim 64 on sm_90, 128x128 spills 45 KB a thread and takes 208 of the
# 227 KiB of shared memory.
IEEE_FLOAT32_MAX_TILES = (64, 32)
# The fewest warps of the IEEE float32 backward: its FMA loops hold their operands in registers,
# and sm_80's float32 entry at head dim 128 (4 backward warps, chosen for TF32) spilled 41 KB a
# thread in its dq kernel on 4 warps, 2.2 KB on 8 (triton_static.compile_for, capped tiles).
IEEE_FLOAT32_MIN_BACKWARD_WARPS = 8


def ieee_float32(dtype) -> bool:
    """Whether the kernel's matmuls on ``dtype`` are IEEE float32 under JAX's current default matmul
    precision (``jax.default_matmul_precision``), which the kernel's dots follow."""
    if jnp.dtype(dtype) != jnp.float32:
        return False
    precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
    if precision is None:
        return False
    if precision in jax.lax.DotAlgorithmPreset.__members__:
        return precision == "F32_F32_F32"
    return jax.lax.Precision(precision) == jax.lax.Precision.HIGHEST


def tabulated_block_sizes(lowering: str, dtype, head_dim: int, target: str | None = None) -> BlockSizes:
    """``lookup_block_sizes``' entry, on Triton within ``IEEE_FLOAT32_MAX_TILES`` and on at least
    ``IEEE_FLOAT32_MIN_BACKWARD_WARPS`` backward warps where the matmuls are IEEE float32
    (``ieee_float32``)."""
    sizes = lookup_block_sizes(lowering, dtype, head_dim, target)
    if lowering == "triton" and ieee_float32(dtype):
        max_q, max_kv = IEEE_FLOAT32_MAX_TILES
        sizes = sizes.with_tiles(min(sizes.block_q, max_q), min(sizes.block_kv, max_kv))
        warps = max(sizes.backward_num_warps or sizes.num_warps, IEEE_FLOAT32_MIN_BACKWARD_WARPS)
        sizes = dataclasses.replace(sizes, backward_num_warps=warps)
    return sizes


def _fit_to_length(block: int, length: int, minimum: int) -> int:
    """A tile no longer than the (power-of-two-rounded) sequence, at least ``minimum``."""
    return min(block, max(minimum, 1 << (length - 1).bit_length()))


def choose_block_sizes(lowering: str, problem: Problem, block_q=None, block_kv=None) -> BlockSizes:
    """The tabulated sizes (``tabulated_block_sizes``) fitted to the lengths; ``block_q``/``block_kv``
    override."""
    minimum = LOWERINGS[lowering].MIN_BLOCK
    head_dim = max(problem.head_dim, problem.value_head_dim)
    table = tabulated_block_sizes(lowering, problem.dtype, LOWERINGS[lowering].padded_head_dim(head_dim))
    bq = (
        _fit_to_length(table.block_q, problem.q_len, minimum)
        if block_q is None
        else _check_block("block_q", block_q, minimum)
    )
    bkv = (
        _fit_to_length(table.block_kv, problem.kv_len, minimum)
        if block_kv is None
        else _check_block("block_kv", block_kv, minimum)
    )
    return table.with_tiles(bq, bkv)


# The scalar memory (SMEM) of a TPU v4 or newer TensorCore is 1 MiB (``pltpu.TpuInfo``'s
# ``smem_capacity_bytes``; v2 and v3 have 16 KiB). Each TPU kernel prefetches one packed schedule into
# it (``KernelAux.rows`` or ``cols``), which may take three quarters; the rest is left to Mosaic's own
# scalars (a margin not measured on a TPU). A dense or causal schedule grows as (length / tile)^2:
# with 128-tiles it takes 129 KiB at 16k tokens, 514 KiB at 32k and 2 MiB at 64k.
TPU_SCHEDULE_BYTES = 768 * 1024
# The largest tiles the TPU lowering grows to on its own to fit its schedule, and the VMEM estimate
# (``tpu.vmem_bytes``) grown tiles must stay within: three quarters of the 16 MiB of VMEM of a
# TPU v4 TensorCore, the smallest of v4 and newer (``pltpu.TpuInfo``'s ``vmem_capacity_bytes``).
# The kernels set no ``vmem_limit_bytes``. At 512-tiles, a causal or dense mask in bfloat16 at head
# dim 128 is estimated at 8 MiB, and 13 MiB with a bias, so a bias keeps the tiles at 256.
MAX_TPU_GROWN_BLOCK = 512
TPU_VMEM_BYTES = 12 * 1024 * 1024


def schedule_bytes(schedule: blocks.Schedule) -> int:
    """The bytes of the larger of a schedule's two packed arrays (each kernel prefetches one)."""
    return 4 * max(schedule.rows.size, schedule.cols.size)


def check_tpu_schedule(schedule: blocks.Schedule, q_len: int, kv_len: int) -> None:
    """Refuse a schedule that would not fit the TPU scalar memory it is prefetched into."""
    used = schedule_bytes(schedule)
    if used > TPU_SCHEDULE_BYTES:
        raise ValueError(
            f"flash on TPU: the tile schedule of T={q_len}, S={kv_len} with block_q={schedule.block_q}, "
            f"block_kv={schedule.block_kv} takes {used // 1024} KiB, more than the "
            f"{TPU_SCHEDULE_BYTES // 1024} KiB of TPU scalar memory (SMEM) it may use; pass larger "
            "block_q and block_kv (tiles chosen from the table grow only up to "
            f"{MAX_TPU_GROWN_BLOCK}, and while their VMEM estimate stays within "
            f"{TPU_VMEM_BYTES // 2**20} MiB), or use implementation='chunked' (or 'ring' across devices)"
        )


def _schedule(mask: masks_lib.Mask, q_len: int, kv_len: int, sizes: BlockSizes) -> blocks.Schedule:
    bq, bkv = sizes.block_q, sizes.block_kv
    return blocks.make_schedule(mask.blocks(q_len, kv_len, bq, bkv), q_len, kv_len, bq, bkv)


def _grown(block: int, length: int) -> int:
    """Twice ``block`` within ``MAX_TPU_GROWN_BLOCK`` and the (power-of-two-rounded) sequence."""
    return max(block, _fit_to_length(min(2 * block, MAX_TPU_GROWN_BLOCK), length, block))


def fit_schedule(
    lowering: str,
    mask: masks_lib.Mask,
    q_len: int,
    kv_len: int,
    sizes: BlockSizes,
    *,
    grow_q: bool,
    grow_kv: bool,
    vmem_of,
) -> tuple[BlockSizes, blocks.Schedule]:
    """``(sizes, schedule)`` of a call. On TPU the schedule must fit the scalar memory
    (``TPU_SCHEDULE_BYTES``): the tiles that may grow (``grow_q``, ``grow_kv``: those not passed in)
    double, up to ``MAX_TPU_GROWN_BLOCK`` and the sequence, and while ``vmem_of(block_q, block_kv)``
    (the kernels' VMEM estimate) stays within ``TPU_VMEM_BYTES``, until it does; else a ValueError."""
    schedule = _schedule(mask, q_len, kv_len, sizes)
    if lowering != "mosaic_tpu":
        return sizes, schedule
    while schedule_bytes(schedule) > TPU_SCHEDULE_BYTES:
        bq = _grown(sizes.block_q, q_len) if grow_q else sizes.block_q
        bkv = _grown(sizes.block_kv, kv_len) if grow_kv else sizes.block_kv
        if (bq, bkv) == (sizes.block_q, sizes.block_kv) or vmem_of(bq, bkv) > TPU_VMEM_BYTES:
            break
        sizes = sizes.with_tiles(bq, bkv)
        schedule = _schedule(mask, q_len, kv_len, sizes)
    check_tpu_schedule(schedule, q_len, kv_len)
    return sizes, schedule


def _tiling(sizes: BlockSizes) -> dict:
    """The tiles, steps and Triton launch settings of a call (``KernelConfig`` fields)."""
    return {field.name: getattr(sizes, field.name) for field in dataclasses.fields(BlockSizes)}


def lowering_for(platform: str) -> str:
    """Which lowering a platform uses: Mosaic on TPU, Triton elsewhere (interpreted on CPU)."""
    return "mosaic_tpu" if platform == "tpu" else "triton"


# ---------------------------------------------------------------------------------------------
# The differentiable kernel call
# ---------------------------------------------------------------------------------------------


def _row_statistic_layout(x):
    """[B, T', N] -> [B, N, T', 1] float32."""
    return jnp.moveaxis(x, 2, 1)[..., None].astype(jnp.float32)


def _varying_alike(call):
    """``call(*arrays)`` with its array arguments cast to vary over the same mesh axes: inside a
    ``shard_map`` that tracks it (``check_vma``), a Pallas call's outputs vary as its operands do
    (``output_like``), so they must agree. Outside one, nothing changes."""

    def alike(*arrays):
        axes = varying_axes(arrays)
        return call(*jax.tree.map(functools.partial(varying_over, axes), arrays))

    return alike


def _kernel(lowering: str, kernel: str, cfg: KernelConfig):
    """``LOWERINGS[lowering].<kernel>`` ("forward" or "backward") with ``cfg``, as ``_flash``'s vjp
    runs it: Pallas cannot differentiate a kernel, so a second derivative gets a clear error."""
    call = _varying_alike(functools.partial(getattr(LOWERINGS[lowering], kernel), cfg))
    return first_order_only(call, "flash")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(lowering: str, cfg: KernelConfig, q, k, v, bias, aux: KernelAux):
    return _varying_alike(functools.partial(LOWERINGS[lowering].forward, cfg))(q, k, v, bias, aux)[0]


def _flash_fwd(lowering, cfg, q, k, v, bias, aux):
    out, lse = _kernel(lowering, "forward", cfg)(q, k, v, bias, aux)
    return out, (q, k, v, bias, aux, out, lse)


def _flash_bwd(lowering, cfg, residuals, d_out):
    q, k, v, bias, aux, out, lse = residuals
    delta = jnp.einsum("btnh,btnh->btn", d_out.astype(jnp.float32), out.astype(jnp.float32))  # [B, T', N]
    dq, dk, dv, ds = _kernel(lowering, "backward", cfg)(
        q, k, v, bias, aux, lse, _row_statistic_layout(delta), d_out
    )
    dbias = None
    if bias is not None:  # ds [B, N, T', S'] -> bias [B|1, N|1, T', S']
        summed = tuple(axis for axis in (0, 1) if bias.shape[axis] == 1)
        dbias = ds.sum(axis=summed, keepdims=True).astype(bias.dtype)
    d_aux = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), aux)
    return dq, dk, dv, dbias, d_aux


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# From a canonical problem to the kernel operands
# ---------------------------------------------------------------------------------------------


def _pad_axis(x, axis: int, size: int):
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pads)


def _kernel_aux(
    problem: Problem, mask_formula, schedule: blocks.Schedule, q_padded: int, kv_padded: int
) -> KernelAux:
    """The kernel's mask operands: ``mask_formula`` is ``blocks.mask_formula``'s of the problem."""
    formula, q_vectors, kv_vectors = mask_formula
    table = None
    if formula == ("table",) and problem.mask is not None:
        table = blocks.tile_table(problem.mask, schedule, problem.q_len, problem.kv_len)
    return KernelAux(
        rows=jnp.asarray(schedule.rows),
        cols=jnp.asarray(schedule.cols),
        table=table,
        q_vectors=tuple(_pad_axis(x, 1, q_padded)[:, :, None] for x in q_vectors),  # [B|1, T', 1]
        kv_vectors=tuple(_pad_axis(x, 1, kv_padded)[:, None, :] for x in kv_vectors),  # [B|1, 1, S']
    )


def flash_problem(
    problem: Problem,
    *,
    platform: str,
    interpret: bool,
    block_q=None,
    block_kv=None,
    sizes: BlockSizes | None = None,
):
    """Run the kernel on a canonical ``Problem`` for ``platform`` -> ``[B, T, N, Hv]``.

    ``platform`` picks the lowering ("tpu": Mosaic; "gpu"/"cuda"/"cpu": Triton), so a CPU
    process can lower for either with ``jax.export``. ``sizes`` (the autotuner's candidates)
    replaces the table lookup entirely.
    """
    if problem.q.shape[0] == 0:  # an empty batch: a kernel grid cannot have a size-0 axis
        return jnp.zeros((0, problem.q_len, problem.num_heads, problem.value_head_dim), problem.q.dtype)
    lowering = lowering_for(platform)
    tuned = sizes is not None
    if sizes is None:
        sizes = choose_block_sizes(lowering, problem, block_q, block_kv)
    q_len, kv_len = problem.q_len, problem.kv_len
    mask = masks_lib.full() if problem.mask is None else problem.mask
    mask_formula = blocks.mask_formula(problem.mask, q_len, kv_len)
    formula, q_vectors, kv_vectors = mask_formula
    vmem_of = functools.partial(
        tpu.vmem_bytes,
        head_dim=problem.head_dim,
        value_dim=problem.value_head_dim,
        itemsize=problem.dtype.itemsize,
        has_bias=problem.bias is not None,
        has_table=formula == ("table",),
        num_q_vectors=len(q_vectors),
        num_kv_vectors=len(kv_vectors),
    )
    sizes, schedule = fit_schedule(
        lowering,
        mask,
        q_len,
        kv_len,
        sizes,
        grow_q=not tuned and block_q is None,
        grow_kv=not tuned and block_kv is None,
        vmem_of=vmem_of,
    )
    bq, bkv = sizes.block_q, sizes.block_kv
    q_padded, kv_padded = -(-q_len // bq) * bq, -(-kv_len // bkv) * bkv
    aux = _kernel_aux(problem, mask_formula, schedule, q_padded, kv_padded)
    pad_dim = LOWERINGS[lowering].padded_head_dim
    head_dim, value_dim = pad_dim(problem.head_dim), pad_dim(problem.value_head_dim)
    q = _pad_axis(_pad_axis(problem.q, 3, head_dim), 1, q_padded)  # [B, T', N, H']
    k = _pad_axis(_pad_axis(problem.k, 3, head_dim), 1, kv_padded)  # [B, S', K, H']
    v = _pad_axis(_pad_axis(problem.v, 3, value_dim), 1, kv_padded)  # [B, S', K, Hv']
    bias = problem.bias
    if bias is not None:  # [B|1, N|1, T|1, S|1] -> [B|1, N|1, T', S']
        bias = jnp.broadcast_to(bias, (*bias.shape[:2], q_len, kv_len))
        bias = _pad_axis(_pad_axis(bias, 2, q_padded), 3, kv_padded)
    cfg = KernelConfig(
        scale=float(problem.scale),
        softcap=None if problem.softcap is None else float(problem.softcap),
        q_len=q_len,
        kv_len=kv_len,
        **_tiling(sizes),
        formula=formula,
        interpret=bool(interpret),
        zero_unattended=not mask._attends_every_row(q_len, kv_len),
    )
    out = _flash(lowering, cfg, q, k, v, bias, aux)  # [B, T', N, Hv']
    return out[:, :q_len, :, : problem.value_head_dim]


# ---------------------------------------------------------------------------------------------
# One head with its log-sum-exp, for callers that merge partial softmaxes (ring attention)
# ---------------------------------------------------------------------------------------------


def _one_head_call(q, k, v, mask, plan, scale, softcap, interpret):
    """A chunked ``plan`` and a per-tile ``mask`` -> (lowering, cfg, aux, padded ``[1, L', 1, H']``
    q, k, v). The mask goes to the kernel as the compact table of the plan's masked tiles."""
    platform = jax.default_backend()
    lowering = lowering_for(platform)
    schedule = blocks.schedule_for_plan(plan)
    if lowering == "mosaic_tpu":
        check_tpu_schedule(schedule, plan.q_len, plan.kv_len)
    bq, bkv = plan.block_q, plan.block_kv
    table, formula = None, None
    if mask is not None and len(schedule.partial_tiles):
        table = blocks.tile_table(mask, schedule, plan.q_len, plan.kv_len)  # [1, 1, P, bq, bkv]
        formula = ("table",)
    aux = KernelAux(
        rows=jnp.asarray(schedule.rows),
        cols=jnp.asarray(schedule.cols),
        table=table,
        q_vectors=(),
        kv_vectors=(),
    )
    pad_dim = LOWERINGS[lowering].padded_head_dim
    head_dim, value_dim = pad_dim(q.shape[-1]), pad_dim(v.shape[-1])
    sizes = lookup_block_sizes(lowering, q.dtype, max(head_dim, value_dim)).with_tiles(bq, bkv)
    cfg = KernelConfig(
        scale=float(scale),
        softcap=None if softcap is None else float(softcap),
        q_len=plan.q_len,
        kv_len=plan.kv_len,
        **_tiling(sizes),
        formula=formula,
        interpret=_resolve_interpret(interpret),
        empty_lse=MASK_VALUE,
    )
    q_padded, kv_padded = plan.num_q_blocks * bq, plan.num_kv_blocks * bkv
    as_kernel = lambda x, length, dim: _pad_axis(_pad_axis(x, 1, dim), 0, length)[None, :, None]  # noqa: E731
    operands = (
        as_kernel(q, q_padded, head_dim),
        as_kernel(k, kv_padded, head_dim),
        as_kernel(v, kv_padded, value_dim),
    )
    return lowering, cfg, aux, operands


def flash_forward_with_lse(q, k, v, mask, *, plan, scale: float, softcap=None, interpret=None):
    """One head's forward with its log-sum-exp by the flash kernel; ``chunked_forward_with_lse``'s contract.

    Args:
      q: ``[T, H]``; k: ``[S, H]``; v: ``[S, Hv]`` with T, S = ``plan.q_len``, ``plan.kv_len``.
      mask: anything with ``tile(q_idx, kv_idx) -> bool [bq, bkv]`` over local indices, or None; it
        is evaluated on the plan's masked tiles only and handed to the kernel as its tile table.
      plan: a ``jattn.core.chunked`` plan whose blocks are powers of two the lowering takes.
      interpret: None runs interpreted on CPU and compiled on GPU/TPU.
    Returns:
      ``(out [T, Hv] float32, lse [T] float32)``; a row with nothing to attend has out 0 and lse
      ``MASK_VALUE``. ``out`` is rounded to q's dtype by the kernel.
    """
    lowering, cfg, aux, (qp, kp, vp) = _one_head_call(q, k, v, mask, plan, scale, softcap, interpret)
    out, lse = LOWERINGS[lowering].forward(cfg, qp, kp, vp, None, aux)  # [1, T', 1, Hv'], [1, 1, T', 1]
    return out[0, : plan.q_len, 0, : v.shape[-1]].astype(jnp.float32), lse[0, 0, : plan.q_len, 0]


def flash_backward_with_lse(
    q, k, v, mask, out, lse, d_out, *, plan, scale: float, softcap=None, interpret=None
):
    """One head's (dq, dk, dv), all float32, given the final ``out [T, Hv]`` and ``lse [T]``.

    As ``chunked_backward_with_lse``: ``out`` and ``lse`` may belong to a larger softmax of which
    these keys are one block, and the result is then this block's share of the gradients.
    """
    lowering, cfg, aux, (qp, kp, vp) = _one_head_call(q, k, v, mask, plan, scale, softcap, interpret)
    q_padded = qp.shape[1]
    value_dim = vp.shape[-1]
    delta = jnp.einsum("th,th->t", d_out.astype(jnp.float32), out.astype(jnp.float32))  # [T]
    column = lambda x: _pad_axis(x.astype(jnp.float32), 0, q_padded)[None, None, :, None]  # noqa: E731
    d_out_p = _pad_axis(_pad_axis(d_out.astype(q.dtype), 1, value_dim), 0, q_padded)[None, :, None]
    dq, dk, dv, _ = LOWERINGS[lowering].backward(
        cfg, qp, kp, vp, None, aux, column(lse), column(delta), d_out_p
    )
    f32 = lambda x, length, dim: x[0, :length, 0, :dim].astype(jnp.float32)  # noqa: E731
    return (
        f32(dq, plan.q_len, q.shape[-1]),
        f32(dk, plan.kv_len, k.shape[-1]),
        f32(dv, plan.kv_len, v.shape[-1]),
    )


# ---------------------------------------------------------------------------------------------
# Public entry and registration
# ---------------------------------------------------------------------------------------------


def _resolve_interpret(interpret) -> bool:
    backend = jax.default_backend()
    if interpret is None:
        return backend == "cpu"
    if not isinstance(interpret, bool):
        raise TypeError(
            f"interpret must be True, False or None, got {type(interpret).__name__} {interpret!r}"
        )
    if not interpret and backend == "cpu":
        raise ValueError("interpret=False compiles the kernel for a GPU or TPU, but the backend is 'cpu'")
    return interpret


def unsupported_reason(problem: Problem) -> str | None:
    """None when the kernel runs ``problem``, else why it cannot (``supports`` of the registry)."""
    if not any(problem.dtype == d for d in _KERNEL_DTYPES):
        return f"the flash kernel takes float16, bfloat16 or float32, got {problem.dtype}"
    widest = max(problem.head_dim, problem.value_head_dim)
    if widest > MAX_HEAD_DIM:
        return f"the flash kernel takes head dims up to {MAX_HEAD_DIM}, got {widest}"
    if problem.backend not in (*GPU_BACKENDS, "tpu", "cpu"):
        return f"the flash kernel runs on GPU, TPU or (interpreted) CPU, the backend is {problem.backend!r}"
    if problem.backend in GPU_BACKENDS and (missing := gpu.missing_backend_reason()) is not None:
        return missing
    return pre_ampere_reason("the flash kernel")


def _axes_of(entry) -> tuple[str, ...]:
    """The mesh axes of one ``PartitionSpec`` entry (None, a name or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _split_axes(mesh, problem: Problem) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(batch axes, head axes) of the context mesh the kernel is split over.

    On Explicit axes, those q's batch and head dims are sharded over (its type says); the heads only
    where the kv heads divide as well, so each device holds whole groups of grouped-query heads.
    Else the batch goes over jattn's batch axis ("data", as ring attention and the training loop take
    it) where it is an Auto axis whose size divides B.
    """
    from jattn.parallel.ring import batch_axis_for  # jattn.parallel imports this module

    if jax.sharding.AxisType.Explicit in mesh.axis_types:
        spec = tuple(jax.typeof(problem.q).sharding.spec) + (None,) * 4
        batch, heads = _axes_of(spec[0]), _axes_of(spec[2])
        if problem.num_kv_heads % math.prod(mesh.shape[axis] for axis in heads):
            heads = ()
        if batch or heads:
            return batch, heads
    axis = batch_axis_for(mesh, problem.q.shape[0])
    if axis is None or mesh.axis_types[mesh.axis_names.index(axis)] != jax.sharding.AxisType.Auto:
        return (), ()
    return (axis,), ()


def per_device_shard(problem: Problem, attend):
    """``attend(problem) -> [B, T, N, Hv]`` run on each device's share of the batch (and heads) where
    a mesh is set (``jax.set_mesh``).

    A Pallas kernel is one custom call that XLA cannot partition: on sharded inputs it would gather
    them and compute everything on every device. Under a mesh the kernel runs in a ``shard_map`` over
    the batch and head axes (``_split_axes``), each device's sequences whole (on Explicit axes a
    sharded sequence dim is gathered first). Inside a ``shard_map`` (Manual axes), or with nothing
    to split over, it runs as it is.
    """
    from jattn.parallel.mesh import context_mesh, reshard_for_shard_map, shard_map

    mesh = context_mesh()
    if mesh is None or jax.sharding.AxisType.Manual in mesh.axis_types:
        return attend(problem)
    batch_axes, head_axes = _split_axes(mesh, problem)
    if not (batch_axes or head_axes):
        return attend(problem)
    batch, heads = batch_axes or None, head_axes or None
    operand = PartitionSpec(batch, None, heads, None)  # q, k, v and the output

    def leaf(x):  # mask leaves and bias: [B|1, N|1, ...]
        return PartitionSpec(
            batch if x.shape[0] > 1 else None, heads if x.ndim > 1 and x.shape[1] > 1 else None
        )

    args = (problem.q, problem.k, problem.v, problem.mask, problem.bias)
    specs = (operand, operand, operand, jax.tree.map(leaf, problem.mask), jax.tree.map(leaf, problem.bias))

    def local(q, k, v, mask, bias):  # this device's share
        return attend(dataclasses.replace(problem, q=q, k=k, v=v, mask=mask, bias=bias))

    return shard_map(local, mesh=mesh, in_specs=specs, out_specs=operand)(
        *reshard_for_shard_map(mesh, args, specs)
    )


def run(problem: Problem):
    """The registry's ``run``: compiled on GPU/TPU, interpreted on CPU -> ``[B, T, N, Hv]``; per
    shard of the batch under a mesh (``per_device_shard``)."""
    compute = functools.partial(flash_problem, platform=problem.backend, interpret=problem.backend == "cpu")
    return per_device_shard(problem, compute)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "block_q", "block_kv", "interpret"))
def _flash_attention_jit(q, k, v, mask, bias, *, scale, softcap, block_q, block_kv, interpret):
    problem = make_problem(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap)
    why_not = unsupported_reason(problem)
    if why_not is not None:
        raise NotImplementedError(why_not)
    compute = functools.partial(
        flash_problem, platform=problem.backend, interpret=interpret, block_q=block_q, block_kv=block_kv
    )
    out = per_device_shard(problem, compute)  # [B, T, N, Hv]
    return out.reshape(*problem.batch_shape, *out.shape[1:]).astype(q.dtype)


def flash_attention(
    q, k, v, *, mask=None, bias=None, scale=None, softcap=None, block_q=None, block_kv=None, interpret=None
):
    """Softmax attention by the Pallas flash kernel (same numbers as ``jattn.attention``).

    Args:
      q: ``[B..., T, N, H]``; k: ``[B..., S, K, H]``; v: ``[B..., S, K, Hv]`` with N % K == 0
        (grouped-query K/V are indexed, never repeated). H, Hv <= 256; float16, bfloat16, float32.
      mask: a ``jattn.masks`` mask or a boolean array broadcastable to ``[B..., N, T, S]``. Its
        block layout decides which tiles run; rows with nothing to attend return zeros.
      bias: added to the scaled scores, broadcastable to ``[B..., N, T, S]`` (the kernel reads it
        as ``[B|1, N|1, T, S]``, and its gradient takes ``[B, N, T, S]`` float32 memory).
      scale: defaults to ``1 / sqrt(H)``. softcap: logits become ``softcap · tanh(logits / softcap)``.
      block_q, block_kv: tile sizes (powers of two >= 16; on TPU >= 128), default from the table
        in ``block_sizes.json`` by GPU architecture (``triton_target``), dtype and head dim,
        shrunk to short sequences; on TPU grown (up to 512) until the tile schedule fits the
        scalar memory (``fit_schedule``).
      interpret: None runs interpreted on CPU and compiled on GPU/TPU.
    Returns:
      ``[B..., T, N, Hv]`` in q's dtype.
    """
    _check_shapes(q, k, v)
    if mask is not None:
        mask = masks_lib._as_mask(mask, "mask")
    scale = _check_positive_float("scale", scale)
    softcap = _check_positive_float("softcap", softcap)
    interpret = _resolve_interpret(interpret)
    minimum = LOWERINGS[lowering_for(jax.default_backend())].MIN_BLOCK
    block_q = None if block_q is None else _check_block("block_q", block_q, minimum)
    block_kv = None if block_kv is None else _check_block("block_kv", block_kv, minimum)
    return _flash_attention_jit(
        q,
        k,
        v,
        mask,
        bias,
        scale=scale,
        softcap=softcap,
        block_q=block_q,
        block_kv=block_kv,
        interpret=interpret,
    )
