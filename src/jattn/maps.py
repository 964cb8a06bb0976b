"""What attention attends to: weights for short inputs, per-head statistics at any length.

* ``attention_weights``: the softmax weights ``[B..., N, T, S]`` of exact attention (any mask, bias,
  softcap, grouped-query heads), from the same per-head math as ``implementation="xla"``.
* ``linear_attention_weights``, ``performer_attention_weights``, ``linformer_attention_weights``:
  the implicit weights of the linear-cost variants, materialized for short inputs. Linformer's are
  over its P projected positions by default (a true softmax), or mapped back onto the S keys.
* ``attention_statistics``: per query row, the entropy of the attention distribution, the mean
  attended distance ``Σ_s p_ts |t - s|`` and the mass on the first key (the "attention sink"),
  computed in one streaming pass over key blocks like ``implementation="chunked"`` (online
  rescaling by the running max), so the ``[T, S]`` matrix never exists: any length, O(T + S) memory.
  ``weight_statistics`` computes the same from materialized weights. Over Linformer's projected
  slots only the entropy is defined: its distance and first-token mass are None.
* ``variant_weights`` / ``variant_statistics``: both for a ``jattn.variants`` variant, as the NNX
  modules capture them (``set_capture``, ``run_captured``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn import masks as masks_lib
from jattn._checks import check_bool, check_int
from jattn.attention import Problem, make_problem
from jattn.core._batching import vmap_over_heads
from jattn.core._common import MASK_VALUE, zero_unattended
from jattn.core.chunked import _blocks, _ragged_table, _tile, _visitor, default_block, make_plan, pad_to_plan
from jattn.core.dense import softmax_weights_one_head
from jattn.core.linear import (
    _check_causal_lengths,
    _favor_features,
    _padded,
    check_projections,
    keep_rows,
    performer_features,
    project_sequence,
    resolve_feature_map,
)
from jattn.variants import Variant, resolve_variant

CAPTURE_KINDS = ("weights", "statistics")
"""What ``jattn.nn.MultiHeadAttention(capture=...)`` can sow: names of ``nnx.Intermediate`` values
``attention_weights`` (``[B..., N, T, S]``) and ``attention_statistics`` (``AttentionStatistics``)."""


class AttentionStatistics(NamedTuple):
    """Per query row statistics of the attention distribution ``p_t`` (a pytree).

    Attributes:
      entropy: ``-Σ_s p_ts log p_ts`` in nats, float32 ``[B..., N, T]``.
      distance: mean attended distance ``Σ_s p_ts |t - s|`` in positions, float32 ``[B..., N, T]``;
        None when the weights are not over key positions (Linformer's projected slots).
      first_token: ``p_t0``, the mass on key position 0 (attention sink), float32 ``[B..., N, T]``;
        None when the weights are not over key positions (Linformer's projected slots).
      attends: bool ``[B..., N, T]``, whether row t attends to anything (the others are zero).
    """

    entropy: Any
    distance: Any
    first_token: Any
    attends: Any


def _heads_first(per_row, problem: Problem):
    """vmap_over_heads output ``[B, T, N, X]`` -> ``[B..., N, T, X]``."""
    per_row = jnp.swapaxes(per_row, 1, 2)
    return per_row.reshape(*problem.batch_shape, *per_row.shape[1:])


# ---------------------------------------------------------------------------------------------
# Exact softmax attention: weights
# ---------------------------------------------------------------------------------------------


def _allowed(mask_h, q_len: int, kv_len: int):
    """A per-head canonical mask as bool ``[T, S]`` (None: all allowed)."""
    return None if mask_h is None else mask_h.tile(jnp.arange(q_len), jnp.arange(kv_len))


@functools.partial(jax.jit, static_argnames=("scale", "softcap"))
def _attention_weights_jit(q, k, v, mask, bias, *, scale, softcap):
    problem = make_problem(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap)

    def per_head(q_h, k_h, v_h, ops):  # -> [T, S]
        mask_h, bias_h = ops
        allowed = _allowed(mask_h, problem.q_len, problem.kv_len)
        if allowed is not None:
            q_h, k_h, _ = zero_unattended(allowed, q_h, k_h, k_h)
        return softmax_weights_one_head(
            q_h, k_h, allowed, bias_h, scale=problem.scale, softcap=problem.softcap
        )

    weights = vmap_over_heads(per_head, problem.q, problem.k, problem.v, (problem.mask, problem.bias))
    return _heads_first(weights, problem)  # [B..., N, T, S]


def attention_weights(q, k, v, *, mask=None, bias=None, scale=None, softcap=None):
    """The weights ``softmax(q kᵀ · scale + bias)`` that ``jattn.attention`` applies to ``v``.

    Materializes ``[B..., N, T, S]`` float32, so it is meant for inputs short enough to look at;
    ``attention_statistics`` summarizes longer ones.

    Args:
      q, k, v, mask, bias, scale, softcap: as ``jattn.attention`` (v is checked, not used).
    Returns:
      float32 ``[B..., N, T, S]``: each row sums to one over the keys the mask allows and is zero
      elsewhere; a row that allows no key is all zeros.
    """
    if mask is not None:
        mask = masks_lib._as_mask(mask, "mask")
    problem = make_problem(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap)
    return _attention_weights_jit(q, k, v, mask, bias, scale=problem.scale, softcap=problem.softcap)


# ---------------------------------------------------------------------------------------------
# Exact softmax attention: streaming statistics
# ---------------------------------------------------------------------------------------------


def _statistics_one_head(q, k, mask, bias, *, plan, cfg):
    """One head's statistics by an online pass over the plan's key blocks.

    Per query row it keeps the running max ``m``, ``l = Σ e``, ``c = Σ e·(s - m)``,
    ``d = Σ e·|t - s|`` and ``f = e at s = 0`` with ``e = exp(s - m)``, rescaled by
    ``exp(m_old - m_new)`` when the max grows; then entropy ``= log l - c / l``.

    Args:
      q: ``[T, H]``; k: ``[S, H]``; mask: per-head canonical mask or None; bias: ``[T|1, S|1]`` or None.
    Returns:
      float32 ``[T, 4]``: entropy, distance, first-token mass, attends (1.0 or 0.0).
    """
    qp, kp, _, bp = pad_to_plan(q, k, k, bias, plan=plan)
    q_blocks, k_blocks = _blocks(qp, plan.block_q), _blocks(kp, plan.block_kv)
    kv_ids, counts = _ragged_table(plan.kv_ids)

    def tile_update(apply_mask):
        def update(qi, kj, carry):
            m, l_sum, centered, dist, first = carry  # [bq] each
            s, _, allowed, _, _, _ = _tile(
                q_blocks[qi], k_blocks[kj], k_blocks[kj], bp, mask, qi, kj, plan, cfg, apply_mask
            )  # s [bq, bkv] float32
            m_new = jnp.maximum(m, s.max(-1))  # [bq]
            shifted = s - m_new[:, None]  # [bq, bkv]
            e = jnp.exp(shifted)
            if allowed is not None:
                e = jnp.where(allowed, e, 0.0)
            alpha = jnp.exp(m - m_new)  # [bq]
            q_pos = qi * plan.block_q + jnp.arange(plan.block_q)  # [bq]
            kv_pos = kj * plan.block_kv + jnp.arange(plan.block_kv)  # [bkv]
            gap = jnp.abs(q_pos[:, None] - kv_pos[None, :]).astype(jnp.float32)  # [bq, bkv]
            at_first = jnp.where(kv_pos[None, :] == 0, e, 0.0).sum(-1)
            return (
                m_new,
                alpha * l_sum + e.sum(-1),
                alpha * (centered + (m - m_new) * l_sum)
                + jnp.where(e > 0, e * shifted, 0.0).sum(-1),  # 0·-inf
                alpha * dist + (e * gap).sum(-1),
                alpha * first + at_first,
            )

        return update

    visit = _visitor(tile_update, plan)

    def one_q_block(qi):
        zeros = jnp.zeros((plan.block_q,), jnp.float32)
        init = (jnp.full((plan.block_q,), MASK_VALUE, jnp.float32), zeros, zeros, zeros, zeros)
        _, l_sum, centered, dist, first = jax.lax.fori_loop(
            0, counts[qi], lambda j, c: visit(qi, kv_ids[qi, j], c), init
        )
        attends = l_sum > 0
        safe = jnp.where(attends, l_sum, 1.0)
        entropy = jnp.where(attends, jnp.log(safe) - centered / safe, 0.0)
        return jnp.stack([entropy, dist / safe, first / safe, attends.astype(jnp.float32)], -1)

    stats = jax.lax.map(one_q_block, jnp.arange(plan.num_q_blocks))  # [nq, bq, 4]
    return stats.reshape(-1, 4)[: plan.q_len]


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "block_q", "block_kv"))
def _attention_statistics_jit(q, k, v, mask, bias, *, scale, softcap, block_q, block_kv):
    problem = make_problem(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap)
    layout = problem.layout(block_q, block_kv)
    plan = make_plan(np.array(layout), problem.q_len, problem.kv_len, block_q, block_kv)
    cfg = {"scale": problem.scale, "softcap": problem.softcap}

    def per_head(q_h, k_h, v_h, ops):  # -> [T, 4]
        mask_h, bias_h = ops
        return _statistics_one_head(q_h, k_h, mask_h, bias_h, plan=plan, cfg=cfg)

    stats = _heads_first(
        vmap_over_heads(per_head, problem.q, problem.k, problem.v, (problem.mask, problem.bias)), problem
    )
    return AttentionStatistics(stats[..., 0], stats[..., 1], stats[..., 2], stats[..., 3] > 0)


def attention_statistics(
    q, k, v, *, mask=None, bias=None, scale=None, softcap=None, block_q=None, block_kv=None
) -> AttentionStatistics:
    """Entropy, mean attended distance and first-token mass of every query row, without the
    ``[T, S]`` matrix: a streaming pass over key blocks that skips the tiles the mask leaves empty.

    Args:
      q, k, v, mask, bias, scale, softcap: as ``jattn.attention`` (v is checked, not used).
      block_q, block_kv: tile sizes (default: as ``implementation="chunked"``).
    Returns:
      ``AttentionStatistics`` of float32 ``[B..., N, T]`` arrays (zeros on rows that attend to nothing).
    """
    if mask is not None:
        mask = masks_lib._as_mask(mask, "mask")
    problem = make_problem(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap)
    block_q = default_block(problem.q_len) if block_q is None else check_int("block_q", block_q)
    block_kv = default_block(problem.kv_len) if block_kv is None else check_int("block_kv", block_kv)
    return _attention_statistics_jit(
        q, k, v, mask, bias, scale=problem.scale, softcap=problem.softcap, block_q=block_q, block_kv=block_kv
    )


def weight_statistics(weights, *, over_positions: bool = True) -> AttentionStatistics:
    """The statistics of ``attention_statistics`` from materialized weights (exact or implicit).

    Args:
      weights: ``[..., T, S]``: rows of non-negative weights summing to one, or all zero for rows
        that attend to nothing.
      over_positions: whether query t is at position t and column s is key position s. False for
        weights over slots that are not positions (Linformer's P projected keys): distance and
        first-token mass are then undefined and left None.
    Returns:
      ``AttentionStatistics`` of float32 ``[..., T]`` arrays (distance and first_token None unless
      ``over_positions``).
    """
    p = jnp.asarray(weights, jnp.float32)
    if p.ndim < 2:
        raise ValueError(f"weights must be [..., T, S] (at least 2 dims), got shape {p.shape}")
    positive = p > 0
    entropy = -jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0).sum(-1)
    if not check_bool("over_positions", over_positions):
        return AttentionStatistics(entropy, None, None, positive.any(-1))
    q_len, kv_len = p.shape[-2:]
    gap = jnp.abs(jnp.arange(q_len)[:, None] - jnp.arange(kv_len)[None, :]).astype(jnp.float32)  # [T, S]
    return AttentionStatistics(entropy, (p * gap).sum(-1), p[..., 0], positive.any(-1))


def summarize_heads(stats: AttentionStatistics) -> dict[str, np.ndarray]:
    """Per-head means over the query rows that attend to something.

    Args:
      stats: ``AttentionStatistics`` of ``[..., N, T]`` arrays.
    Returns:
      ``{"entropy", "distance", "first_token"}``, each float64 ``[..., N]``; a statistic that is None
      (Linformer's distance and first-token mass) is left out.
    """
    attends = np.asarray(stats.attends, bool)
    rows = np.maximum(attends.sum(-1), 1)
    names = [name for name in ("entropy", "distance", "first_token") if getattr(stats, name) is not None]
    return {
        name: np.where(attends, np.asarray(getattr(stats, name), np.float64), 0.0).sum(-1) / rows
        for name in names
    }


# ---------------------------------------------------------------------------------------------
# Linear-cost variants: implicit weights on short inputs
# ---------------------------------------------------------------------------------------------


def _normalized_kernel_weights(phi_q, phi_k, *, causal: bool):
    """``A_ts / Σ_s A_ts`` for ``A = φ(q) φ(k)ᵀ`` (lower triangle when causal); rows with a zero
    normalizer are zero.

    Args:
      phi_q: ``[T, F]``. phi_k: ``[S, F]``, zero for keys left out.
    Returns:
      float32 ``[T, S]``.
    """
    a = jnp.einsum("tf,sf->ts", phi_q, phi_k, preferred_element_type=jnp.float32)  # [T, S]
    if causal:
        a = jnp.where(jnp.tril(jnp.ones(a.shape, bool)), a, 0.0)
    den = a.sum(-1, keepdims=True)  # [T, 1]
    return jnp.where(den > 0, a / jnp.where(den > 0, den, 1.0), 0.0)


def _kernel_weights(problem: Problem, phi_q: Callable, phi_k: Callable, causal: bool, fn_name: str):
    """vmap the normalized kernel weights of features ``phi_q(q [T, H])`` and
    ``phi_k(k [S, H], valid [S] or None)`` (zero where not valid), under the problem's padding mask
    if it has one (``jattn.core.linear``'s rule: padded keys left out, padded query rows zero)."""
    padded, problem = _padded(problem, fn_name)
    positions = jnp.arange(problem.kv_len)

    def per_head(q_h, k_h, v_h, kv_len):  # -> [T, S]
        del v_h
        valid = None if padded is None else positions < kv_len
        return _normalized_kernel_weights(phi_q(q_h), phi_k(k_h, valid), causal=causal)

    operands = () if padded is None else padded.kv_lengths
    weights = vmap_over_heads(per_head, problem.q, problem.k, problem.v, operands)  # [B, T, N, S]
    if padded is not None:
        weights = padded.zero(weights, padded.q_valid)
    return _heads_first(weights, problem)


def linear_attention_weights(
    q, k, v, *, feature_map: str | Callable = "elu+1", causal: bool = False, mask=None
):
    """Implicit weights ``φ(q_t)·φ(k_s) / Σ_s φ(q_t)·φ(k_s)`` of ``jattn.linear_attention``.

    ``weights @ v`` (per head) is linear attention's output; materialized ``[T, S]`` per head, so
    for short inputs.

    Args:
      q, k, v, feature_map, causal, mask: as ``jattn.linear_attention`` (v is checked, not used).
    Returns:
      float32 ``[B..., N, T, S]``; rows sum to one (zero rows where the normalizer is zero).
    """
    feature_map = resolve_feature_map(feature_map)
    causal = check_bool("causal", causal)
    problem = make_problem(q, k, v, mask=mask)
    _check_causal_lengths(problem, causal, "linear_attention_weights")

    def phi(x):
        return feature_map(x.astype(jnp.float32))

    def phi_k(x, valid):
        return keep_rows(phi(x), valid)

    return _kernel_weights(problem, phi, phi_k, causal, "linear_attention_weights")


def performer_attention_weights(
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
    """Implicit weights of ``jattn.performer_attention`` (FAVOR+) with the same random features.

    Args:
      q, k, v, key, num_features, causal, orthogonal, scale, mask: as ``jattn.performer_attention``.
    Returns:
      float32 ``[B..., N, T, S]``, rows summing to one; they estimate the softmax weights.
    """
    causal = check_bool("causal", causal)
    problem = make_problem(q, k, v, scale=scale, mask=mask)
    _check_causal_lengths(problem, causal, "performer_attention_weights")
    features = performer_features(key, num_features, problem.head_dim, orthogonal=orthogonal)
    phi = functools.partial(_favor_features, features=features, scale=problem.scale)
    return _kernel_weights(
        problem,
        lambda x: phi(x, per_row=True)[0],
        lambda x, valid: phi(x, valid, per_row=False)[0],
        causal,
        "performer_attention_weights",
    )


LINFORMER_AXES = ("projected", "keys")


def linformer_attention_weights(q, k, v, proj_k, proj_v, *, scale=None, mask=None, over: str = "projected"):
    """Weights of ``jattn.linformer_attention``.

    ``over="projected"``: the softmax over the P projected keys ``proj_kᵀ k``, ``[B..., N, T, P]``
    (rows sum to one). ``over="keys"``: mapped back onto the S original positions through the
    value projection, ``W_ts = Σ_p w_tp proj_v[s, p]``, so that ``out_t = Σ_s W_ts v_s`` exactly;
    signed, and its rows need not sum to one.

    Args:
      q, k, v, proj_k, proj_v, scale, mask: as ``jattn.linformer_attention``.
      over: ``"projected"`` or ``"keys"``.
    Returns:
      float32 ``[B..., N, T, P]`` or ``[B..., N, T, S]``.
    """
    if over not in LINFORMER_AXES:
        raise ValueError(f"over must be one of {LINFORMER_AXES}, got {over!r}")
    padded, problem = _padded(make_problem(q, k, v, scale=scale, mask=mask), "linformer_attention_weights")
    check_projections(proj_k, proj_v, problem.kv_len)
    projected_k = project_sequence(proj_k, problem.k)  # [B, P, K, H]
    weights = attention_weights(problem.q.astype(jnp.float32), projected_k, projected_k, scale=problem.scale)
    if over == "keys":
        used_v = jnp.asarray(proj_v, jnp.float32)[: problem.kv_len]  # [S, P]
        if padded is None:
            weights = jnp.einsum("bntp,sp->bnts", weights, used_v)
        else:  # padded values are left out of the projection: their columns are zero
            weights = jnp.einsum(
                "bntp,bsp->bnts", weights, jnp.where(padded.kv_valid[..., None], used_v, 0.0)
            )
    if padded is not None:
        weights = jnp.where(padded.q_valid[:, None, :, None], weights, 0.0)  # [B, N, T, X]
    return weights.reshape(*problem.batch_shape, *weights.shape[1:])


# ---------------------------------------------------------------------------------------------
# Variants (what the NNX modules capture)
# ---------------------------------------------------------------------------------------------


def variant_mask(variant: Variant | str | None, *, causal: bool, mask=None) -> masks_lib.Mask | None:
    """The mask an exact variant applies: its pattern (causal if asked) and the caller's ``mask``."""
    variant = resolve_variant(variant)
    causal = check_bool("causal", causal)
    if variant is None:
        pattern = masks_lib.causal() if causal else None
    elif not variant.exact:
        raise ValueError(f"variant {variant.name!r} is approximate: it has implicit weights, not a mask")
    else:
        pattern = None if variant.mask is None else variant.mask(causal)
    if mask is None:
        return pattern
    return mask if pattern is None else pattern & mask


def variant_weights(
    variant: Variant | str | None, q, k, v, *, causal: bool, mask=None, params=None, key=None
):
    """The weights a variant applies to ``v``: exact softmax weights, or the implicit ones.

    Args:
      variant: a ``jattn.variants`` variant or its registered name, or None for full softmax attention.
      q: ``[B..., T, N, H]``. k: ``[B..., S, K, H]``. v: ``[B..., S, K, Hv]``: the heads the variant
        sees (after any rotary encoding).
      causal, params, key: as passed to the variant. mask: the caller's mask (exact variants only).
    Returns:
      float32 ``[B..., N, T, S]`` (Linformer: over its P projected positions, ``[B..., N, T, P]``).
    """
    variant = resolve_variant(variant)
    causal = check_bool("causal", causal)
    if variant is None or variant.exact:
        return attention_weights(q, k, v, mask=variant_mask(variant, causal=causal, mask=mask))
    options = variant.options
    if variant.name == "linear":
        return linear_attention_weights(
            q, k, v, feature_map=options.get("feature_map", "elu+1"), causal=causal, mask=mask
        )
    if variant.name == "performer":
        return performer_attention_weights(
            q,
            k,
            v,
            key=key,
            num_features=options.get("num_features", 256),
            orthogonal=options.get("orthogonal", True),
            causal=causal,
            mask=mask,
        )
    if variant.name == "linformer":
        if causal:
            raise NotImplementedError("linformer projects the whole sequence, so it cannot be causal")
        return linformer_attention_weights(q, k, v, params["proj_k"], params["proj_v"], mask=mask)
    raise NotImplementedError(
        f"no implicit weights for the approximate attention variant {variant.name!r}; known: "
        "linear, performer, linformer"
    )


def variant_statistics(
    variant: Variant | str | None, q, k, v, *, causal: bool, mask=None, params=None, key=None
) -> AttentionStatistics:
    """Per-row statistics of a variant's attention: streamed for exact variants (any length),
    from the implicit weights for approximate ones (short inputs). Arguments as ``variant_weights``.

    Linformer's weights are over its P projected slots, not key positions: only its entropy (over
    the slots) is defined, its distance and first_token are None."""
    variant = resolve_variant(variant)
    if variant is None or variant.exact:
        return attention_statistics(q, k, v, mask=variant_mask(variant, causal=causal, mask=mask))
    weights = variant_weights(variant, q, k, v, causal=causal, mask=mask, params=params, key=key)
    return weight_statistics(weights, over_positions=variant.name != "linformer")


def check_capture(capture: Sequence[str]) -> tuple[str, ...]:
    """``capture`` as a tuple of names from ``CAPTURE_KINDS``; a clear error otherwise."""
    if isinstance(capture, str) or not all(isinstance(c, str) for c in capture):
        raise TypeError(f"capture must be a sequence of names from {CAPTURE_KINDS}, got {capture!r}")
    unknown = sorted(set(capture) - set(CAPTURE_KINDS))
    if unknown:
        raise ValueError(f"capture takes names from {CAPTURE_KINDS}, got unknown {unknown}")
    return tuple(capture)


def set_capture(model, capture: Sequence[str]) -> None:
    """Make every ``jattn.nn.MultiHeadAttention`` in ``model`` sow ``capture`` (() to stop)."""
    from jattn.nn.attention import MultiHeadAttention  # jattn.nn imports this module

    capture = check_capture(capture)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MultiHeadAttention):
            module.capture = capture


def run_captured(model, *args, **kwargs) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Call ``model(*args, **kwargs)`` and collect what its attention modules sowed (``set_capture``).

    Returns:
      ``(output, {module path ("blocks.0.attention"): {"attention_weights": ...,
      "attention_statistics": ...}})`` in the model's order; empty when nothing is captured.
    """
    output, intermediates = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
    captured: dict[str, dict[str, Any]] = {}
    for path, variable in nnx.to_flat_state(intermediates):
        *module_path, name = (str(part) for part in path)
        captured.setdefault(".".join(module_path), {})[name] = variable.get_value()[-1]
    return output, captured


__all__ = [
    "AttentionStatistics",
    "CAPTURE_KINDS",
    "attention_statistics",
    "attention_weights",
    "linear_attention_weights",
    "linformer_attention_weights",
    "performer_attention_weights",
    "run_captured",
    "set_capture",
    "summarize_heads",
    "variant_mask",
    "variant_statistics",
    "variant_weights",
    "weight_statistics",
]
