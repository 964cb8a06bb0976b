"""``jattn.attention``: one call for every exact attention, many implementations behind it.

What is computed is fixed by the mask and the score modifiers (bias, softcap); how it is computed
is the implementation. Implementations register themselves here with a ``supports`` check that
returns None when a call is supported and otherwise the reason it is not; ``implementation=None``
takes the first supported one in a backend- and mask-aware order, and ``explain`` says which and
why.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn import masks as masks_lib
from jattn.core._common import GPU_BACKENDS
from jattn.core.chunked import chunked_attention
from jattn.core.cudnn import run_cudnn, supports_cudnn
from jattn.core.dense import dense_attention

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
_DENSE_BYTES_BUDGET = 1 << 30  # "xla" is preferred while its [B, N, T, S] float32 scores fit
_SPARSE_DENSITY = 0.5  # a mask whose non-empty tiles are at most this fraction counts as sparse
_LAYOUT_BLOCK = 128  # tile size at which the choice measures a mask's sparsity


@dataclasses.dataclass(frozen=True)
class Problem:
    """One attention call in canonical form (what implementations receive).

    Attributes:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]`` (batch dims flattened to B).
      mask: canonical ``Mask`` (array leaves ``[B|1, N|1, ...]``) or None.
      bias: ``[B|1, N|1, T|1, S|1]`` or None.
      scale: multiplies q·k. softcap: logits become ``softcap · tanh(logits / softcap)``, or None.
      batch_shape: the caller's batch dims, restored on the output.
    """

    q: Any
    k: Any
    v: Any
    mask: masks_lib.Mask | None
    bias: Any
    scale: float
    softcap: float | None
    batch_shape: tuple[int, ...]

    @property
    def q_len(self) -> int:
        return self.q.shape[1]

    @property
    def kv_len(self) -> int:
        return self.k.shape[1]

    @property
    def num_heads(self) -> int:
        return self.q.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def value_head_dim(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def backend(self) -> str:
        return jax.default_backend()

    def layout(self, block_q: int = _LAYOUT_BLOCK, block_kv: int = _LAYOUT_BLOCK) -> np.ndarray:
        """The mask's block layout (all FULL without a mask)."""
        return (masks_lib.full() if self.mask is None else self.mask).blocks(
            self.q_len, self.kv_len, block_q, block_kv
        )

    def density(self) -> float:
        """Fraction of non-empty tiles in the layout at the default tile size."""
        return float(np.mean(self.layout() != masks_lib.EMPTY))


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A registered way to compute attention.

    Attributes:
      name: what ``implementation=`` takes.
      run: ``run(problem) -> [B, T, N, Hv]``.
      supports: ``supports(problem) -> None`` when it can run the problem, else the reason.
      summary: one line for ``explain`` and the README.
    """

    name: str
    run: Callable[[Problem], Any]
    supports: Callable[[Problem], str | None]
    summary: str


_REGISTRY: dict[str, Implementation] = {}


def register_implementation(
    name: str,
    run: Callable[[Problem], Any],
    supports: Callable[[Problem], str | None] | None = None,
    *,
    summary: str = "",
) -> None:
    """Add (or replace) an implementation under ``name``."""
    _REGISTRY[name] = Implementation(name, run, supports or (lambda problem: None), summary)


def implementations() -> dict[str, str]:
    """Registered implementation names with their one-line summaries."""
    return {name: impl.summary for name, impl in _REGISTRY.items()}


# ---------------------------------------------------------------------------------------------
# Argument checks and canonical form
# ---------------------------------------------------------------------------------------------


def _check_array(name: str, x: Any) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not any(x.dtype == d for d in _FLOAT_DTYPES):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}"
        )


def _check_positive_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python number, fixed when the function is traced (it is a static "
            f"argument of jit), got a traced value {value}"
        )
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {value!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {name}={value}")
    return value


def _check_shapes(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_array(name, x)
        if x.ndim < 3:
            raise ValueError(
                f"{name} must be [B..., length, heads, head_dim] (at least 3 dims), got shape {x.shape}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.shape[:-3] == k.shape[:-3] == v.shape[:-3]):
        raise ValueError(
            f"q, k and v must have the same batch dims, got q.shape={q.shape}, k.shape={k.shape}, "
            f"v.shape={v.shape}"
        )
    if k.shape[-3:-1] != v.shape[-3:-1]:
        raise ValueError(
            f"k and v must have the same length and number of heads, got k.shape={k.shape} and "
            f"v.shape={v.shape}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dim, got q.shape[-1]={q.shape[-1]} and "
            f"k.shape[-1]={k.shape[-1]}"
        )
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of key/value heads, got "
            f"{num_heads} query heads (q.shape[-2]) and {num_kv_heads} (k.shape[-2])"
        )
    if 0 in (*q.shape[-3:], *k.shape[-3:], *v.shape[-3:]):
        raise ValueError(
            "sequence lengths, head counts and head dims must be positive, got "
            f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}"
        )


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False))


def _canonical_bias(bias, batch_shape, num_heads, q_len, kv_len):
    if bias is None:
        return None
    _check_array("bias", bias)
    target = (*batch_shape, num_heads, q_len, kv_len)
    if not _broadcasts(bias.shape, target):
        raise ValueError(f"bias must broadcast to [B..., N, T, S] = {target}, got shape {bias.shape}")
    bias = bias.reshape((1,) * (len(target) - bias.ndim) + bias.shape)  # [b..., n, t, s]
    return masks_lib._flatten_batch(bias, batch_shape, 3)


def _check_mask_shapes(mask: masks_lib.Mask, batch_shape, num_heads, q_len, kv_len) -> None:
    """Every data-dependent part of the mask must fit T and S and broadcast to [B..., N, T, S]."""
    masks_lib._check_data_lengths(mask, q_len, kv_len)
    target = (*batch_shape, num_heads, q_len, kv_len)
    for part in masks_lib._data_parts(mask):
        if isinstance(part, masks_lib.ArrayMask):
            if not _broadcasts(np.shape(part.array), target):
                raise ValueError(
                    f"mask must broadcast to [B..., N, T, S] = {target}, got shape {np.shape(part.array)}"
                )
        elif isinstance(part, masks_lib.Padding):
            for name, x in (("q_lengths", part.q_lengths), ("kv_lengths", part.kv_lengths)):
                if not _broadcasts(np.shape(x), batch_shape):
                    raise ValueError(
                        f"padding {name} must broadcast to the batch dims {batch_shape}, got shape "
                        f"{np.shape(x)}"
                    )
        elif isinstance(part, masks_lib.Segments):  # [B..., T] and [B..., S]
            for name, x in (("q_segment_ids", part.q_segment_ids), ("kv_segment_ids", part.kv_segment_ids)):
                if not _broadcasts(np.shape(x)[:-1], batch_shape):
                    raise ValueError(
                        f"{name} must have batch dims broadcasting to {batch_shape}, got shape {np.shape(x)}"
                    )


def make_problem(q, k, v, *, mask=None, bias=None, scale=None, softcap=None) -> Problem:
    """Check the arguments of ``attention`` and put them in canonical form."""
    _check_shapes(q, k, v)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    batch_shape = tuple(q.shape[:-3])
    q_len, num_heads, head_dim = q.shape[-3:]
    kv_len = k.shape[-3]
    scale = _check_positive_float("scale", scale)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    softcap = _check_positive_float("softcap", softcap)
    if mask is not None:
        mask = masks_lib._as_mask(mask, "mask")
        _check_mask_shapes(mask, batch_shape, num_heads, q_len, kv_len)
        mask = mask.for_lengths(q_len, kv_len)._canonical(batch_shape, num_heads)
    bias = _canonical_bias(bias, batch_shape, num_heads, q_len, kv_len)
    if bias is not None:  # kept at float32 or wider: in bfloat16, ALiBi's -2048 steps by 16 and -1e9 is -inf
        bias = bias.astype(jnp.promote_types(q.dtype, jnp.float32))
    flat = lambda x: x.reshape(-1, *x.shape[-3:])  # noqa: E731  [B..., L, N, H] -> [B, L, N, H]
    return Problem(flat(q), flat(k), flat(v), mask, bias, scale, softcap, batch_shape)


# ---------------------------------------------------------------------------------------------
# Choosing an implementation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Choice:
    """What ``implementation=None`` picks for a call, and why.

    Attributes:
      implementation: the chosen name.
      reason: why it comes first for this call.
      rejected: earlier preferences that cannot run this call, with the reason each gave.
    """

    implementation: str
    reason: str
    rejected: dict[str, str]

    def __str__(self) -> str:
        lines = [f"{self.implementation}: {self.reason}"]
        lines += [f"  not {name}: {why}" for name, why in self.rejected.items()]
        return "\n".join(lines)


def _measured_cudnn_case(problem: Problem) -> bool:
    """Whether ``problem`` is a case where cuDNN was measured faster than flash and every query
    attends a key whatever the data: no bias, and no mask or a causal one with T <= S. jattn returns
    zeros for a query that attends nothing, and cuDNN's answer there (a padding length of 0), its
    windows' speed and its bias restrictions (a bias broadcast over T or S) are unchecked on a GPU,
    so those calls go to the flash kernel."""
    if problem.bias is not None:
        return False
    mask = problem.mask
    if mask is None:
        return True
    is_causal = isinstance(mask, masks_lib.SlidingWindow) and mask.left is None and mask.right == 0
    return is_causal and problem.q_len <= problem.kv_len


def _preferences(problem: Problem) -> list[tuple[str, str]]:
    """Implementations in order of preference for this problem, each with the reason."""
    prefs: list[tuple[str, str]] = []
    if problem.backend in GPU_BACKENDS and _measured_cudnn_case(problem):
        # Measured on an H200 (benchmarks/RESULTS.md): cuDNN ran 1.4-2.5x as fast as the flash
        # kernel without a mask and causal; flash runs the rest (windows, sparse layouts, padding,
        # segments, a bias, softcap, float32, head dims over 128).
        prefs.append(("cudnn", "cuDNN fused attention, the fastest measured on NVIDIA GPUs"))
    if problem.backend in (*GPU_BACKENDS, "tpu"):
        prefs.append(("flash", f"Pallas tiled kernel on {problem.backend}"))
    density = problem.density() if problem.mask is not None else 1.0
    if density <= _SPARSE_DENSITY:
        why = f"the mask leaves {density:.0%} of {_LAYOUT_BLOCK}x{_LAYOUT_BLOCK} tiles non-empty"
        prefs += [
            ("banded", f"{why}; banded computes only the band"),
            ("block_sparse", f"{why}; block_sparse gathers only the listed blocks"),
            ("chunked", f"{why}; chunked skips the empty tiles"),
        ]
    batch = math.prod(problem.batch_shape)
    dense_bytes = 4 * batch * problem.num_heads * problem.q_len * problem.kv_len
    # A batch dim that jax.export leaves symbolic may be any size: chunked's O(T + S) memory then, as
    # for a batch whose scores are over budget.
    if not jax.export.is_symbolic_dim(dense_bytes) and dense_bytes <= _DENSE_BYTES_BUDGET:
        prefs.append(("xla", f"the [B, N, T, S] scores take {dense_bytes / 2**20:.0f} MiB, within budget"))
    prefs.append(("chunked", "O(T + S) memory, exact, runs everywhere"))
    return prefs


def choose(problem: Problem) -> Choice:
    """The implementation ``attention(..., implementation=None)`` uses for ``problem``."""
    if not isinstance(problem, Problem):
        raise TypeError(
            "choose takes a jattn.Problem (jattn.attention.make_problem(q, k, v, ...)), got "
            f"{type(problem).__name__}; for arrays, jattn.explain(q, k, v, ...) says the same"
        )
    rejected: dict[str, str] = {}
    for name, reason in _preferences(problem):
        impl = _REGISTRY.get(name)
        if impl is None or name in rejected:
            continue
        why_not = impl.supports(problem)
        if why_not is None:
            return Choice(name, reason, rejected)
        rejected[name] = why_not
    raise NotImplementedError(f"no implementation supports this call: {rejected}")


def explain(q, k, v, *, mask=None, bias=None, scale=None, softcap=None) -> Choice:
    """Which implementation ``attention`` would pick for these arguments, and why.

    The choice is made as ``attention`` makes it, under ``jit``: the arrays of a data mask (padding,
    segments, a boolean array) are traced there, so their tiles count as PARTIAL whatever they hold.

    >>> print(jattn.explain(q, k, v, mask=jattn.masks.causal()))
    xla: the [B, N, T, S] scores take 8 MiB, within budget
    """
    mask, scale, softcap = _checked_arguments(q, k, v, mask, scale, softcap)
    choices: list[Choice] = []

    def choose_traced(q, k, v, mask, bias):
        choices.append(choose(make_problem(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap)))

    jax.eval_shape(choose_traced, q, k, v, mask, bias)
    return choices[0]


# ---------------------------------------------------------------------------------------------
# The public call
# ---------------------------------------------------------------------------------------------


def _resolve(problem: Problem, implementation: str | None) -> Implementation:
    if implementation is None:
        return _REGISTRY[choose(problem).implementation]
    impl = _REGISTRY[implementation]  # the name was checked by attention()
    why_not = impl.supports(problem)
    if why_not is not None:
        able = [
            n for n, other in _REGISTRY.items() if n != implementation and other.supports(problem) is None
        ]
        raise NotImplementedError(
            f"implementation={implementation!r} cannot run this call: {why_not}. Implementations that "
            f"can: {able}"
        )
    return impl


def _checked_arguments(q, k, v, mask, scale, softcap):
    """What ``attention`` and ``explain`` check before tracing: shapes, the mask as a Mask, and
    ``scale`` and ``softcap`` as floats (static arguments of the jitted call)."""
    _check_shapes(q, k, v)
    if mask is not None:
        mask = masks_lib._as_mask(mask, "mask")
    return mask, _check_positive_float("scale", scale), _check_positive_float("softcap", softcap)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "implementation"))
def _attention_jit(q, k, v, mask, bias, *, scale, softcap, implementation):
    problem = make_problem(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap)
    out = _resolve(problem, implementation).run(problem)  # [B, T, N, Hv]
    return out.reshape(*problem.batch_shape, *out.shape[1:]).astype(q.dtype)


def attention(
    q,
    k,
    v,
    *,
    mask: masks_lib.Mask | Any | None = None,
    bias=None,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str | None = None,
):
    """Softmax attention, ``softmax(q kᵀ · scale + bias) v`` over the keys the mask allows.

    Args:
      q: queries ``[B..., T, N, H]``.
      k: keys ``[B..., S, K, H]`` with N % K == 0 (K == N multi-head, K == 1 multi-query, else
        grouped-query). Cross-attention: k and v from another sequence, S may differ from T.
      v: values ``[B..., S, K, Hv]``.
      mask: a ``jattn.masks`` mask or a boolean array broadcastable to ``[B..., N, T, S]``;
        True = may attend. Rows with nothing to attend return zeros.
      bias: added to the scaled scores, broadcastable to ``[B..., N, T, S]``.
      scale: defaults to ``1 / sqrt(H)``.
      softcap: if given, logits become ``softcap · tanh(logits / softcap)`` (after the bias).
      implementation: a name from ``jattn.implementations()`` or None to choose automatically
        (see ``jattn.explain``).
    Returns:
      ``[B..., T, N, Hv]`` in q's dtype (logits, softmax and accumulation in float32).
    """
    if implementation is not None and implementation not in _REGISTRY:
        raise ValueError(
            f"unknown implementation={implementation!r}; valid: {sorted(_REGISTRY)} or None (auto)"
        )
    mask, scale, softcap = _checked_arguments(q, k, v, mask, scale, softcap)
    return _attention_jit(q, k, v, mask, bias, scale=scale, softcap=softcap, implementation=implementation)


# ---------------------------------------------------------------------------------------------
# The built-in implementations
# ---------------------------------------------------------------------------------------------


def _run_dense(p: Problem):
    return dense_attention(p.q, p.k, p.v, p.mask, p.bias, scale=p.scale, softcap=p.softcap)


def _run_chunked(p: Problem):
    return chunked_attention(p.q, p.k, p.v, p.mask, p.bias, scale=p.scale, softcap=p.softcap)


register_implementation(
    "xla", _run_dense, summary="dense scores [T, S] in jnp; O(T·S) memory; the reference path"
)
register_implementation(
    "chunked",
    _run_chunked,
    summary="blockwise online softmax in pure JAX; O(T + S) memory; skips empty tiles",
)
register_implementation(
    "cudnn",
    run_cudnn,
    supports_cudnn,
    summary="jax.nn.dot_product_attention(implementation='cudnn'); NVIDIA GPUs; the peer to beat",
)
