"""Float64 NumPy oracle: the definition every implementation is tested against.

Written directly from the formulas, independently of the JAX implementations (no shared code, no
autodiff): forward and hand-derived gradients of masked softmax attention with bias, softcap and
grouped-query heads.

    s0 = scale · q kᵀ + bias                  (per head, [T, S])
    s  = softcap · tanh(s0 / softcap)         (only when softcap is given)
    p  = softmax(s) over the keys the mask allows and s0 leaves in (s0 > MASKED_LOGIT: a bias of -inf
         or float32's min leaves a key out, with or without softcap); a row with no key left is all zeros
    out = p v

Products are taken only over allowed (query, key) pairs, so values at masked positions (even NaN)
never reach an output or a gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)
"""A logit at or below this (before the softcap) leaves its key out, as the mask does: an additive
mask of float32's most negative number (or -inf) then means the same in every dtype and
implementation, with or without softcap."""


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
    s = np.where(allowed & ~(s0 <= MASKED_LOGIT), s, -np.inf)  # NaN stays in
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


def attention_weights_reference(q, k, *, mask=None, bias=None, scale=None, softcap=None) -> np.ndarray:
    """The softmax weights ``p`` of ``attention_reference`` in float64: ``[B..., N, T, S]``.

    Zero where the mask disallows and on rows that allow nothing; arguments as ``attention_reference``.
    """
    qh, kh, vh, allowed, bias64, scale, _ = _prepare(q, k, k, mask, bias, scale)
    _, p, _ = _forward(qh, kh, vh, allowed, bias64, scale, softcap)
    return p


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


# ---------------------------------------------------------------------------------------------
# Approximate linear-cost variants (jattn.core.linear), in their quadratic form
# ---------------------------------------------------------------------------------------------
#
#     A = φ(q) φ(k)ᵀ   (lower-triangular part only when causal)      per head, [T, S]
#     out = A v / A 1  (a row whose normalizer A 1 is zero is all zeros)
#
# Gradients, with G = d_out and den = A 1:
#     dA = (G vᵀ - (G·out) 1ᵀ) / den,   dv = Aᵀ (G / den),   dφ(q) = dA φ(k),   dφ(k) = dAᵀ φ(q)
# then through the feature map φ.

_FEATURE_MAPS_REFERENCE = {  # name -> (φ(x), φ'(x)), elementwise
    "elu+1": (
        lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0))),
        lambda x: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0))),
    ),
    "relu": (lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(np.float64)),
}


def _kernel_attention(phi_q, phi_k, vh, causal):
    """phi_q [..., T, F], phi_k [..., S, F], vh [..., S, Hv] -> (A [..., T, S], den [..., T], out)."""
    a = phi_q @ np.swapaxes(phi_k, -1, -2)
    if causal:
        a = np.tril(a)
    den = a.sum(-1)
    safe = np.where(den > 0, den, 1.0)
    out = np.where((den > 0)[..., None], (a @ vh) / safe[..., None], 0.0)
    return a, den, out


def _kernel_attention_vjp(phi_q, phi_k, vh, a, den, out, do, causal):
    """(dφ(q), dφ(k), dv) of ``Σ out · do`` for the quadratic form above."""
    safe = np.where(den > 0, den, 1.0)[..., None]  # [..., T, 1]
    do = np.where(den[..., None] > 0, do, 0.0)
    d_num = do / safe  # [..., T, Hv]
    d_den = -(do * out).sum(-1, keepdims=True) / safe  # [..., T, 1]
    da = d_num @ np.swapaxes(vh, -1, -2) + d_den  # [..., T, S]
    if causal:
        da = np.tril(da)
    return da @ phi_k, np.swapaxes(da, -1, -2) @ phi_q, np.swapaxes(a, -1, -2) @ d_num


def linear_attention_reference(q, k, v, *, feature_map: str = "elu+1", causal: bool = False) -> np.ndarray:
    """Linear attention (Katharopoulos et al. 2020) in float64: ``[B..., T, N, Hv]``.

    Args: as ``jattn.linear_attention`` (``feature_map`` by name only).
    """
    phi, _ = _FEATURE_MAPS_REFERENCE[feature_map]
    qh, kh, vh, *_ = _prepare(q, k, v, None, None, None)
    _, _, out = _kernel_attention(phi(qh), phi(kh), vh, causal)
    return np.moveaxis(out, -3, -2)


def linear_attention_vjp_reference(
    q, k, v, d_out, *, feature_map: str = "elu+1", causal: bool = False
) -> dict[str, np.ndarray]:
    """Gradients of ``Σ linear_attention_reference(...) · d_out``: ``{"q", "k", "v"}``."""
    phi, d_phi = _FEATURE_MAPS_REFERENCE[feature_map]
    qh, kh, vh, _, _, _, group = _prepare(q, k, v, None, None, None)
    phi_q, phi_k = phi(qh), phi(kh)
    a, den, out = _kernel_attention(phi_q, phi_k, vh, causal)
    do = np.moveaxis(np.asarray(d_out, np.float64), -2, -3)  # [B..., N, T, Hv]
    d_phi_q, d_phi_k, dv = _kernel_attention_vjp(phi_q, phi_k, vh, a, den, out, do, causal)
    return {
        "q": np.moveaxis(d_phi_q * d_phi(qh), -3, -2),
        "k": _unrepeat(d_phi_k * d_phi(kh), group),
        "v": _unrepeat(dv, group),
    }


def _favor_features(x, features, scale):
    """FAVOR+ ``φ(x) = exp(x'·w - |x'|²/2) / sqrt(M)`` with ``x' = sqrt(scale)·x``: ``[..., L, M]``."""
    x = np.sqrt(scale) * x
    return np.exp(x @ features.T - 0.5 * (x * x).sum(-1, keepdims=True)) / np.sqrt(features.shape[0])


def _favor_features_vjp(x, features, scale, phi, d_phi):
    """dx from dφ: ``∂φ_m/∂x' = φ_m (w_m - x')`` and ``x' = sqrt(scale)·x``."""
    root = np.sqrt(scale)
    weighted = d_phi * phi  # [..., L, M]
    return root * (weighted @ features - weighted.sum(-1, keepdims=True) * (root * x))


def performer_attention_reference(q, k, v, features, *, causal: bool = False, scale=None) -> np.ndarray:
    """Performer attention (FAVOR+, Choromanski et al. 2021) in float64 with given features.

    Args:
      q, k, v: as ``jattn.performer_attention``. features: ``[M, H]``, e.g. from
        ``jattn.core.linear.performer_features`` with the same key.
      scale: defaults to ``1 / sqrt(H)``.
    Returns:
      ``[B..., T, N, Hv]``.
    """
    qh, kh, vh, _, _, scale, _ = _prepare(q, k, v, None, None, scale)
    w = np.asarray(features, np.float64)
    _, _, out = _kernel_attention(_favor_features(qh, w, scale), _favor_features(kh, w, scale), vh, causal)
    return np.moveaxis(out, -3, -2)


def performer_attention_vjp_reference(
    q, k, v, d_out, features, *, causal: bool = False, scale=None
) -> dict[str, np.ndarray]:
    """Gradients of ``Σ performer_attention_reference(...) · d_out``: ``{"q", "k", "v"}``."""
    qh, kh, vh, _, _, scale, group = _prepare(q, k, v, None, None, scale)
    w = np.asarray(features, np.float64)
    phi_q, phi_k = _favor_features(qh, w, scale), _favor_features(kh, w, scale)
    a, den, out = _kernel_attention(phi_q, phi_k, vh, causal)
    do = np.moveaxis(np.asarray(d_out, np.float64), -2, -3)  # [B..., N, T, Hv]
    d_phi_q, d_phi_k, dv = _kernel_attention_vjp(phi_q, phi_k, vh, a, den, out, do, causal)
    return {
        "q": np.moveaxis(_favor_features_vjp(qh, w, scale, phi_q, d_phi_q), -3, -2),
        "k": _unrepeat(_favor_features_vjp(kh, w, scale, phi_k, d_phi_k), group),
        "v": _unrepeat(dv, group),
    }


def _linformer_project(proj, x):
    """``[max_len, P]`` applied to the sequence axis of ``x [B..., S, K, H]`` -> ``[B..., P, K, H]``."""
    proj = np.asarray(proj, np.float64)[: x.shape[-3]]
    return np.einsum("sp,...skh->...pkh", proj, np.asarray(x, np.float64))


def linformer_attention_reference(q, k, v, proj_k, proj_v, *, scale=None) -> np.ndarray:
    """Linformer (Wang et al. 2020) in float64: softmax attention over ``proj_kᵀ k``, ``proj_vᵀ v``."""
    return attention_reference(q, _linformer_project(proj_k, k), _linformer_project(proj_v, v), scale=scale)


def linformer_attention_vjp_reference(q, k, v, d_out, proj_k, proj_v, *, scale=None) -> dict[str, np.ndarray]:
    """Gradients of ``Σ linformer_attention_reference(...) · d_out``:
    ``{"q", "k", "v", "proj_k", "proj_v"}`` (projection rows past S get zero)."""
    grads = attention_vjp_reference(
        q, _linformer_project(proj_k, k), _linformer_project(proj_v, v), d_out, scale=scale
    )
    kv_len = np.shape(k)[-3]
    result = {"q": grads["q"]}
    for name, x, proj in (("k", k, proj_k), ("v", v, proj_v)):
        used = np.asarray(proj, np.float64)[:kv_len]  # [S, P]
        result[name] = np.einsum("sp,...pkh->...skh", used, grads[name])
        d_proj = np.zeros(np.shape(proj))
        flat = lambda a: np.asarray(a, np.float64).reshape(-1, *np.shape(a)[-3:])  # noqa: E731  [B, L, K, H]
        d_proj[:kv_len] = np.einsum("bskh,bpkh->sp", flat(x), flat(grads[name]))
        result[f"proj_{name}"] = d_proj
    return result
