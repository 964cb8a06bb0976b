"""Approximate attention in linear cost: kernel feature maps and low-rank projections.

These compute a *different* function from softmax attention, so they are their own functions with
the public layout q ``[B..., T, N, H]``, k ``[B..., S, K, H]``, v ``[B..., S, K, Hv]`` (grouped-query
heads shared without copies, as in ``jattn.attention``):

* ``linear_attention`` (Katharopoulos et al. 2020, "Transformers are RNNs"): softmax's
  ``exp(q·k)`` replaced by ``φ(q)·φ(k)``, so ``out_t = φ(q_t) Σ_s φ(k_s) v_sᵀ / φ(q_t) Σ_s φ(k_s)``:
  two matrix products, O(T + S) time and memory. Causal by prefix sums, computed a chunk at a time
  by ``lax.scan`` (O(T) memory, never a [T, T] array).
* ``performer_attention`` (Choromanski et al. 2021, FAVOR+): the same with positive random features
  ``φ(x) = exp(w·x - |x|²/2) / sqrt(M)``, an unbiased estimate of the softmax kernel, so its output
  tends to exact softmax attention as the number of features M grows.
* ``linformer_attention`` (Wang et al. 2020): keys and values projected along the sequence axis to
  a fixed length k, then exact softmax attention over the k projected positions: O(T·k).

A row whose normalizer is zero (possible only with the "relu" feature map) returns zeros.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jattn.attention import Problem, attention, make_problem
from jattn.core._batching import vmap_over_heads
from jattn.masks import _check_positive_int

FEATURE_MAPS: dict[str, Callable] = {
    "elu+1": lambda x: jax.nn.elu(x) + 1.0,  # Katharopoulos et al. 2020
    "relu": jax.nn.relu,
}
DEFAULT_CHUNK = 64  # positions per step of the causal prefix-sum scan


def _check_causal_lengths(problem: Problem, causal: bool, fn_name: str) -> None:
    if causal and problem.q_len != problem.kv_len:
        raise ValueError(
            f"{fn_name}(causal=True) needs as many queries as keys, got q length {problem.q_len} and "
            f"k length {problem.kv_len}"
        )


def _per_head_output(problem: Problem, per_head: Callable):
    """vmap ``per_head(q [T, H], k [S, H], v [S, Hv]) -> [T, Hv]``; output ``[B..., T, N, Hv]``."""
    out = vmap_over_heads(lambda q, k, v, _: per_head(q, k, v), problem.q, problem.k, problem.v)
    return out.reshape(*problem.batch_shape, *out.shape[1:]).astype(problem.dtype)


def _safe_divide(num, den):
    """num ``[T, Hv]`` / den ``[T]``, zero where the normalizer is zero."""
    positive = den > 0
    return jnp.where(positive[:, None], num / jnp.where(positive, den, 1.0)[:, None], 0.0)


def normalized_kernel_attention(phi_q, phi_k, v, *, causal: bool, chunk: int = DEFAULT_CHUNK):
    """``out_t = Σ_s (φq_t·φk_s) v_s / Σ_s φq_t·φk_s`` over all s, or s <= t when causal.

    Args:
      phi_q: ``[T, F]`` float32 query features. phi_k: ``[S, F]`` float32 key features.
      v: ``[S, Hv]``.
      causal: prefix sums by a scan over chunks of ``chunk`` positions (needs T == S).
    Returns:
      ``[T, Hv]`` float32.
    """
    if not causal:
        kv = jnp.einsum("sf,sh->fh", phi_k, v, preferred_element_type=jnp.float32)  # [F, Hv]
        num = jnp.einsum("tf,fh->th", phi_q, kv, preferred_element_type=jnp.float32)  # [T, Hv]
        return _safe_divide(num, phi_q @ phi_k.sum(0))
    length, num_features, value_dim = phi_q.shape[0], phi_q.shape[1], v.shape[-1]
    chunk = min(chunk, length)
    padded = -(-length // chunk) * chunk
    pad = lambda x: jnp.pad(x, [(0, padded - length), (0, 0)]).reshape(-1, chunk, x.shape[-1])  # noqa: E731
    causal_tile = jnp.tril(jnp.ones((chunk, chunk), bool))  # [c, c]

    def step(carry, xs):
        state, normalizer = carry  # [F, Hv], [F]: Σ φk vᵀ and Σ φk over earlier chunks
        pq, pk, vc = xs  # [c, F], [c, F], [c, Hv]
        local = jnp.where(causal_tile, pq @ pk.T, 0.0)  # [c, c]
        num = pq @ state + jnp.einsum("ts,sh->th", local, vc, preferred_element_type=jnp.float32)
        den = pq @ normalizer + local.sum(-1)
        state = state + jnp.einsum("sf,sh->fh", pk, vc, preferred_element_type=jnp.float32)
        return (state, normalizer + pk.sum(0)), _safe_divide(num, den)

    init = (jnp.zeros((num_features, value_dim), jnp.float32), jnp.zeros((num_features,), jnp.float32))
    _, out = jax.lax.scan(step, init, (pad(phi_q), pad(phi_k), pad(v)))  # [n_chunks, c, Hv]
    return out.reshape(padded, value_dim)[:length]


def resolve_feature_map(feature_map: str | Callable) -> Callable:
    """A feature map given by name (``FEATURE_MAPS``) or as a function -> the function."""
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {sorted(FEATURE_MAPS)} or a function, got {feature_map!r}"
            )
        feature_map = FEATURE_MAPS[feature_map]
    elif not callable(feature_map):
        raise TypeError(f"feature_map must be a name or a function, got {type(feature_map).__name__}")
    return feature_map


@functools.partial(jax.jit, static_argnames=("feature_map", "causal"))
def linear_attention(q, k, v, *, feature_map: str | Callable = "elu+1", causal: bool = False):
    """Linear attention (Katharopoulos et al. 2020): ``φ(q)·φ(k)`` in place of ``exp(q·k)``.

    Args:
      q: ``[B..., T, N, H]``. k: ``[B..., S, K, H]``. v: ``[B..., S, K, Hv]`` (N % K == 0).
      feature_map: ``"elu+1"`` (the paper's), ``"relu"`` or a function of float32 ``[L, H] -> [L, F]``.
      causal: query t sees keys s <= t (needs T == S), by prefix sums in O(T) memory.
    Returns:
      ``[B..., T, N, Hv]`` in q's dtype (features and sums in float32).
    """
    feature_map = resolve_feature_map(feature_map)
    problem = make_problem(q, k, v)
    _check_causal_lengths(problem, causal, "linear_attention")

    def per_head(q_h, k_h, v_h):
        phi = lambda x: feature_map(x.astype(jnp.float32))  # noqa: E731
        return normalized_kernel_attention(phi(q_h), phi(k_h), v_h, causal=causal)

    return _per_head_output(problem, per_head)


# ---------------------------------------------------------------------------------------------
# Performer (FAVOR+)
# ---------------------------------------------------------------------------------------------


def performer_features(key, num_features: int, head_dim: int, *, orthogonal: bool = True):
    """Random projections ``w`` of FAVOR+: float32 ``[M, H]``, each row ~ N(0, I) in distribution.

    Args:
      key: a JAX PRNG key, or None for the fixed draw of ``jax.random.key(0)``.
      num_features: M, the number of random features.
      head_dim: H.
      orthogonal: rows drawn in blocks of H mutually orthogonal directions (Choromanski et al.
        2021, lower variance), each scaled to the norm of an independent Gaussian vector.
    """
    num_features = _check_positive_int("num_features", num_features)
    head_dim = _check_positive_int("head_dim", head_dim)
    key = jax.random.key(0) if key is None else key
    gauss_key, norm_key = jax.random.split(key)
    if not orthogonal:
        return jax.random.normal(gauss_key, (num_features, head_dim), jnp.float32)
    num_blocks = -(-num_features // head_dim)
    gaussians = jax.random.normal(gauss_key, (num_blocks, head_dim, head_dim), jnp.float32)
    directions = jnp.linalg.qr(gaussians)[0].transpose(0, 2, 1)  # [blocks, H, H]: orthonormal rows
    directions = directions.reshape(-1, head_dim)[:num_features]  # [M, H]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=-1)
    return directions * norms[:, None]


def positive_random_features(x, features, *, scale: float, stabilizer: str):
    """FAVOR+ features ``exp(w·x' - |x'|²/2 - c) / sqrt(M)`` of ``x' = sqrt(scale)·x``.

    ``c`` (a max, without gradient) keeps the exponent <= 0; it is per row (``"row"``, for queries)
    or one for all rows (``"all"``, for keys), so it cancels in the ratio of attention.

    Args:
      x: ``[L, H]``. features: ``[M, H]``.
    Returns:
      ``[L, M]`` float32.
    """
    x = x.astype(jnp.float32) * scale**0.5
    exponent = x @ features.T - 0.5 * jnp.sum(x * x, -1, keepdims=True)  # [L, M]
    shift = exponent.max(-1, keepdims=True) if stabilizer == "row" else exponent.max()
    return jnp.exp(exponent - jax.lax.stop_gradient(shift)) / features.shape[0] ** 0.5


@functools.partial(jax.jit, static_argnames=("num_features", "causal", "orthogonal", "scale"))
def performer_attention(
    q, k, v, *, key, num_features: int = 256, causal: bool = False, orthogonal: bool = True, scale=None
):
    """Performer attention, FAVOR+ (Choromanski et al. 2021): softmax attention estimated with
    ``num_features`` positive random features; O((T + S)·M) time and memory.

    Args:
      q: ``[B..., T, N, H]``. k: ``[B..., S, K, H]``. v: ``[B..., S, K, Hv]`` (N % K == 0).
      key: PRNG key for the features (``performer_features(key, num_features, H)``), shared by all
        heads; None for a fixed draw.
      num_features: M.
      causal: query t sees keys s <= t (needs T == S), by prefix sums in O(T) memory.
      orthogonal: orthogonal random features (lower variance).
      scale: of the softmax kernel ``exp(scale · q·k)``; defaults to ``1 / sqrt(H)``.
    Returns:
      ``[B..., T, N, Hv]`` in q's dtype.
    """
    problem = make_problem(q, k, v, scale=scale)
    _check_causal_lengths(problem, causal, "performer_attention")
    features = performer_features(key, num_features, problem.head_dim, orthogonal=orthogonal)
    phi = functools.partial(positive_random_features, features=features, scale=problem.scale)

    def per_head(q_h, k_h, v_h):
        return normalized_kernel_attention(
            phi(q_h, stabilizer="row"), phi(k_h, stabilizer="all"), v_h, causal=causal
        )

    return _per_head_output(problem, per_head)


# ---------------------------------------------------------------------------------------------
# Linformer
# ---------------------------------------------------------------------------------------------


def _check_projection(name: str, proj, kv_len: int):
    if not hasattr(proj, "shape") or len(proj.shape) != 2:
        raise ValueError(
            f"{name} must be a 2-D array [max_len, projected_len], got {getattr(proj, 'shape', proj)!r}"
        )
    if kv_len > proj.shape[0]:
        raise ValueError(
            f"linformer_attention: the key/value length S={kv_len} exceeds {name}'s max_len={proj.shape[0]} "
            f"({name}.shape={tuple(proj.shape)}); use projections with at least {kv_len} rows"
        )


@functools.partial(jax.jit, static_argnames=("scale",))
def linformer_attention(q, k, v, proj_k, proj_v, *, scale=None):
    """Linformer (Wang et al. 2020): softmax attention over keys and values projected along the
    sequence axis to ``projected_len`` positions; O(T·projected_len).

    Args:
      q: ``[B..., T, N, H]``. k: ``[B..., S, K, H]``. v: ``[B..., S, K, Hv]`` (N % K == 0).
      proj_k, proj_v: ``[max_len, P]`` projections (shared by all heads, the paper's headwise
        sharing); the first S rows are used, so S <= max_len.
      scale: defaults to ``1 / sqrt(H)``.
    Returns:
      ``[B..., T, N, Hv]`` in q's dtype.
    """
    problem = make_problem(q, k, v, scale=scale)
    for name, proj in (("proj_k", proj_k), ("proj_v", proj_v)):
        _check_projection(name, proj, problem.kv_len)
    if proj_k.shape[1] != proj_v.shape[1]:
        raise ValueError(
            f"proj_k and proj_v must project to the same length, got proj_k.shape={tuple(proj_k.shape)} and "
            f"proj_v.shape={tuple(proj_v.shape)}"
        )

    def project(proj, x):  # [S, P], [B, S, K, H] -> [B, P, K, H]
        proj = proj[: problem.kv_len].astype(x.dtype)
        return jnp.einsum("sp,bskh->bpkh", proj, x, preferred_element_type=jnp.float32).astype(x.dtype)

    out = attention(problem.q, project(proj_k, problem.k), project(proj_v, problem.v), scale=problem.scale)
    return out.reshape(*problem.batch_shape, *out.shape[1:])
