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

A row whose normalizer is zero returns zeros: with the "relu" feature map, a query whose features
miss every key's; with FAVOR+, only where float32 underflows for every key the query sees.

Each takes ``mask=masks.padding(q_lengths, kv_lengths)`` for a padded batch: padded keys are left
out of the sums (Linformer: out of the projections) and padded queries return zeros, so nothing in
the padding reaches the real positions. Other masks have no linear-cost form and are refused.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jattn import masks as masks_lib
from jattn._checks import check_bool, check_int, check_prng_key
from jattn.attention import Problem, _check_array, _check_positive_float, attention, make_problem
from jattn.core._batching import vmap_over_heads

FEATURE_MAPS: dict[str, Callable] = {
    # Katharopoulos et al. 2020: elu(x) + 1, written so that it keeps exp(x) where elu(x) + 1 would
    # round to 0 in float32 (x below about -17), which would leave a row with nothing to attend.
    "elu+1": lambda x: jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0))),
    "relu": jax.nn.relu,
}
CAUSAL_CHUNK = 64  # positions per step of the causal prefix-sum scan (its [c, c] tile is exact work)
STREAM_CHUNK = 1024  # rows per step otherwise: the working set stays in cache at any length


def _check_causal_lengths(problem: Problem, causal: bool, fn_name: str) -> None:
    if causal and problem.q_len != problem.kv_len:
        raise ValueError(
            f"{fn_name}(causal=True) needs as many queries as keys, got q length {problem.q_len} and "
            f"k length {problem.kv_len}"
        )


class _Padded:
    """A problem's padding mask on its canonical ``[B, L, heads, H]`` arrays.

    ``q_valid [B|1, T]`` and ``kv_valid [B|1, S]`` say which positions are real; ``kv_lengths``
    ``[B|1, 1]`` is the per-head operand for ``vmap_over_heads``."""

    def __init__(self, problem: Problem, fn_name: str):
        padding = problem.mask
        if not isinstance(padding, masks_lib.Padding):
            raise TypeError(
                f"{fn_name} takes mask=None or masks.padding(q_lengths, kv_lengths) (a padded batch); "
                f"other masks have no linear-cost form, got {type(padding).__name__}"
            )
        self.kv_lengths = padding.kv_lengths  # [B|1, 1]
        self.q_valid = jnp.arange(problem.q_len) < padding.q_lengths  # [B|1, T]
        self.kv_valid = jnp.arange(problem.kv_len) < padding.kv_lengths  # [B|1, S]

    @staticmethod
    def zero(x, valid):
        """``x [B, L, heads, D]`` with the rows that ``valid [B|1, L]`` leaves out set to zero."""
        return jnp.where(valid[:, :, None, None], x, jnp.zeros((), x.dtype))


def _padded(problem: Problem, fn_name: str) -> tuple[_Padded | None, Problem]:
    """The problem's padding mask (or None) and the problem with the padded rows of q, k and v
    zeroed, so that NaN or large values there reach neither the sums nor their gradients."""
    if problem.mask is None:
        return None, problem
    padded = _Padded(problem, fn_name)
    q = padded.zero(problem.q, padded.q_valid)
    k, v = (padded.zero(x, padded.kv_valid) for x in (problem.k, problem.v))
    return padded, dataclasses.replace(problem, q=q, k=k, v=v, mask=None)


def keep_rows(features, valid):
    """``features [L, F]`` with the rows ``valid [L]`` leaves out set to zero (None: all kept)."""
    return features if valid is None else jnp.where(valid[:, None], features, 0.0)


def _per_head_output(problem: Problem, per_head: Callable, padded: _Padded | None = None):
    """vmap ``per_head(q [T, H], k [S, H], v [S, Hv], kv_len) -> [T, Hv]`` (kv_len a scalar, or
    None without padding); output ``[B..., T, N, Hv]``, zero in padded query rows."""
    if padded is None:
        out = vmap_over_heads(lambda q, k, v, _: per_head(q, k, v, None), problem.q, problem.k, problem.v)
    else:
        out = vmap_over_heads(per_head, problem.q, problem.k, problem.v, padded.kv_lengths)
        out = padded.zero(out, padded.q_valid)
    return out.reshape(*problem.batch_shape, *out.shape[1:]).astype(problem.dtype)


def _divide_rows(num, den):
    """num ``[T, Hv]`` / den ``[T]``, zero where the normalizer is not positive."""
    positive = den > 0
    return jnp.where(positive[:, None], num / jnp.where(positive, den, 1.0)[:, None], 0.0)


@jax.custom_jvp
def _safe_divide(num, den):
    """``_divide_rows`` with a derivative that never squares ``den``.

    A positive normalizer can be tiny (FAVOR+ features of large activations: 1e-29 in float32), so
    autodiff's ``num / den²`` underflows to inf · 0 = NaN while the quotient, an average of the
    values, is of order one. The tangent ``(d_num - out · d_den) / den`` divides once."""
    return _divide_rows(num, den)


@_safe_divide.defjvp
def _safe_divide_jvp(primals, tangents):
    num, den = primals
    d_num, d_den = tangents
    out = _divide_rows(num, den)
    return out, _divide_rows(d_num - out * d_den[:, None], den)


def _split_rows(x, chunk: int):
    """``[L, D]`` -> (``[L // chunk, chunk, D]`` whole chunks, ``[L % chunk, D]`` the rest)."""
    whole = x.shape[0] // chunk * chunk
    return x[:whole].reshape(-1, chunk, x.shape[-1]), x[whole:]


def _scan_rows(step, carry, rows: tuple, chunk: int):
    """``step(carry, rows_chunk) -> (carry, out [c, D] or None)`` over ``chunk`` rows at a time.

    Whole chunks go through a ``lax.scan`` whose body the backward pass recomputes (so the saved
    residuals are the inputs, not each chunk's features); the remaining rows are one shorter step,
    so nothing is padded. Returns the final carry and the outputs ``[L, D]`` in row order (or None).
    """
    whole, rest = zip(*(_split_rows(x, chunk) for x in rows), strict=True)
    outs: list = []
    if whole[0].shape[0]:
        carry, out = jax.lax.scan(jax.checkpoint(step), carry, whole)
        outs.append(None if out is None else out.reshape(-1, out.shape[-1]))
    if rest[0].shape[0]:
        carry, out = step(carry, rest)
        outs.append(out)
    return carry, (None if outs[0] is None else jnp.concatenate(outs))


def _rescale_sums(sums, phi_k, shift):
    """Put the running sums ``(Σ φk vᵀ [F, Hv], Σ φk [F], log-scale m)`` and a chunk's key features
    on one scale.

    ``phi_k`` ``[c, F]`` are the key features divided by ``exp(shift)`` (``shift`` a scalar or one
    per key, ``[c, 1]``); the sums are kept divided by ``exp(m)``, m the largest shift so far (the
    online-softmax trick: a common factor cancels in ``num / den``). Returns the sums and ``phi_k``,
    both divided by ``exp(max(m, shift))``.
    """
    kv, normalizer, log_scale = sums
    new_scale = jnp.maximum(log_scale, jnp.max(shift))  # -inf while no key has been added
    finite_scale = _finite(new_scale)
    decay = jnp.exp(log_scale - finite_scale)
    return (kv * decay, normalizer * decay, new_scale), phi_k * jnp.exp(shift - finite_scale)


def _finite(shift):
    """A log-scale with -inf (no key: every feature is zero) replaced by 0, so differences stay
    finite."""
    return jnp.where(jnp.isfinite(shift), shift, 0.0)


def _add_keys(sums, phi_k, v):
    """The sums with a chunk's keys added: ``phi_k`` ``[c, F]`` on the sums' scale, v ``[c, Hv]``."""
    kv, normalizer, log_scale = sums
    kv = kv + jnp.einsum("sf,sh->fh", phi_k, v, preferred_element_type=jnp.float32)
    return kv, normalizer + phi_k.sum(0), log_scale


def normalized_kernel_attention(q, k, v, *, phi_q, phi_k, causal: bool, kv_len=None):
    """``out_t = Σ_s (φq_t·φk_s) v_s / Σ_s φq_t·φk_s`` over all s, or s <= t when causal.

    Streams over rows, so time and memory are O(T + S) and the working set is a chunk: key
    chunks fold into the sums ``Σ φk vᵀ`` and ``Σ φk``, then query chunks read them; causal runs
    one scan over chunks of ``CAUSAL_CHUNK`` positions (prefix sums plus the chunk's own
    lower-triangular tile), never a ``[T, T]`` array.

    Args:
      q: ``[T, H]``. k: ``[S, H]``. v: ``[S, Hv]``.
      phi_q: ``[c, H] -> [c, F]`` float32 query features.
      phi_k: ``([c, H], valid [c] or None) -> ([c, F], shift)``: float32 key features divided by
        ``exp(shift)``, a scalar or one per key ``[c, 1]``, without gradient (0 for maps that need
        no stabilizing); zero for keys that are not valid, which the shift leaves out (-inf if none
        is valid).
      causal: needs T == S.
      kv_len: keys at positions >= kv_len (a scalar) are left out; None: all S keys. Their rows of
        k and v must be finite (zero them).
    Returns:
      ``[T, Hv]`` float32.
    """
    num_features = jax.eval_shape(phi_q, q[:1]).shape[-1]
    sums = (
        jnp.zeros((num_features, v.shape[-1]), jnp.float32),
        jnp.zeros((num_features,), jnp.float32),
        jnp.array(-jnp.inf, jnp.float32),
    )
    positions = jnp.arange(k.shape[0])[:, None]  # [S, 1]

    def key_features(k_c, positions_c):
        return phi_k(k_c, None if kv_len is None else positions_c[:, 0] < kv_len)

    if not causal:

        def add_keys(state, rows):
            k_c, v_c, positions_c = rows
            state, phi_k_c = _rescale_sums(state, *key_features(k_c, positions_c))
            return _add_keys(state, phi_k_c, v_c), None

        (kv, normalizer, _), _ = _scan_rows(add_keys, sums, (k, v, positions), STREAM_CHUNK)

        def read(_, rows):
            phi = phi_q(rows[0])  # [c, F]
            return None, _safe_divide(phi @ kv, phi @ normalizer)

        return _scan_rows(read, None, (q,), STREAM_CHUNK)[1]

    def causal_step(state, rows):
        q_c, k_c, v_c, positions_c = rows  # [c, H], [c, H], [c, Hv], [c, 1]
        phi = phi_q(q_c)  # [c, F]
        phi_k_c, key_shift = key_features(k_c, positions_c)  # [c, F] / exp(key_shift), scalar or [c, 1]
        kv, normalizer, log_scale = state  # sums over the earlier chunks, divided by exp(log_scale)
        # Each query's own scale, the largest shift among the keys it sees: a larger key later in the
        # chunk must not underflow the features of the keys before it (a row of zeros).
        key_shift = jnp.broadcast_to(key_shift, (k_c.shape[0], 1))[:, 0]  # [c]
        row_scale = _finite(jnp.maximum(log_scale, jax.lax.cummax(key_shift)))  # [c]
        seen = jnp.tril(jnp.ones((q_c.shape[0], k_c.shape[0]), bool))  # [c, c]: keys s <= t
        key_weight = jnp.exp(jnp.where(seen, key_shift[None, :] - row_scale[:, None], -jnp.inf))
        local = (phi @ phi_k_c.T) * key_weight  # [c, c]
        earlier_weight = jnp.exp(log_scale - row_scale)[:, None]  # [c, 1]
        num = earlier_weight * (phi @ kv) + jnp.einsum(
            "ts,sh->th", local, v_c, preferred_element_type=jnp.float32
        )
        den = earlier_weight[:, 0] * (phi @ normalizer) + local.sum(-1)
        later, phi_k_c = _rescale_sums(state, phi_k_c, key_shift[:, None])
        return _add_keys(later, phi_k_c, v_c), _safe_divide(num, den)

    return _scan_rows(causal_step, sums, (q, k, v, positions), CAUSAL_CHUNK)[1]


def resolve_feature_map(feature_map: str | Callable) -> Callable:
    """A feature map given by name (``FEATURE_MAPS``) or as a function -> the function."""
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {sorted(FEATURE_MAPS)} or a function, got {feature_map!r}"
            )
        feature_map = FEATURE_MAPS[feature_map]
    elif not callable(feature_map):
        raise TypeError(
            f"feature_map must be one of {sorted(FEATURE_MAPS)} or a function, got "
            f"{type(feature_map).__name__} {feature_map!r}"
        )
    return feature_map


def linear_attention(q, k, v, *, feature_map: str | Callable = "elu+1", causal: bool = False, mask=None):
    """Linear attention (Katharopoulos et al. 2020): ``φ(q)·φ(k)`` in place of ``exp(q·k)``.

    Args:
      q: ``[B..., T, N, H]``. k: ``[B..., S, K, H]``. v: ``[B..., S, K, Hv]`` (N % K == 0).
      feature_map: ``"elu+1"`` (the paper's), ``"relu"`` or a function of float32 ``[L, H] -> [L, F]``.
      causal: query t sees keys s <= t (needs T == S), by prefix sums in O(T) memory.
      mask: None, or ``masks.padding(q_lengths, kv_lengths)`` for a padded batch.
    Returns:
      ``[B..., T, N, Hv]`` in q's dtype (features and sums in float32).
    """
    return _linear_attention_jit(
        q, k, v, mask, feature_map=resolve_feature_map(feature_map), causal=check_bool("causal", causal)
    )


@functools.partial(jax.jit, static_argnames=("feature_map", "causal"))
def _linear_attention_jit(q, k, v, mask, *, feature_map: Callable, causal: bool):
    padded, problem = _padded(make_problem(q, k, v, mask=mask), "linear_attention")
    _check_causal_lengths(problem, causal, "linear_attention")

    def phi(x):
        return feature_map(x.astype(jnp.float32))

    def phi_k(x, valid):
        return keep_rows(phi(x), valid), 0.0

    def per_head(q_h, k_h, v_h, kv_len):
        return normalized_kernel_attention(
            q_h, k_h, v_h, phi_q=phi, phi_k=phi_k, causal=causal, kv_len=kv_len
        )

    return _per_head_output(problem, per_head, padded)


# ---------------------------------------------------------------------------------------------
# Performer (FAVOR+)
# ---------------------------------------------------------------------------------------------


def _haar_orthogonal_rows(gaussian):
    """A uniformly random orthogonal ``[H, H]`` from a Gaussian one (Mezzadri 2007).

    QR alone is not uniform: LAPACK's Q has a sign convention that pushes row i's i-th coordinate
    to one sign, which biased the FAVOR+ estimate. Flipping Q's columns by the signs of R's
    diagonal removes the convention."""
    q, r = jnp.linalg.qr(gaussian)
    return (q * jnp.sign(jnp.diagonal(r))[None, :]).T


def performer_features(key, num_features: int, head_dim: int, *, orthogonal: bool = True):
    """Random projections ``w`` of FAVOR+: float32 ``[M, H]``, each row ~ N(0, I) in distribution.

    Args:
      key: a JAX PRNG key, or None for the fixed draw of ``jax.random.key(0)``.
      num_features: M, the number of random features.
      head_dim: H.
      orthogonal: rows drawn in blocks of H mutually orthogonal directions (Choromanski et al.
        2021, lower variance), each scaled to the norm of an independent Gaussian vector.
    """
    num_features = check_int("num_features", num_features)
    head_dim = check_int("head_dim", head_dim)
    key = jax.random.key(0) if key is None else check_prng_key(key, none_allowed=True)
    gauss_key, norm_key = jax.random.split(key)
    if not check_bool("orthogonal", orthogonal):
        return jax.random.normal(gauss_key, (num_features, head_dim), jnp.float32)
    num_blocks = -(-num_features // head_dim)
    gaussians = jax.random.normal(gauss_key, (num_blocks, head_dim, head_dim), jnp.float32)
    # One QR per block (lax.map): a batched QR inside a training step deadlocked XLA:CPU (jax 0.10.2)
    # from the step's second call; tests/test_scaling.py runs such a step.
    directions = jax.lax.map(_haar_orthogonal_rows, gaussians)  # [blocks, H, H]: orthonormal rows
    directions = directions.reshape(-1, head_dim)[:num_features]  # [M, H]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=-1)
    return directions * norms[:, None]


def _favor_features(x, valid=None, *, features, scale: float, per_row: bool):
    """FAVOR+ features of ``x`` ``[L, H]`` divided by ``exp(shift)``, and the shift ``[L, 1]`` or
    ``[]`` (a max of the exponents, without gradient). Rows that ``valid [L]`` leaves out get zero
    features and no say in the shift (-inf where no row is valid)."""
    x = x.astype(jnp.float32) * scale**0.5
    exponent = x @ features.T - 0.5 * jnp.sum(x * x, -1, keepdims=True)  # [L, M]
    if valid is not None:
        exponent = jnp.where(valid[:, None], exponent, -jnp.inf)
    shift = jax.lax.stop_gradient(exponent.max(-1, keepdims=True) if per_row else exponent.max())
    return jnp.exp(exponent - _finite(shift)) / features.shape[0] ** 0.5, shift


def positive_random_features(x, features, *, scale: float, stabilizer: str):
    """FAVOR+ features ``exp(w·x' - |x'|²/2 - c) / sqrt(M)`` of ``x' = sqrt(scale)·x``.

    ``c`` (a max, without gradient) keeps the exponent <= 0; it is per row (``"row"``, for queries)
    or one for all rows (``"all"``, for keys), so it cancels in the ratio of attention.

    Args:
      x: ``[L, H]``. features: ``[M, H]``.
    Returns:
      ``[L, M]`` float32.
    """
    if stabilizer not in ("row", "all"):
        raise ValueError(f'stabilizer must be "row" or "all", got {stabilizer!r}')
    return _favor_features(x, features=features, scale=scale, per_row=stabilizer == "row")[0]


def performer_attention(
    q,
    k,
    v,
    *,
    key,
    num_features: int = 256,
    causal: bool = False,
    orthogonal: bool = True,
    scale=None,
    mask=None,
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
      mask: None, or ``masks.padding(q_lengths, kv_lengths)`` for a padded batch.
    Returns:
      ``[B..., T, N, Hv]`` in q's dtype.
    """
    return _performer_attention_jit(
        q,
        k,
        v,
        key,
        mask,
        num_features=check_int("num_features", num_features),
        causal=check_bool("causal", causal),
        orthogonal=check_bool("orthogonal", orthogonal),
        scale=_check_positive_float("scale", scale),
    )


@functools.partial(jax.jit, static_argnames=("num_features", "causal", "orthogonal", "scale"))
def _performer_attention_jit(q, k, v, key, mask, *, num_features: int, causal: bool, orthogonal: bool, scale):
    padded, problem = _padded(make_problem(q, k, v, scale=scale, mask=mask), "performer_attention")
    _check_causal_lengths(problem, causal, "performer_attention")
    features = performer_features(key, num_features, problem.head_dim, orthogonal=orthogonal)
    phi_q = functools.partial(
        positive_random_features, features=features, scale=problem.scale, stabilizer="row"
    )
    phi_k = functools.partial(_favor_features, features=features, scale=problem.scale, per_row=causal)

    def per_head(q_h, k_h, v_h, kv_len):
        return normalized_kernel_attention(
            q_h, k_h, v_h, phi_q=phi_q, phi_k=phi_k, causal=causal, kv_len=kv_len
        )

    return _per_head_output(problem, per_head, padded)


# ---------------------------------------------------------------------------------------------
# Linformer
# ---------------------------------------------------------------------------------------------


def check_projections(proj_k, proj_v, kv_len: int) -> None:
    """Linformer's projections: 2-D ``[max_len >= kv_len, P]`` arrays with the same P > 0."""
    for name, proj in (("proj_k", proj_k), ("proj_v", proj_v)):
        _check_array(name, proj)
        if proj.ndim != 2 or proj.shape[1] == 0:
            raise ValueError(
                f"{name} must be a 2-D array [max_len, projected_len] with projected_len > 0, got "
                f"{name}.shape={tuple(proj.shape)}"
            )
        if kv_len > proj.shape[0]:
            raise ValueError(
                f"{name} must be [max_len >= {kv_len}, P]: the key/value length S={kv_len} exceeds "
                f"{name}'s max_len={proj.shape[0]} ({name}.shape={tuple(proj.shape)}); use projections "
                f"with at least {kv_len} rows"
            )
    if proj_k.shape[1] != proj_v.shape[1]:
        raise ValueError(
            f"proj_k and proj_v must project to the same length, got proj_k.shape={tuple(proj_k.shape)} and "
            f"proj_v.shape={tuple(proj_v.shape)}"
        )


def project_sequence(proj, x):
    """Linformer's projection along the sequence: ``proj [max_len, P]`` (its first S rows) and
    ``x [B, S, K, H]`` -> float32 ``[B, P, K, H]``."""
    used = jnp.asarray(proj, jnp.float32)[: x.shape[1]]  # [S, P]
    return jnp.einsum("sp,bskh->bpkh", used, x.astype(jnp.float32))


def linformer_attention(q, k, v, proj_k, proj_v, *, scale=None, mask=None):
    """Linformer (Wang et al. 2020): softmax attention over keys and values projected along the
    sequence axis to ``projected_len`` positions; O(T·projected_len).

    Args:
      q: ``[B..., T, N, H]``. k: ``[B..., S, K, H]``. v: ``[B..., S, K, Hv]`` (N % K == 0).
      proj_k, proj_v: ``[max_len, P]`` projections (shared by all heads, the paper's headwise
        sharing); the first S rows are used, so S <= max_len.
      scale: defaults to ``1 / sqrt(H)``.
      mask: None, or ``masks.padding(q_lengths, kv_lengths)``: padded keys and values are left out
        of the projections, padded queries return zeros.
    Returns:
      ``[B..., T, N, Hv]`` in q's dtype. The projections, and the attention over the P projected
      positions, are computed in float32 whatever the input dtype (O(T·P) work).
    """
    return _linformer_attention_jit(
        q, k, v, proj_k, proj_v, mask, scale=_check_positive_float("scale", scale)
    )


@functools.partial(jax.jit, static_argnames=("scale",))
def _linformer_attention_jit(q, k, v, proj_k, proj_v, mask, *, scale):
    padded, problem = _padded(make_problem(q, k, v, scale=scale, mask=mask), "linformer_attention")
    check_projections(proj_k, proj_v, problem.kv_len)
    q32 = problem.q.astype(jnp.float32)
    keys, values = project_sequence(proj_k, problem.k), project_sequence(proj_v, problem.v)  # [B, P, K, H]
    out = attention(q32, keys, values, scale=problem.scale)
    if padded is not None:
        out = padded.zero(out, padded.q_valid)
    return out.reshape(*problem.batch_shape, *out.shape[1:]).astype(problem.dtype)
