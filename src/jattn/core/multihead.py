"""Multi-head attention as a pure function of a parameter pytree (Vaswani et al. 2017, §3.2.2).

``multi_head_attention`` projects the inputs to queries, keys and values (W_Q, W_K, W_V), runs any
attention on them (``jattn.attention`` with a mask and implementation, or any function with the
public layout such as a ``jattn.variants`` variant), and projects the heads back (W_O).

The parameter pytree uses the names and layouts of ``flax.nnx.MultiHeadAttention`` so weights copy
across unchanged::

    {"query": {"kernel": [D, N, H],  "bias": [N, H]},
     "key":   {"kernel": [Dkv, K, H], "bias": [K, H]},
     "value": {"kernel": [Dkv, K, Hv], "bias": [K, Hv]},
     "out":   {"kernel": [N, Hv, Dout], "bias": [Dout]}}

``bias`` entries are absent when the layer was created with ``use_bias=False``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jattn._checks import check_bool, check_int, check_prng_key
from jattn.attention import _FLOAT_DTYPES, attention

Params = dict[str, dict[str, Any]]
AttentionFn = Callable[[Any, Any, Any], Any]
"""``fn(q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv]) -> [B, T, N, Hv]``."""


def init_multi_head_attention(
    key: jax.Array,
    in_features: int,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    value_head_dim: int | None = None,
    in_kv_features: int | None = None,
    out_features: int | None = None,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
) -> Params:
    """Parameters for ``multi_head_attention``: LeCun-normal kernels, zero biases.

    Args:
      key: one PRNG key (``jax.random.key`` or a legacy ``jax.random.PRNGKey``).
      in_features: D, the width of ``x_q``.
      num_heads: N query heads.
      num_kv_heads: K key/value heads (N % K == 0); defaults to N.
      head_dim: H; defaults to D // N (D must then be a multiple of N).
      value_head_dim: Hv; defaults to H.
      in_kv_features: Dkv, the width of ``x_kv``; defaults to D.
      out_features: Dout; defaults to D.
      use_bias: add a bias after every projection.
      dtype: parameter dtype, a floating one.
    Returns:
      The parameter pytree described in the module docstring.
    """
    key = check_prng_key(key)
    dtype = _check_float_dtype(dtype)
    use_bias = check_bool("use_bias", use_bias)
    in_features = check_int("in_features", in_features)
    num_heads = check_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, "
            f"num_kv_heads={num_kv_heads}"
        )
    if head_dim is None:
        if in_features % num_heads:
            raise ValueError(
                f"in_features must be a multiple of num_heads when head_dim is not given, got "
                f"in_features={in_features}, num_heads={num_heads}"
            )
        head_dim = in_features // num_heads
    head_dim = check_int("head_dim", head_dim)
    value_head_dim = check_int("value_head_dim", head_dim if value_head_dim is None else value_head_dim)
    in_kv_features = in_features if in_kv_features is None else check_int("in_kv_features", in_kv_features)
    out_features = in_features if out_features is None else check_int("out_features", out_features)

    shapes = {
        "query": ((in_features, num_heads, head_dim), in_features),
        "key": ((in_kv_features, num_kv_heads, head_dim), in_kv_features),
        "value": ((in_kv_features, num_kv_heads, value_head_dim), in_kv_features),
        "out": ((num_heads, value_head_dim, out_features), num_heads * value_head_dim),
    }
    keys = jax.random.split(key, len(shapes))
    params: Params = {}
    for k, (name, (shape, fan_in)) in zip(keys, shapes.items(), strict=True):
        kernel = jax.random.truncated_normal(k, -2.0, 2.0, shape, dtype)
        # truncated_normal on [-2, 2] has std 0.8796; rescale to LeCun normal, std 1/sqrt(fan_in).
        layer = {"kernel": kernel * (1.0 / math.sqrt(fan_in) / 0.87962566103423978)}
        if use_bias:
            layer["bias"] = jnp.zeros(shape[1:] if name != "out" else shape[-1:], dtype)
        params[name] = layer
    return params


def _check_float_dtype(dtype: Any) -> Any:
    """``dtype`` if it names a floating dtype; a TypeError naming ``dtype`` otherwise."""
    try:
        floating = dtype is not None and any(jnp.dtype(dtype) == d for d in _FLOAT_DTYPES)
    except TypeError:  # not a dtype at all
        floating = False
    if not floating:
        raise TypeError(
            f"dtype must be a floating dtype (float16, bfloat16, float32, float64), got {dtype!r}"
        )
    return dtype


_PARAM_LAYOUTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("query", "kernel"): ("D", "N", "H"),
    ("query", "bias"): ("N", "H"),
    ("key", "kernel"): ("Dkv", "K", "H"),
    ("key", "bias"): ("K", "H"),
    ("value", "kernel"): ("Dkv", "K", "Hv"),
    ("value", "bias"): ("K", "Hv"),
    ("out", "kernel"): ("N", "Hv", "Dout"),
    ("out", "bias"): ("Dout",),
}
"""The dims of every parameter (the module docstring's pytree), by (layer, leaf)."""


def _layout(name: str, leaf: str) -> str:
    return f"[{', '.join(_PARAM_LAYOUTS[name, leaf])}]"


def _param_dims(params: Params, x_q, x_kv, num_heads: int, num_kv_heads: int) -> dict[str, int]:
    """The sizes ``_PARAM_LAYOUTS`` names: D and Dkv are the inputs' widths, N and K the head
    counts; H, Hv and Dout are free, so they are read from the query and out kernels."""
    head_dim = jnp.shape(params["query"]["kernel"])[-1]
    _, value_head_dim, out_features = jnp.shape(params["out"]["kernel"])
    return {
        "D": x_q.shape[-1],
        "Dkv": x_kv.shape[-1],
        "N": num_heads,
        "K": num_kv_heads,
        "H": head_dim,
        "Hv": value_head_dim,
        "Dout": out_features,
    }


def _check_params(params: Params, x_q, x_kv, num_heads: int, num_kv_heads: int) -> None:
    for name in ("query", "key", "value", "out"):
        if name not in params or "kernel" not in params[name]:
            raise ValueError(
                f"params must hold {{'query', 'key', 'value', 'out'}} each with a 'kernel' (see "
                f"init_multi_head_attention), got keys {sorted(params)}"
            )
        shape = tuple(jnp.shape(params[name]["kernel"]))
        if len(shape) != 3:
            raise ValueError(
                f"params[{name!r}]['kernel'] must be 3-D {_layout(name, 'kernel')}, got shape {shape}"
            )
    dims = _param_dims(params, x_q, x_kv, num_heads, num_kv_heads)
    for (name, leaf), layout in _PARAM_LAYOUTS.items():
        if leaf not in params[name]:
            continue
        shape = tuple(jnp.shape(params[name][leaf]))
        expected = tuple(dims[dim] for dim in layout)
        if shape != expected:
            raise ValueError(
                f"params[{name!r}][{leaf!r}] must be {_layout(name, leaf)} = {expected}, got shape {shape} "
                f"(D={dims['D']} is x_q's width, Dkv={dims['Dkv']} x_kv's, N={num_heads} and "
                f"K={num_kv_heads} the head counts, H={dims['H']} from params['query']['kernel'], "
                f"Hv={dims['Hv']} and Dout={dims['Dout']} from params['out']['kernel'])"
            )


def _project_in(layer: dict, x, heads_spec: str):
    """``x [..., L, D] @ kernel [D, n, h] (+ bias [n, h]) -> [..., L, n, h]`` in x's dtype."""
    y = jnp.einsum(
        f"...ld,d{heads_spec}->...l{heads_spec}",
        x,
        layer["kernel"].astype(x.dtype),
        preferred_element_type=jnp.float32,
    )
    if "bias" in layer:
        y = y + layer["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def _check_attention_output(out, expected_shape: tuple[int, ...]) -> None:
    """``attention_fn``'s output must be an array ``[B..., T, N, Hv]`` (that the output projection
    would otherwise broadcast or fail on far from the cause)."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(
            f"attention_fn must return an array [B..., T, N, Hv] = {expected_shape}, got {type(out).__name__}"
        )
    if tuple(out.shape) != expected_shape:
        raise ValueError(
            f"attention_fn must return [B..., T, N, Hv] = {expected_shape} (Hv from params['value']), "
            f"got shape {tuple(out.shape)}"
        )


def _project_out(layer: dict, heads):
    """``heads [..., T, N, Hv] @ kernel [N, Hv, Dout] (+ bias) -> [..., T, Dout]``."""
    y = jnp.einsum(
        "...tnh,nho->...to", heads, layer["kernel"].astype(heads.dtype), preferred_element_type=jnp.float32
    )
    if "bias" in layer:
        y = y + layer["bias"].astype(jnp.float32)
    return y.astype(heads.dtype)


def multi_head_attention(
    params: Params,
    x_q,
    x_kv=None,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    mask=None,
    bias=None,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str | None = None,
    attention_fn: AttentionFn | None = None,
    hook: Callable[..., None] | None = None,
):
    """Multi-head (grouped-query, multi-query) attention with input and output projections.

    Args:
      params: the pytree from ``init_multi_head_attention`` (or copied from
        ``flax.nnx.MultiHeadAttention``).
      x_q: ``[B..., T, D]``, the sequence whose positions ask.
      x_kv: ``[B..., S, Dkv]`` for cross-attention; None for self-attention (``x_q``).
      num_heads: N, checked against ``params``.
      num_kv_heads: K (N % K == 0); defaults to N.
      mask, bias, scale, softcap, implementation: as in ``jattn.attention``.
      attention_fn: instead of ``jattn.attention``, any ``fn(q, k, v) -> out`` with the public
        layout (a ``jattn.variants`` variant with its options bound); then mask, bias, scale,
        softcap and implementation must be left unset.
      hook: called as ``hook(q=q, k=k, v=v, out=out)`` with the per-head tensors, for capturing
        attention weights or statistics (it runs at trace time under ``jit``).
    Returns:
      ``[B..., T, Dout]`` in ``x_q``'s dtype (projections accumulate in float32).
    """
    num_heads = check_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads)
    x_kv = x_q if x_kv is None else x_kv
    for name, x in (("x_q", x_q), ("x_kv", x_kv)):
        if getattr(x, "ndim", 0) < 2:
            raise ValueError(f"{name} must be [B..., length, features], got shape {getattr(x, 'shape', x)}")
    if x_q.shape[:-2] != x_kv.shape[:-2]:
        raise ValueError(
            f"x_q and x_kv must share batch dims, got x_q.shape={x_q.shape}, x_kv.shape={x_kv.shape}"
        )
    if x_q.dtype != x_kv.dtype:
        raise TypeError(f"x_q and x_kv must share a dtype, got {x_q.dtype} and {x_kv.dtype}")
    _check_params(params, x_q, x_kv, num_heads, num_kv_heads)

    q = _project_in(params["query"], x_q, "nh")  # [B..., T, N, H]
    k = _project_in(params["key"], x_kv, "nh")  # [B..., S, K, H]
    v = _project_in(params["value"], x_kv, "nh")  # [B..., S, K, Hv]
    if attention_fn is None:
        out = attention(
            q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap, implementation=implementation
        )
    else:
        settings = {
            "mask": mask,
            "bias": bias,
            "scale": scale,
            "softcap": softcap,
            "implementation": implementation,
        }
        given = sorted(name for name, value in settings.items() if value is not None)
        if given:
            raise ValueError(f"attention_fn is given, so {given} must be None (bind them into attention_fn)")
        out = attention_fn(q, k, v)  # [B..., T, N, Hv]
        _check_attention_output(out, (*q.shape[:-1], v.shape[-1]))
    if hook is not None:
        hook(q=q, k=k, v=v, out=out)
    return _project_out(params["out"], out.astype(x_q.dtype))  # [B..., T, Dout]
