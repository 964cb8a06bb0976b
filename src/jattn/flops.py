"""Matmul FLOPs of a JAX function, counted from its jaxpr with loop trip counts.

XLA's cost analysis (``jax.jit(f).lower(...).compile().cost_analysis()``) counts the body of a loop
once, so for the implementations that stream over blocks or chunks with ``lax.scan`` / ``lax.map``
(``banded``, ``block_sparse``, ``linear_attention``, ``performer_attention``) it reports a number that
stops growing with the length. ``matmul_flops`` walks the jaxpr instead: every ``dot_general``
counts ``2 · (lhs size) · (rhs columns it contributes)``, the body of a ``scan`` is multiplied by its
length, and nested jaxprs (jit, custom_vjp, checkpoint) are entered; a ``cond`` counts its costliest
branch. Elementwise work (exp, masking) is not counted: for attention it is a factor H smaller.

A ``while`` loop (e.g. ``fori_loop`` with a traced trip count, as in ``implementation="chunked"``)
or a Pallas kernel has no trip count in the jaxpr: ``matmul_flops`` refuses it rather than undercount.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import jax
from jax.extend import core as jax_core

_UNCOUNTABLE = {
    "while": "a while loop (e.g. fori_loop with a traced trip count) runs an unknown number of times",
    "pallas_call": "a Pallas kernel's loops are not in the jaxpr",
}


def matmul_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of the matrix products ``fn(*args, **kwargs)`` performs (``args`` may be
    ``jax.ShapeDtypeStruct``s). Wrap ``fn`` in ``jax.grad`` or ``jax.vjp`` to count a backward pass.

    Raises:
      ValueError: ``fn`` contains a loop or kernel whose trip count the jaxpr does not say.
    """
    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def jaxpr_matmul_flops(jaxpr: jax_core.Jaxpr) -> int:
    """``matmul_flops`` of an open jaxpr."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _UNCOUNTABLE:
            raise ValueError(f"matmul_flops cannot count {name!r}: {_UNCOUNTABLE[name]}")
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_matmul_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            inner = sum(jaxpr_matmul_flops(sub) for sub in _sub_jaxprs(eqn.params))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def _dot_general_flops(eqn) -> int:
    lhs, rhs = (var.aval.shape for var in eqn.invars)
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = math.prod(size for i, size in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch)
    return 2 * math.prod(lhs) * rhs_free


def _sub_jaxprs(params: dict) -> Iterator[jax_core.Jaxpr]:
    """The jaxprs an equation runs (jit's, custom_vjp's forward, checkpoint's, scan's body)."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax_core.Jaxpr):
                yield item
