"""Pieces shared by the implementations: the softmax-attention math of one tile, and what GPU is attached."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
"""Finite stand-in for -inf on masked logits: exp(MASK_VALUE - m) is 0 and never NaN."""

GPU_BACKENDS = ("gpu", "cuda", "rocm")
"""The names ``jax.default_backend()`` gives a GPU."""


def varying_axes(*arrays) -> frozenset:
    """The mesh axes any of ``arrays`` (pytrees; None skipped) varies over inside a ``shard_map``
    that tracks it (``check_vma=True``, JAX's default); empty elsewhere."""
    return frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in jax.tree.leaves(arrays)))


def varying_over(axes: frozenset, x):
    """``x`` (e.g. a loop's zero-filled carry, or a kernel operand) typed as varying over ``axes``:
    where ``check_vma`` is on, a loop carry must keep its type through the body, and a Pallas call's
    outputs vary as its operands do (``output_like``)."""
    missing = tuple(sorted(axes - jax.typeof(x).manual_axis_type.varying))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def output_like(shape, dtype, operand) -> jax.ShapeDtypeStruct:
    """A Pallas call's output, varying over the mesh axes its ``operand`` varies over (all of a
    call's operands vary alike: ``varying_over``)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(operand).manual_axis_type)


def first_order_only(fn, implementation: str):
    """``fn`` (the forward or backward of a hand-written VJP) with a clear error for second derivatives.

    Grad of grad or a Hessian differentiates a custom_vjp's rules; loops with traced trip counts
    (the tiles a mask leaves non-empty) and Pallas kernels cannot be differentiated, and fail deep
    inside JAX. This raises first, naming the implementation that can.
    """

    @jax.custom_jvp
    def once_differentiable(*args):
        return fn(*args)

    @once_differentiable.defjvp
    def no_second_derivative(primals, tangents):
        raise NotImplementedError(
            f"implementation={implementation!r} has first-order gradients only (its backward pass is "
            "hand-written, not differentiable itself): for grad of grad or Hessians use "
            "implementation='xla'"
        )

    return once_differentiable


AMPERE = (8, 0)
"""The oldest NVIDIA GPUs the fused kernels run on: asynchronous copies and bfloat16 tensor cores."""


def attached_gpu() -> tuple[str, tuple[int, int] | None] | None:
    """(device kind, CUDA compute capability) of the attached GPU; the capability is None where the
    device reports none a CUDA GPU would ("gfx942" on ROCm). None when no GPU is attached."""
    if jax.default_backend() not in GPU_BACKENDS:
        return None
    device = jax.devices()[0]
    try:
        major, minor = (int(part) for part in str(device.compute_capability).split(".")[:2])
    except (AttributeError, ValueError):
        return device.device_kind, None
    return device.device_kind, (major, minor)


def pre_ampere_reason(what: str) -> str | None:
    """Why ``what`` cannot run on the attached GPU if it is older than Ampere, else None."""
    gpu = attached_gpu()
    if gpu is None:
        return None
    kind, capability = gpu
    if capability is None or capability >= AMPERE:
        return None
    major, minor = capability
    return f"{what} needs an NVIDIA GPU of compute capability 8.0 or newer, this {kind} is {major}.{minor}"


def logits(q, k, bias, *, scale: float, softcap: float | None, allowed=None):
    """Scaled scores of one tile in float32, then bias, then tanh capping.

    The scale multiplies the float32 scores, as cuDNN, FlashAttention and ``jax.nn.dot_product_attention``
    do, not q: folded into a 16-bit q it would be rounded with q·scale, and every logit with them (in
    bfloat16 at scale 3, 9x the error of scaling the scores). With a bias, the multiply and the add
    are one FMA; in the kernels the multiply sits beside the exponential's FFMA. A score the bias brings to
    ``MASK_VALUE`` or below (an additive mask of -inf or float32's min) skips the cap, so it leaves
    its key out with a softcap too (``reference.MASKED_LOGIT``).

    Args:
      q: ``[T, H]``. k: ``[S, H]``. bias: ``[T|1, S|1]`` or None.
      allowed: bool ``[T, S]`` or None; with a softcap, scores outside it are zeroed before the
        tanh, so a NaN bias there cannot reach a gradient through the tanh's derivative.
    Returns:
      ``(s [T, S] float32, tanh [T, S] | None)``; the tanh is kept for the softcap gradient.
    """
    s = jnp.einsum("th,sh->ts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if softcap is None:
        return s, None
    if allowed is not None:
        s = jnp.where(allowed, s, 0.0)
    capped = jnp.tanh(s / softcap)
    if bias is None:
        return softcap * capped, capped
    return jnp.where(s <= MASK_VALUE, s, softcap * capped), capped


def zero_unattended(allowed, q, k, v):
    """Zero the rows of q (k, v) that no key (query) in ``allowed [T, S]`` pairs with.

    Masked positions may hold anything, NaN included (padding); after this they cannot reach an
    output or a gradient through ``0 · NaN``.
    """
    q = jnp.where(allowed.any(-1)[:, None], q, 0)
    kv_used = allowed.any(0)[:, None]
    return q, jnp.where(kv_used, k, 0), jnp.where(kv_used, v, 0)
