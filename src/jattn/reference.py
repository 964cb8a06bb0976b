"""Float64 NumPy oracle: the definition every implementation is tested against.

Written directly from the formulas, independently of the JAX implementations (no shared code, no
autodiff): forward and hand-derived gradients of masked softmax attention with bias, softcap and
grouped-query heads.

    s0 = scale · q kᵀ + bias                  (per head, [T, S])
    s  = softcap · tanh(s0 / softcap)         (only when softcap is given)
    p  = softmax(s) over the keys the mask allows; a row that allows none is all zeros
    out = p v

Products are taken only over allowed (query, key) pairs, so values at masked positions (even NaN)
never reach an output or a gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _prepare(q, k, v, mask, bias, scale):
    """Float64 head-major copies: q [B, N, T, H], k/v [B, N, S, H] (K heads repeated to N)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    *batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[-3], k.shape[-2]
    group = num_heads // num_kv_heads
    qh = np.moveaxis(q, -2, -3)  # [B..., N, T, H]
    kh = np.repeat(np.moveaxis(k, -2, -3), group, axis=-3)  # [B..., N, S, H]
    vh = np.repeat(np.moveaxis(v, -2, -3), group, axis=-3)  # [B..., N, S, Hv]
    full_shape = (*batch, num_heads, q_len, kv_len)
    allowed = np.ones(full_shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), full_shape)
    bias64 = None if bias is None else np.asarray(bias, np.float64)
    scale = 1.0 / np.sqrt(head_dim) if scale is None else float(scale)
    return qh, kh, vh, allowed, bias64, scale, group


def _masked_sum(weights, values, allowed, weight_axis):
    """Σ over the masked axis of weights·values, skipping disallowed pairs entirely.

    weights [..., T, S]; values [..., S, H] (weight_axis=-1) or [..., T, H] (weight_axis=-2).
    """
    if weight_axis == -1:  # Σ_s w[t, s] values[s] -> [..., T, H]
        terms = weights[..., :, :, None] * values[..., None, :, :]
        return np.where(allowed[..., None], terms, 0.0).sum(-2)
    # Σ_t w[t, s] values[t] -> [..., S, H]
    terms = weights[..., :, :, None] * values[..., :, None, :]
    return np.where(allowed[..., None], terms, 0.0).sum(-3)


def _forward(qh, kh, vh, allowed, bias, scale, softcap):
    dots = _masked_dots(qh, kh, allowed)
    s0 = scale * dots + (0.0 if bias is None else np.where(allowed, bias, 0.0))
    s = s0 if softcap is None else softcap * np.tanh(s0 / softcap)
    s = np.where(allowed, s, -np.inf)
    row_max = s.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(allowed, np.exp(s - row_max), 0.0)
    denom = e.sum(-1, keepdims=True)
    p = np.where(denom > 0, e / np.where(denom > 0, denom, 1.0), 0.0)
    out = _masked_sum(p, vh, allowed, -1)
    return s0, p, out


def _masked_dots(a, b, allowed):
    """a [..., T, H] · b [..., S, H] -> [..., T, S], zero where not allowed."""
    terms = a[..., :, None, :] * b[..., None, :, :]
    return np.where(allowed[..., None], terms, 0.0).sum(-1)


def _unrepeat(x, group):
    """[B..., N, S, H] -> [B..., S, K, H], summing the query heads of each key/value head."""
    *batch, num_heads, length, dim = x.shape
    x = x.reshape(*batch, num_heads // group, group, length, dim).sum(-3)
    return np.moveaxis(x, -3, -2)


def _reduce_to_shape(x, shape):
    """Sum a broadcast gradient back to ``shape``."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    keep = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
    return x.sum(axis=keep, keepdims=True)


def attention_reference(q, k, v, *, mask=None, bias=None, scale=None, softcap=None) -> np.ndarray:
    """Masked softmax attention in float64.

    Args:
      q: ``[B..., T, N, H]``. k: ``[B..., S, K, H]``. v: ``[B..., S, K, Hv]`` (N % K == 0).
      mask: bool, broadcastable to ``[B..., N, T, S]``; True = may attend.
      bias: float, broadcastable to ``[B..., N, T, S]``, added to the scaled scores.
      scale: defaults to ``1 / sqrt(H)``. softcap: logits become ``softcap · tanh(s / softcap)``.
    Returns:
      float64 ``[B..., T, N, Hv]``.
    """
    qh, kh, vh, allowed, bias64, scale, _ = _prepare(q, k, v, mask, bias, scale)
    _, _, out = _forward(qh, kh, vh, allowed, bias64, scale, softcap)
    return np.moveaxis(out, -3, -2)


def attention_vjp_reference(
    q, k, v, d_out, *, mask=None, bias=None, scale=None, softcap=None
) -> dict[str, Any]:
    """Gradients of ``Σ attention_reference(...) · d_out`` with respect to q, k, v and bias.

    Returns:
      ``{"q": [B..., T, N, H], "k": [B..., S, K, H], "v": [B..., S, K, Hv], "bias": like bias}``
      (``"bias"`` is None when no bias is given).
    """
    qh, kh, vh, allowed, bias64, scale, group = _prepare(q, k, v, mask, bias, scale)
    s0, p, _ = _forward(qh, kh, vh, allowed, bias64, scale, softcap)
    do = np.moveaxis(np.asarray(d_out, np.float64), -2, -3)  # [B..., N, T, Hv]
    dp = _masked_dots(do, vh, allowed)  # [B..., N, T, S]
    ds = np.where(allowed, p * (dp - (p * dp).sum(-1, keepdims=True)), 0.0)
    if softcap is not None:
        ds = ds * (1.0 - np.tanh(s0 / softcap) ** 2)
    dq = scale * _masked_sum(ds, kh, allowed, -1)  # [B..., N, T, H]
    dk = scale * _masked_sum(ds, qh, allowed, -2)  # [B..., N, S, H]
    dv = _masked_sum(p, do, allowed, -2)  # [B..., N, S, Hv]
    return {
        "q": np.moveaxis(dq, -3, -2),
        "k": _unrepeat(dk, group),
        "v": _unrepeat(dv, group),
        "bias": None if bias is None else _reduce_to_shape(ds, np.shape(bias)),
    }
