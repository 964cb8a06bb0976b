"""``jattn.nn.MultiHeadAttention``: a Flax NNX shell over ``jattn.multi_head_attention``.

The attention inside is either ``jattn.attention`` (a mask and an implementation, like
``flax.nnx.MultiHeadAttention``) or a ``jattn.variants`` variant, so a config value switches it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from jattn import maps
from jattn import masks as masks_lib
from jattn._checks import check_bool
from jattn.attention import attention
from jattn.core.multihead import init_multi_head_attention, multi_head_attention
from jattn.nn.positions import apply_rotary
from jattn.variants import Variant, resolve_variant


def _as_params(tree: Any) -> Any:
    return nnx.data(jax.tree.map(nnx.Param, tree))


def _values(tree: Any) -> Any:
    return jax.tree.map(lambda p: p[...], tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def takes_mask(variant: Variant) -> bool:
    """Whether the variant combines a caller's mask (padding) with its own pattern."""
    return "mask" in inspect.signature(variant.fn).parameters


class MultiHeadAttention(nnx.Module):
    """Multi-head (grouped-query) attention: W_Q, W_K, W_V, any attention, W_O.

    Its parameters are named and shaped like ``flax.nnx.MultiHeadAttention``'s
    (``query/kernel [D, N, H]`` … ``out/kernel [N, Hv, D]``), so weights copy across.

    Args:
      in_features: D, the width of the queries' input (and the output).
      num_heads: N. num_kv_heads: K (N % K == 0), defaults to N.
      head_dim: H, defaults to D // N.
      in_kv_features: width of the key/value input for cross-attention, defaults to D.
      variant: a ``jattn.variants.Variant`` or a registered name; None uses ``jattn.attention``
        with the ``mask`` given at call time and ``implementation``.
      implementation: for ``variant=None``, passed to ``jattn.attention``.
      causal: decoder self-attention (passed to the variant, or a causal mask without one).
      rotary: rotate queries and keys by position (RoFormer); self-attention only.
      max_len: longest sequence a variant with parameters (Linformer) must handle, unless the
        variant sets its own.
      use_bias: biases after the projections.
      rngs: parameter initialisation.
      hook: optional ``hook(q=, k=, v=, out=)`` called with the per-head tensors the attention
        sees (q and k after the rotation, with ``rotary``), e.g. to capture attention maps;
        settable later as ``module.hook``.
      capture: names from ``jattn.maps.CAPTURE_KINDS`` to sow as ``nnx.Intermediate`` on every
        call: ``"weights"`` (``attention_weights [B..., N, T, S]``, short inputs) and
        ``"statistics"`` (``attention_statistics``, any length); settable later as
        ``module.capture`` or model-wide with ``jattn.maps.set_capture``; collected by
        ``jattn.maps.run_captured``. The output is unchanged.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        in_kv_features: int | None = None,
        variant: Variant | str | None = None,
        implementation: str | None = None,
        causal: bool = False,
        rotary: bool = False,
        max_len: int | None = None,
        use_bias: bool = True,
        rngs: nnx.Rngs,
        hook: Callable[..., None] | None = None,
        capture: Sequence[str] = (),
    ):
        self.variant = resolve_variant(variant)
        if self.variant is not None and implementation is not None:
            raise ValueError(
                "implementation must be None when a variant is given (it is a variant option: "
                f"get_variant({self.variant.name!r}, implementation=...)), got {implementation!r}"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.implementation = implementation
        self.causal = check_bool("causal", causal)
        self.rotary = check_bool("rotary", rotary)
        self.hook = hook
        self.capture = maps.check_capture(capture)
        params = init_multi_head_attention(
            rngs.params(),
            in_features,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            in_kv_features=in_kv_features,
            use_bias=use_bias,
        )
        self.query, self.key, self.value, self.out = (
            _as_params(params[n]) for n in ("query", "key", "value", "out")
        )
        self.variant_params = None
        if self.variant is not None and self.variant.init_params is not None:
            max_len = self.variant.max_len if max_len is None else max_len
            if max_len is None:
                raise ValueError(
                    f"attention variant {self.variant.name!r} has parameters, so max_len is required"
                )
            self.variant_params = _as_params(
                self.variant.init_params(
                    rngs.params(),
                    num_heads=num_heads,
                    num_kv_heads=self.num_kv_heads,
                    head_dim=params["query"]["kernel"].shape[-1],
                    max_len=max_len,
                )
            )

    def _attention_fn(self, mask, key) -> Callable | None:
        """The attention on projected heads, or None for plain ``jattn.attention`` with ``mask``."""
        if self.variant is None:
            if not self.rotary:
                return None
            return lambda q, k, v: attention(
                apply_rotary(q), apply_rotary(k), v, mask=mask, implementation=self.implementation
            )
        kwargs: dict[str, Any] = {"causal": self.causal, "params": _values(self.variant_params), "key": key}
        if mask is not None:
            if not takes_mask(self.variant):
                raise NotImplementedError(
                    f"attention variant {self.variant.name!r} takes no mask; call it without one"
                )
            kwargs["mask"] = mask
        fn = self.variant.fn
        if self.rotary:
            return lambda q, k, v: fn(apply_rotary(q), apply_rotary(k), v, **kwargs)
        return lambda q, k, v: fn(q, k, v, **kwargs)

    def __call__(self, x_q, x_kv=None, *, mask=None, key: jax.Array | None = None):
        """Attend from ``x_q [B..., T, D]`` to ``x_kv [B..., S, Dkv]`` (default ``x_q``).

        Args:
          mask: a ``jattn.masks`` mask (e.g. padding), combined with the variant's pattern.
          key: PRNG key for variants that draw random features; None for their fixed draw.
        Returns:
          ``[B..., T, D]`` in ``x_q``'s dtype.
        """
        if self.rotary and x_kv is not None:
            raise ValueError("rotary position encoding applies to self-attention only (x_kv must be None)")
        if self.variant is None and self.causal:
            mask = masks_lib.causal() if mask is None else mask & masks_lib.causal()
        params = {n: _values(getattr(self, n)) for n in ("query", "key", "value", "out")}
        attention_fn = self._attention_fn(mask, key)
        direct = attention_fn is None
        return multi_head_attention(
            params,
            x_q,
            x_kv,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            mask=mask if direct else None,
            implementation=self.implementation if direct else None,
            attention_fn=attention_fn,
            hook=self._capturing_hook(mask, key),
        )

    def _capturing_hook(self, mask, key) -> Callable[..., None] | None:
        """``self.hook``, given the heads the attention sees (rotated, with ``rotary``), after sowing
        what ``self.capture`` names from them."""
        if not self.capture and (self.hook is None or not self.rotary):
            return self.hook

        def hook(*, q, k, v, out):
            q_seen, k_seen = (apply_rotary(q), apply_rotary(k)) if self.rotary else (q, k)
            settings = {
                "causal": self.causal,
                "mask": mask,
                "params": _values(self.variant_params),
                "key": key,
            }
            if "weights" in self.capture:
                weights = maps.variant_weights(self.variant, q_seen, k_seen, v, **settings)
                self.sow(nnx.Intermediate, "attention_weights", weights)
            if "statistics" in self.capture:
                stats = maps.variant_statistics(self.variant, q_seen, k_seen, v, **settings)
                self.sow(nnx.Intermediate, "attention_statistics", stats)
            if self.hook is not None:
                self.hook(q=q_seen, k=k_seen, v=v, out=out)

        return hook
