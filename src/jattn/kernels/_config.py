"""What the flash lowerings receive: a static kernel configuration and the padded operands."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

# A packed schedule row is [count, num_full, ids[W], table[W]] (see blocks.Schedule).
HEADER = 2


def row_length(width: int) -> int:
    """int32 values in a packed schedule row of ``width`` (W) entries."""
    return HEADER + 2 * width


def entries_per_row(length: int) -> int:
    """W of a packed schedule row of ``length`` int32 values (``row_length``'s inverse)."""
    return (length - HEADER) // 2


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static settings of one flash call (hashable: it is a ``custom_vjp`` nondiff argument).

    Attributes:
      scale, softcap: score modifiers (see ``jattn.attention``).
      q_len, kv_len: the true lengths (operands are padded to block multiples).
      block_q, block_kv: tile sizes. num_warps, num_stages: Triton launch settings of the
        forward kernel; backward_num_warps, backward_num_stages: of the dq and dk/dv kernels.
      backward_q_step, backward_kv_step, forward_kv_step: rows per step of the Triton dk/dv, dq
        and forward kernels over a listed tile (see ``flash.BlockSizes``; the TPU lowering takes
        whole tiles).
      formula: the in-kernel mask formula (``blocks.mask_formula``) or None.
      interpret: run the kernel in Pallas interpret mode.
      empty_lse: the lse of a row that attends nothing (ring attention merges by it).
      zero_unattended: whether masked tiles zero the rows that nothing in the tile attends before
        a matmul sums over them (``_tile.zero_unused``). Only rows that nothing attends at all
        can hold NaN that must stay out; where the mask attends every row
        (``Mask._attends_every_row``) the kernels skip it.
    """

    scale: float
    softcap: float | None
    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    num_warps: int
    num_stages: int
    backward_num_warps: int
    backward_num_stages: int
    backward_q_step: int
    backward_kv_step: int
    forward_kv_step: int
    formula: Any
    interpret: bool
    empty_lse: float = 0.0
    zero_unattended: bool = True

    def for_zeroing(self, allowed):
        """``allowed`` where the unattended rows of a masked tile are zeroed, else None (as for a
        full tile): what ``_tile.keys_used`` and ``_tile.queries_used`` take."""
        return allowed if self.zero_unattended else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelAux:
    """The non-differentiable operands of a flash call.

    Attributes:
      rows: int32 ``[num_q_blocks, HEADER + 2W]`` schedule of the forward and dq passes.
      cols: int32 ``[num_kv_blocks, HEADER + 2Wt]`` schedule of the dk/dv pass.
      table: int8 ``[B|1, N|1, P, bq, bkv]`` partial-tile table, or None.
      q_vectors: int32 ``[B|1, T', 1]`` per-query vectors of the formula.
      kv_vectors: int32 ``[B|1, 1, S']`` per-key vectors of the formula.
    """

    rows: Any
    cols: Any
    table: Any
    q_vectors: tuple
    kv_vectors: tuple

    @property
    def row_width(self) -> int:
        """W: the entries of a forward/dq schedule row."""
        return entries_per_row(self.rows.shape[1])

    @property
    def col_width(self) -> int:
        """Wt: the entries of a dk/dv schedule row."""
        return entries_per_row(self.cols.shape[1])


def split_refs(refs, aux: KernelAux, has_bias: bool, num_fixed: int):
    """Kernel refs -> (fixed refs, bias_ref, table_ref, q vector refs, kv vector refs, the rest).

    Both lowerings pass operands in this order: ``num_fixed`` fixed refs, then the bias and the
    table when present, then the mask vectors, then the outputs (and scratch).
    """
    fixed, rest = list(refs[:num_fixed]), list(refs[num_fixed:])
    bias_ref = rest.pop(0) if has_bias else None
    table_ref = rest.pop(0) if aux.table is not None else None
    q_vec_refs = [rest.pop(0) for _ in aux.q_vectors]
    kv_vec_refs = [rest.pop(0) for _ in aux.kv_vectors]
    return fixed, bias_ref, table_ref, q_vec_refs, kv_vec_refs, rest
