"""jattn.multi_head_attention and jattn.nn.MultiHeadAttention against flax.nnx.MultiHeadAttention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import masks
from jattn.nn import MultiHeadAttention


def _copy_weights(theirs: nnx.MultiHeadAttention, ours: MultiHeadAttention) -> None:
    nnx.update(ours, nnx.state(theirs, nnx.Param))


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, cross, causal",
    [(4, None, False, False), (4, None, False, True), (4, 2, False, True), (4, 1, True, False)],
)
def test_matches_flax_multi_head_attention(num_heads, num_kv_heads, cross, causal):
    width, kv_width = 32, 24 if cross else 32
    theirs = nnx.MultiHeadAttention(
        num_heads,
        width,
        num_kv_heads=num_kv_heads,
        in_kv_features=kv_width,
        decode=False,
        rngs=nnx.Rngs(0),
    )
    ours = MultiHeadAttention(
        width, num_heads, num_kv_heads=num_kv_heads, in_kv_features=kv_width, causal=causal, rngs=nnx.Rngs(1)
    )
    _copy_weights(theirs, ours)
    kx, ky = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (2, 10, width))  # [B, T, D]
    y = jax.random.normal(ky, (2, 7 if cross else 10, kv_width))  # [B, S, Dkv]
    if cross:
        expected, got = theirs(x, y), ours(x, y)
    else:
        flax_mask = nnx.make_causal_mask(jnp.ones((2, 10))) if causal else None
        expected, got = theirs(x, mask=flax_mask), ours(x)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)


def test_pure_function_equals_module_and_takes_any_implementation():
    params = jattn.init_multi_head_attention(jax.random.key(0), 16, num_heads=2)
    x = jax.random.normal(jax.random.key(1), (3, 12, 16))
    mask = masks.sliding_window(3)
    by_impl = [
        jattn.multi_head_attention(params, x, num_heads=2, mask=mask, implementation=impl)
        for impl in ("xla", "chunked")
    ]
    np.testing.assert_allclose(by_impl[0], by_impl[1], atol=1e-5)
    module = MultiHeadAttention(16, 2, rngs=nnx.Rngs(0))
    nnx.update(module, nnx.State(jax.tree.map(nnx.Param, params)))
    np.testing.assert_allclose(module(x, mask=mask), by_impl[0], atol=1e-6)


def test_shapes_dtype_and_hook():
    params = jattn.init_multi_head_attention(
        jax.random.key(0), 16, num_heads=4, num_kv_heads=2, head_dim=8, value_head_dim=6, out_features=10
    )
    seen = {}
    x = jnp.ones((2, 5, 16), jnp.bfloat16)
    out = jattn.multi_head_attention(
        params,
        x,
        num_heads=4,
        num_kv_heads=2,
        hook=lambda **t: seen.update({k: v.shape for k, v in t.items()}),
    )
    assert out.shape == (2, 5, 10) and out.dtype == jnp.bfloat16
    assert seen == {"q": (2, 5, 4, 8), "k": (2, 5, 2, 8), "v": (2, 5, 2, 6), "out": (2, 5, 4, 6)}


def test_variant_as_attention_fn_matches_masked_call():
    params = jattn.init_multi_head_attention(jax.random.key(0), 16, num_heads=2)
    x = jax.random.normal(jax.random.key(1), (2, 20, 16))
    variant = jattn.variants.get_variant("local", window=4)
    via_variant = jattn.multi_head_attention(
        params, x, num_heads=2, attention_fn=lambda q, k, v: variant(q, k, v, causal=True)
    )
    via_mask = jattn.multi_head_attention(params, x, num_heads=2, mask=masks.sliding_window(4, 0))
    np.testing.assert_allclose(via_variant, via_mask, atol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda p, x: jattn.multi_head_attention(p, x, num_heads=3),
            r"params\['query'\]\['kernel'\] must be",
        ),
        (lambda p, x: jattn.multi_head_attention(p, x, num_heads=0), "num_heads must be an int >= 1"),
        (lambda p, x: jattn.multi_head_attention({"query": {}}, x, num_heads=2), "params must hold"),
        (lambda p, x: jattn.multi_head_attention(p, x[0, 0], num_heads=2), "x_q must be"),
        (
            lambda p, x: jattn.multi_head_attention(
                p, x, num_heads=2, mask=masks.causal(), attention_fn=lambda q, k, v: q
            ),
            r"attention_fn is given, so \['mask'\] must be None",
        ),
        (lambda p, x: jattn.multi_head_attention(p, x, x[:1], num_heads=2), "share batch dims"),
        (
            lambda p, x: jattn.multi_head_attention(
                {**p, "value": {**p["value"], "kernel": jnp.ones((16, 2, 3))}}, x, num_heads=2
            ),
            r"params\['value'\]\['kernel'\] must be \[Dkv, K, Hv\] = \(16, 2, 8\), got shape \(16, 2, 3\)",
        ),
        (
            lambda p, x: jattn.multi_head_attention(
                {**p, "query": {**p["query"], "bias": jnp.ones(3)}}, x, num_heads=2
            ),
            r"params\['query'\]\['bias'\] must be \[N, H\] = \(2, 8\), got shape \(3,\)",
        ),
        (
            lambda p, x: jattn.multi_head_attention(
                {**p, "out": {**p["out"], "bias": jnp.ones(8)}}, x, num_heads=2
            ),
            r"params\['out'\]\['bias'\] must be \[Dout\] = \(16,\), got shape \(8,\)",
        ),
        (
            lambda p, x: jattn.multi_head_attention(
                {**p, "key": {"kernel": jnp.ones((16, 2))}}, x, num_heads=2
            ),
            r"params\['key'\]\['kernel'\] must be 3-D \[Dkv, K, H\], got shape \(16, 2\)",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match):
    params = jattn.init_multi_head_attention(jax.random.key(0), 16, num_heads=2)
    with pytest.raises(ValueError, match=match):
        call(params, jnp.ones((2, 4, 16)))


def test_init_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="num_heads must be a multiple of num_kv_heads"):
        jattn.init_multi_head_attention(jax.random.key(0), 16, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="in_features must be a multiple of num_heads"):
        jattn.init_multi_head_attention(jax.random.key(0), 10, num_heads=4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"key": 0}, r"key must be a single PRNG key .* got int 0"),
        ({"key": jax.random.split(jax.random.key(0))}, r"key must be a single PRNG key .* got key<fry>"),
        ({"dtype": jnp.int32}, "dtype must be a floating dtype"),
        ({"dtype": "nope"}, "dtype must be a floating dtype"),
        ({"use_bias": "no"}, "use_bias must be True or False"),
    ],
)
def test_init_checks_the_key_dtype_and_use_bias(kwargs, match):
    """An int key and an integer dtype failed deep in jax.random without naming the argument; a
    truthy string use_bias was read as True."""
    with pytest.raises(TypeError, match=match):
        jattn.init_multi_head_attention(**{"key": jax.random.key(0), **kwargs}, in_features=16, num_heads=2)


def test_init_takes_a_legacy_key_and_any_float_dtype():
    """The checks of key and dtype let through what jax.random takes."""
    params = jattn.init_multi_head_attention(jax.random.PRNGKey(0), 16, num_heads=2, dtype=jnp.bfloat16)
    assert params["query"]["kernel"].shape == (16, 2, 8) and params["out"]["bias"].dtype == jnp.bfloat16


EXPECTED_HEADS = r"\[B\.\.\., T, N, Hv\] = \(2, 4, 2, 8\)"


@pytest.mark.parametrize(
    "attention_fn, error, match",
    [
        (lambda q, k, v: v[..., :1], ValueError, rf"must return {EXPECTED_HEADS} .*got shape \(2, 4, 2, 1\)"),
        (lambda q, k, v: v[:, :3], ValueError, rf"must return {EXPECTED_HEADS} .*got shape \(2, 3, 2, 8\)"),
        (lambda q, k, v: (v, v), TypeError, rf"must return an array {EXPECTED_HEADS}, got tuple"),
    ],
)
def test_attention_fn_output_is_checked(attention_fn, error, match):
    """An output of the wrong value head dim broadcast silently into the output projection; a tuple
    failed on .astype."""
    params = jattn.init_multi_head_attention(jax.random.key(0), 16, num_heads=2)
    with pytest.raises(error, match=f"attention_fn {match}"):
        jattn.multi_head_attention(params, jnp.ones((2, 4, 16)), num_heads=2, attention_fn=attention_fn)
