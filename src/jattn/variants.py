"""Named attention variants: what an experiment or scaling config selects by name.

A variant is an attention function with the public layout plus, for variants that learn something
of their own (Linformer's projections), a parameter initializer:

    fn(q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], *, causal: bool, [mask,] params, key) -> [B, T, N, Hv]

``causal`` is the model's property (a decoder passes True) and is combined with the variant's own
pattern; ``mask``, for variants that take one, is the caller's (a padded batch's
``masks.padding``: exact variants combine any mask with their pattern, the linear-cost ones take
only padding); ``params`` is what ``init_params`` returned (or None); ``key`` is a PRNG key for
variants that draw random features (or None for a fixed draw).

Variants are created from a name and options, ``get_variant("bigbird", block=64)``, so a config
entry ``{variant: bigbird, options: {block: 64}}`` picks one, and new variants plug in with
``register_variant`` without touching the training or scaling code.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jattn import masks as masks_lib
from jattn._checks import check_int
from jattn.attention import attention, implementations
from jattn.core import linear as linear_lib
from jattn.parallel import ring as ring_lib

AttentionFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Variant:
    """A configured attention variant.

    Attributes:
      name: the registered name it was built from.
      fn: ``fn(q, k, v, *, causal, params, key) -> out`` (see the module docstring).
      exact: True when it computes softmax attention exactly under its mask.
      init_params: ``init_params(key, *, num_heads, num_kv_heads, head_dim, max_len) -> pytree``
        or None when the variant has no parameters of its own.
      max_len: the longest sequence it can take, or None for any.
      min_len: the smallest model ``max_len`` it is meant for (Linformer's projected length), or None.
      options: the options it was built with (for tables and logs).
      mask: for exact variants, ``mask(causal) -> Mask | None``, the pattern's mask that ``fn``
        applies (the scaling study counts attended pairs from it); None for approximate variants.
    """

    name: str
    fn: AttentionFn
    exact: bool
    init_params: Callable[..., Any] | None = None
    max_len: int | None = None
    min_len: int | None = None
    options: dict = dataclasses.field(default_factory=dict)
    mask: Callable[[bool], masks_lib.Mask | None] | None = None

    def __call__(self, q, k, v, *, causal: bool = False, params=None, key=None):
        return self.fn(q, k, v, causal=causal, params=params, key=key)


_FACTORIES: dict[str, Callable[..., Variant]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_variant(name: str, factory: Callable[..., Variant], description: str = "") -> None:
    """Make ``get_variant(name, **options)`` call ``factory(**options)``."""
    _FACTORIES[name] = factory
    _DESCRIPTIONS[name] = description or (inspect.getdoc(factory) or "").split("\n")[0]


def variant_names() -> dict[str, str]:
    """Registered variant names with one-line descriptions."""
    return dict(_DESCRIPTIONS)


def get_variant(name: str, **options) -> Variant:
    """Build the variant registered as ``name`` with ``options``.

    Raises:
      ValueError: unknown name (the message lists the known ones) or an option the variant does
        not take (the message lists the ones it does).
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown attention variant {name!r}; known: {sorted(_FACTORIES)}")
    factory = _FACTORIES[name]
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"attention variant {name!r} takes no option(s) {unknown}; it takes {sorted(accepted)}"
        )
    variant = factory(**options)
    return dataclasses.replace(variant, name=name, options=dict(options))


# ---------------------------------------------------------------------------------------------
# Exact softmax variants: a mask pattern and an implementation
# ---------------------------------------------------------------------------------------------


def resolve_variant(variant: Variant | str | None) -> Variant | None:
    """A variant given by name (``jattn.variants.get_variant`` with its default options) or as a
    ``Variant`` -> the ``Variant``; None (full softmax attention) stays None."""
    if isinstance(variant, str):
        return get_variant(variant)
    if variant is not None and not isinstance(variant, Variant):
        raise TypeError(
            "variant must be a jattn.variants.Variant, a registered name (one of "
            f"{sorted(variant_names())}) or None, got {type(variant).__name__} {variant!r}"
        )
    return variant


def softmax_variant(
    pattern: Callable[[bool], masks_lib.Mask | None],
    implementation: str | None = None,
    *,
    attend: AttentionFn = attention,
) -> Variant:
    """An exact variant from ``pattern(causal) -> mask`` (None: no mask).

    Its ``fn`` also takes ``mask=``, a caller's mask (e.g. ``masks.padding``) combined with the
    pattern. ``attend(q, k, v, *, mask, implementation)`` computes it (default ``jattn.attention``,
    whose implementation names are checked here, before any call).
    """
    if attend is attention and implementation is not None and implementation not in implementations():
        raise ValueError(
            f"implementation must be one of {sorted(implementations())} or None (auto), "
            f"got {implementation!r}"
        )

    def pattern_mask(causal: bool) -> masks_lib.Mask | None:
        combined = pattern(causal)
        if causal:
            combined = masks_lib.causal() if combined is None else combined & masks_lib.causal()
        return combined

    def fn(q, k, v, *, causal, params=None, key=None, mask=None):
        del params, key
        combined = pattern_mask(causal)
        if mask is not None:  # the caller's own mask (padding), on top of the pattern
            combined = mask if combined is None else combined & mask
        return attend(q, k, v, mask=combined, implementation=implementation)

    return Variant("softmax", fn, exact=True, mask=pattern_mask)


def _full(implementation: str | None = None) -> Variant:
    """Full softmax attention, O(T·S) (Vaswani et al. 2017)."""
    return softmax_variant(lambda causal: None, implementation)


def _local(window: int = 128, implementation: str | None = None) -> Variant:
    """Sliding-window (local) attention: ``window`` positions on each side, left only if causal."""
    window = check_int("window", window, minimum=0)
    return softmax_variant(
        lambda causal: masks_lib.sliding_window(window, 0 if causal else window), implementation
    )


def _strided(stride: int = 64, implementation: str | None = None) -> Variant:
    """Sparse Transformer strided pattern (Child et al. 2019)."""
    masks_lib.strided(stride)
    return softmax_variant(lambda causal: masks_lib.strided(stride, causal=causal), implementation)


def _fixed(block: int = 64, summary: int = 8, implementation: str | None = None) -> Variant:
    """Sparse Transformer fixed pattern (Child et al. 2019)."""
    masks_lib.fixed(block, summary)
    return softmax_variant(lambda causal: masks_lib.fixed(block, summary, causal=causal), implementation)


def _longformer(
    window: int = 128, global_tokens: tuple[int, ...] = (0,), implementation: str | None = None
) -> Variant:
    """Longformer: sliding window plus global tokens (Beltagy et al. 2020)."""
    masks_lib.longformer(window, global_tokens)
    return softmax_variant(
        lambda causal: masks_lib.longformer(window, global_tokens, causal=causal), implementation
    )


def _bigbird(
    block: int = 64,
    num_window_blocks: int = 3,
    num_global_blocks: int = 1,
    num_random: int = 2,
    seed: int = 0,
    implementation: str | None = None,
) -> Variant:
    """BigBird: window, global and random blocks (Zaheer et al. 2020)."""
    mask = masks_lib.bigbird(block, num_window_blocks, num_global_blocks, num_random, seed)
    return softmax_variant(lambda causal: mask, implementation)


register_variant("full", _full)
register_variant("local", _local)
register_variant("strided", _strided)
register_variant("fixed", _fixed)
register_variant("longformer", _longformer)
register_variant("bigbird", _bigbird)


# ---------------------------------------------------------------------------------------------
# Approximate linear-cost variants (jattn.core.linear)
# ---------------------------------------------------------------------------------------------


def _linear(feature_map: str = "elu+1") -> Variant:
    """Linear attention with a kernel feature map (Katharopoulos et al. 2020); causal by prefix sums."""
    linear_lib.resolve_feature_map(feature_map)  # validates

    def fn(q, k, v, *, causal, mask=None, params=None, key=None):
        del params, key
        return linear_lib.linear_attention(q, k, v, feature_map=feature_map, causal=causal, mask=mask)

    return Variant("linear", fn, exact=False)


def _performer(num_features: int = 256, orthogonal: bool = True) -> Variant:
    """Performer, FAVOR+ positive random features (Choromanski et al. 2021); features from ``key``
    (a fixed draw when key is None)."""
    linear_lib.performer_features(None, num_features, 1)  # validates num_features
    if not isinstance(orthogonal, bool):
        raise TypeError(f"orthogonal must be True or False, got {type(orthogonal).__name__} {orthogonal!r}")

    def fn(q, k, v, *, causal, mask=None, params=None, key=None):
        del params
        return linear_lib.performer_attention(
            q, k, v, key=key, num_features=num_features, causal=causal, orthogonal=orthogonal, mask=mask
        )

    return Variant("performer", fn, exact=False)


def _linformer(projected_len: int = 256, max_len: int | None = None) -> Variant:
    """Linformer, keys and values projected along the sequence to ``projected_len`` (Wang et al.
    2020). Its learned projections are sized for the model's ``max_len``; the option ``max_len``
    caps the lengths the variant accepts (a model with a longer one is refused), None for any."""
    projected_len = check_int("projected_len", projected_len)
    own_max_len = None if max_len is None else check_int("max_len", max_len)
    if own_max_len is not None and projected_len > own_max_len:
        raise ValueError(
            f"linformer projected_len={projected_len} exceeds max_len={own_max_len}: it would not compress"
        )

    def init_params(key, *, num_heads, num_kv_heads, head_dim, max_len):
        del num_heads, num_kv_heads, head_dim  # one projection pair shared by all heads
        max_len = check_int("max_len", max_len)
        if own_max_len is not None and max_len > own_max_len:
            raise ValueError(f"max_len={max_len} exceeds the linformer variant's max_len={own_max_len}")
        if projected_len > max_len:
            raise ValueError(
                f"linformer projected_len={projected_len} exceeds max_len={max_len}: it would not compress"
            )
        key_k, key_v = jax.random.split(key)
        std = projected_len**-0.5  # the paper's N(0, 1/k) initialization
        return {
            "proj_k": std * jax.random.normal(key_k, (max_len, projected_len), jnp.float32),
            "proj_v": std * jax.random.normal(key_v, (max_len, projected_len), jnp.float32),
        }

    def fn(q, k, v, *, causal, mask=None, params=None, key=None):
        del key
        if causal:
            raise NotImplementedError("linformer projects the whole sequence, so it cannot be causal")
        if params is None:
            raise ValueError("linformer needs params=variant.init_params(...) (its projections)")
        return linear_lib.linformer_attention(q, k, v, params["proj_k"], params["proj_v"], mask=mask)

    return Variant(
        "linformer", fn, exact=False, init_params=init_params, max_len=own_max_len, min_len=projected_len
    )


register_variant("linear", _linear)
register_variant("performer", _performer)
register_variant("linformer", _linformer)


# ---------------------------------------------------------------------------------------------
# Sequence parallelism: ring attention over a mesh axis (jattn.parallel.ring)
# ---------------------------------------------------------------------------------------------


def _ring(
    axis_name: str = ring_lib.SEQUENCE_AXIS,
    batch_axis: str | None = ring_lib.BATCH_AXIS,
    implementation: str = "chunked",
) -> Variant:
    """Ring attention (Liu et al. 2023): exact full attention with the sequence split over mesh axis
    ``axis_name`` of the mesh set by ``jax.set_mesh``; one-device attention when none is set."""
    if implementation not in ring_lib.IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {sorted(ring_lib.IMPLEMENTATIONS)}, got {implementation!r}"
        )
    attend = functools.partial(ring_lib.ring_attention_in_context, axis_name=axis_name, batch_axis=batch_axis)
    return softmax_variant(lambda causal: None, implementation, attend=attend)


register_variant("ring", _ring)
