"""Linear-cost approximations (linear, Performer, Linformer) against their float64 oracles, forward and
gradients; the Performer's convergence to softmax attention; O(T) memory of the causal scan; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jattn
from jattn import flops, reference
from jattn.core import linear
from jattn.core.linear import performer_features
from jattn.variants import get_variant

FWD_TOL, GRAD_TOL = 2e-5, 2e-4  # float32 outputs and gradients of order one


def draw(rng, *shape, scale=1.0):
    return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)


def inputs(seed, batch=(2,), q_len=13, kv_len=13, num_heads=4, num_kv_heads=2, head_dim=8, value_dim=6):
    rng = np.random.default_rng(seed)
    q = draw(rng, *batch, q_len, num_heads, head_dim, scale=0.5)
    k = draw(rng, *batch, kv_len, num_kv_heads, head_dim, scale=0.5)
    v = draw(rng, *batch, kv_len, num_kv_heads, value_dim)
    d_out = draw(rng, *batch, q_len, num_heads, value_dim)
    return rng, q, k, v, d_out


def check(fn, args, d_out, expected, expected_grads, names):
    out, pullback = jax.vjp(fn, *args)
    assert out.shape == expected.shape and out.dtype == args[0].dtype
    np.testing.assert_allclose(np.asarray(out), expected, atol=FWD_TOL, rtol=FWD_TOL)
    for name, got in zip(names, pullback(d_out), strict=True):
        expected_grad = expected_grads[name]
        np.testing.assert_allclose(np.asarray(got), expected_grad, atol=GRAD_TOL, rtol=GRAD_TOL, err_msg=name)


def check_performer(q, k, v, d_out, *, key, num_features, causal, orthogonal=True):
    """Performer attention against its float64 oracle with the same random features."""
    features = np.asarray(performer_features(key, num_features, q.shape[-1], orthogonal=orthogonal))
    options = {"key": key, "num_features": num_features, "causal": causal, "orthogonal": orthogonal}
    check(
        lambda q, k, v: jattn.performer_attention(q, k, v, **options),
        (q, k, v),
        d_out,
        reference.performer_attention_reference(q, k, v, features, causal=causal),
        reference.performer_attention_vjp_reference(q, k, v, d_out, features, causal=causal),
        "qkv",
    )


def check_linear_attention(q, k, v, d_out, **kwargs):
    """``jattn.linear_attention`` against its float64 oracle, forward and gradients."""
    check(
        lambda q, k, v: jattn.linear_attention(q, k, v, **kwargs),
        (q, k, v),
        d_out,
        reference.linear_attention_reference(q, k, v, **kwargs),
        reference.linear_attention_vjp_reference(q, k, v, d_out, **kwargs),
        "qkv",
    )


@settings(max_examples=4, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    causal=st.booleans(),
    feature_map=st.sampled_from(["elu+1", "relu"]),
    length=st.sampled_from([1, 37, 64, 150]),  # within, at and across the scan's chunk of 64
)
def test_linear_attention_matches_oracle(seed, causal, feature_map, length):
    _, q, k, v, d_out = inputs(seed, q_len=length, kv_len=length)
    # A row whose normalizer is near 0 (relu with few positive features) is ill-conditioned in float32:
    # dq is two cancelling terms divided by it (8.5e-4 off the oracle at 1.4e-3). Such draws are left out.
    assume(smallest_normalizer(q, k, feature_map, causal) > 5e-3)
    check_linear_attention(q, k, v, d_out, feature_map=feature_map, causal=causal)


def smallest_normalizer(q, k, feature_map, causal) -> float:
    """The smallest non-zero row normalizer φ(q_t)·Σ_s φ(k_s) (s <= t when causal), in float64."""
    phi, _ = reference._FEATURE_MAPS_REFERENCE[feature_map]
    qh, kh, _, *_ = reference._prepare(q, k, k, None, None, None)
    _, normalizers, _ = reference._kernel_attention(phi(qh), phi(kh), kh, causal)
    return float(normalizers[normalizers > 0].min(initial=np.inf))


@pytest.mark.parametrize("causal, orthogonal", [(False, True), (True, False)])
def test_performer_matches_oracle_with_the_same_features(causal, orthogonal):
    _, q, k, v, d_out = inputs(1, q_len=70, kv_len=70)
    key = jax.random.key(7)
    check_performer(q, k, v, d_out, key=key, num_features=24, causal=causal, orthogonal=orthogonal)


@pytest.mark.parametrize("position", [0, 9])  # the first query's only key; one key among several
def test_causal_performer_row_survives_a_long_key_early_in_its_chunk(position):
    """A key of large norm has FAVOR+ exponents far below its chunk's largest, so on the chunk's shared
    scale its features underflow in float32. The queries that see it before any larger key must still
    read it on a scale of their own, not return a row of zeros."""
    _, q, k, v, d_out = inputs(2, q_len=40, kv_len=40)
    k = k.at[:, position, :, 0].set(30.0)  # exponents about -450 against about 0 for the others
    check_performer(q, k, v, d_out, key=jax.random.key(1), num_features=16, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_the_oracle_where_the_normalizer_is_tiny(causal):
    """A positive normalizer can be tiny in float32 (FAVOR+ features of large activations, relu
    features of small ones) while the output, an average of values, is of order one. Autodiff of
    num / den formed num / den², which underflowed to inf · 0 = NaN in the gradients."""
    _, q, k, v, d_out = inputs(1, q_len=24, kv_len=24, head_dim=32)
    check_performer(16 * q, 16 * k, v, d_out, key=jax.random.key(0), num_features=16, causal=causal)
    tiny, kwargs = 1e-11, {"feature_map": "relu", "causal": causal}
    expected = reference.linear_attention_vjp_reference(tiny * q, tiny * k, v, d_out, **kwargs)
    check(  # gradients with respect to the unscaled q and k, of order one
        lambda q, k, v: jattn.linear_attention(tiny * q, tiny * k, v, **kwargs),
        (q, k, v),
        d_out,
        reference.linear_attention_reference(tiny * q, tiny * k, v, **kwargs),
        {"q": tiny * expected["q"], "k": tiny * expected["k"], "v": expected["v"]},
        "qkv",
    )


@pytest.mark.parametrize("shift", [-30.0, 100.0])
@pytest.mark.parametrize("causal", [False, True])
def test_elu_features_of_extreme_activations_match_the_oracle(causal, shift):
    """elu(x) + 1 = exp(x) for x < 0, which float32 holds down to x of about -87; computed as
    elu(x) + 1 it rounded to 0 below about -17, and every row returned zeros. Above about 88,
    exp(x) overflows in the branch the ``where`` discards, and its gradient 0 · inf would be NaN."""
    _, q, k, v, d_out = inputs(3, q_len=20, kv_len=20)
    check_linear_attention(q + shift, k + shift, v, d_out, feature_map="elu+1", causal=causal)


def test_performer_error_shrinks_with_more_features():
    shapes = {"batch": (), "q_len": 64, "kv_len": 64, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16}
    _, q, k, v, _ = inputs(2, **shapes, value_dim=16)
    exact = reference.attention_reference(q, k, v)

    def mean_error(num_features):
        keys = [jax.random.key(seed) for seed in range(4)]
        draws = [jattn.performer_attention(q, k, v, key=key, num_features=num_features) for key in keys]
        return np.mean([np.abs(np.asarray(out) - exact).mean() for out in draws])

    errors = [mean_error(num_features) for num_features in (8, 64, 512)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 3  # error ~ 1/sqrt(M): 64x the features, about 8x smaller


@pytest.mark.parametrize("orthogonal", [True, False])
def test_performer_features_are_gaussian_and_estimate_the_softmax_kernel(orthogonal):
    # Over many draws each coordinate of each row is N(0, 1): mean 0, positive half the time
    # (QR without the sign correction made row i's i-th coordinate negative 80-100% of the time).
    draws = jax.vmap(lambda key: performer_features(key, 8, 8, orthogonal=orthogonal))
    w = np.asarray(draws(jax.random.split(jax.random.key(0), 4000)))  # [draws, M, H]
    np.testing.assert_allclose(w.mean(0), 0.0, atol=0.08)
    np.testing.assert_allclose((w > 0).mean(0), 0.5, atol=0.05)
    np.testing.assert_allclose((w**2).mean(0), 1.0, atol=0.12)
    # Unbiased: E[exp(w·x - |x|²/2) exp(w·y - |y|²/2)] = exp(x·y), here for every row.
    x = np.array([0.6, 0.2, -0.3, 0.1, 0.0, 0.4, -0.2, 0.3])
    y = np.array([0.5, -0.1, 0.2, 0.3, 0.1, 0.2, 0.1, -0.4])
    estimate = (np.exp(w @ x - x @ x / 2) * np.exp(w @ y - y @ y / 2)).mean(0)  # [M]
    np.testing.assert_allclose(estimate, np.exp(x @ y), rtol=0.08)


def test_performer_fixed_draw_without_key():
    _, q, k, v, _ = inputs(3)
    first = jattn.performer_attention(q, k, v, key=None, num_features=16)
    np.testing.assert_array_equal(first, jattn.performer_attention(q, k, v, key=None, num_features=16))
    assert not np.allclose(first, jattn.performer_attention(q, k, v, key=jax.random.key(5), num_features=16))


@pytest.mark.parametrize("kv_len", [9, 20])  # shorter than the projections, and exactly their length
def test_linformer_matches_oracle(kv_len):
    rng, q, k, v, d_out = inputs(4, q_len=11, kv_len=kv_len)
    proj_k, proj_v = draw(rng, 20, 5, scale=0.4), draw(rng, 20, 5, scale=0.4)
    check(
        jattn.linformer_attention,
        (q, k, v, proj_k, proj_v),
        d_out,
        reference.linformer_attention_reference(q, k, v, proj_k, proj_v),
        reference.linformer_attention_vjp_reference(q, k, v, d_out, proj_k, proj_v),
        ("q", "k", "v", "proj_k", "proj_v"),
    )


@pytest.mark.parametrize("causal", [False, True])
def test_streaming_chunks_and_rescaled_key_sums_match_the_oracle(monkeypatch, causal):
    """Inputs stream through in chunks (a scan over whole chunks, then a shorter rest). Force chunks
    of 16 rows (8 when causal) at length 70, with keys whose size grows along the sequence, so that
    each Performer key chunk has a larger stabilizing max than the last and the running sums must
    be rescaled."""
    monkeypatch.setattr(linear, "STREAM_CHUNK", 16)
    monkeypatch.setattr(linear, "CAUSAL_CHUNK", 8)
    jax.clear_caches()  # both functions are jitted: retrace with the small chunks
    _, q, k, v, d_out = inputs(6, q_len=70, kv_len=70)
    k = k * jnp.linspace(0.2, 3.0, 70)[None, :, None, None]
    check_performer(q, k, v, d_out, key=jax.random.key(8), num_features=24, causal=causal)
    check(
        lambda q, k, v: jattn.linear_attention(q, k, v, causal=causal),
        (q, k, v),
        d_out,
        reference.linear_attention_reference(q, k, v, causal=causal),
        reference.linear_attention_vjp_reference(q, k, v, d_out, causal=causal),
        "qkv",
    )
    jax.clear_caches()


def test_causal_scan_keeps_memory_linear():
    def temp_bytes(length):
        shape = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)  # [B, T, N, H]
        loss = lambda q, k, v: jattn.linear_attention(q, k, v, causal=True).sum()  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
        assert f"{length},{length}" not in compiled.as_text()  # no [T, T] array
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(8192) / temp_bytes(4096) < 2.3


@pytest.mark.parametrize("causal", [False, True])
def test_work_is_linear_in_the_length(causal):
    """Matmul FLOPs of fwd+bwd, counted with the streaming loops' trip counts, double with the length."""

    def work(fn, length):
        shape = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)  # [B, T, N, H]
        return flops.matmul_flops(
            jax.grad(lambda *qkv: fn(*qkv).sum(), argnums=(0, 1, 2)), shape, shape, shape
        )

    for fn in (
        lambda q, k, v: jattn.linear_attention(q, k, v, causal=causal),
        lambda q, k, v: jattn.performer_attention(q, k, v, key=None, num_features=32, causal=causal),
    ):
        assert 1.9 < work(fn, 8192) / work(fn, 4096) < 2.1


@pytest.mark.parametrize(
    "name, options",
    [("linear", {}), ("performer", {"num_features": 16}), ("linformer", {"projected_len": 8})],
)
def test_variants(name, options):
    _, q, k, v, _ = inputs(5, q_len=40, kv_len=40, num_heads=2, num_kv_heads=2)
    variant = get_variant(name, **options)
    assert not variant.exact
    params = None
    if variant.init_params is not None:
        params = variant.init_params(jax.random.key(0), num_heads=2, num_kv_heads=2, head_dim=8, max_len=64)
    out = variant(q, k, v, causal=False, params=params, key=jax.random.key(1))
    assert out.shape == (2, 40, 2, 6) and np.isfinite(np.asarray(out)).all()
    if name == "linformer":
        with pytest.raises(NotImplementedError, match="cannot be causal"):
            variant(q, k, v, causal=True, params=params)
    else:
        key = jax.random.key(1)
        causal_out = variant(q, k, v, causal=True, params=params, key=key)
        changed_future = variant(q, k, v.at[:, 20:].set(0.0), causal=True, params=params, key=key)
        np.testing.assert_allclose(causal_out[:, :20], changed_future[:, :20], atol=1e-6)


PADDED_LENGTHS = (70, 23, 0)  # whole, across the causal scan's chunk of 64, and nothing


def _padded_case(name, causal):
    """``fn(q, k, v, mask)`` for one linear-cost function, with its options bound."""
    proj = jax.random.normal(jax.random.key(4), (80, 8)) / 8**0.5
    functions = {
        "linear": lambda q, k, v, mask: jattn.linear_attention(q, k, v, causal=causal, mask=mask),
        "performer": lambda q, k, v, mask: jattn.performer_attention(
            q, k, v, key=jax.random.key(2), num_features=32, causal=causal, mask=mask
        ),
        "linformer": lambda q, k, v, mask: jattn.linformer_attention(q, k, v, proj, proj, mask=mask),
    }
    return functions[name]


@pytest.mark.parametrize(
    "name, causal",
    [
        ("linear", False),
        ("linear", True),
        ("performer", False),
        pytest.param("performer", True, marks=pytest.mark.slow),  # 14 s; the causal stream is linear's
        ("linformer", False),
    ],
)
def test_padding_is_left_out_as_if_cut_off(name, causal):
    """Each sequence of a padded batch gives what its unpadded prefix gives alone, forward and
    gradients; padded query rows are zero; NaN in the padding reaches nothing."""
    fn = _padded_case(name, causal)
    _, q, k, v, d_out = inputs(7, batch=(3,), q_len=70, kv_len=70)
    lengths = jnp.array(PADDED_LENGTHS)
    mask = jattn.masks.padding(lengths)
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    grads = pullback(d_out)
    for b, length in enumerate(PADDED_LENGTHS):
        np.testing.assert_array_equal(np.asarray(out[b, length:]), 0.0)
        for got in grads:
            np.testing.assert_array_equal(np.asarray(got[b, length:]), 0.0)
        if length == 0:
            continue
        cut = [x[b : b + 1, :length] for x in (q, k, v)]
        alone, alone_pullback = jax.vjp(lambda q, k, v: fn(q, k, v, None), *cut)
        np.testing.assert_allclose(out[b : b + 1, :length], alone, atol=FWD_TOL, rtol=FWD_TOL)
        for got, expected in zip(grads, alone_pullback(d_out[b : b + 1, :length]), strict=True):
            np.testing.assert_allclose(got[b : b + 1, :length], expected, atol=GRAD_TOL, rtol=GRAD_TOL)
    poisoned = [x.at[1, 23:].set(jnp.nan) for x in (q, k, v)]
    out_poisoned, pullback_poisoned = jax.vjp(lambda q, k, v: fn(q, k, v, mask), *poisoned)
    np.testing.assert_allclose(out_poisoned, out, atol=FWD_TOL, rtol=FWD_TOL)
    for got, expected in zip(pullback_poisoned(d_out), grads, strict=True):
        np.testing.assert_allclose(got, expected, atol=GRAD_TOL, rtol=GRAD_TOL)


def test_masks_other_than_padding_are_refused():
    _, q, k, v, _ = inputs(6)
    for name in ("linear", "performer", "linformer"):
        with pytest.raises(TypeError, match=r"takes mask=None or masks.padding.*got SlidingWindow"):
            _padded_case(name, False)(q, k, v, jattn.masks.sliding_window(4))
    with pytest.raises(ValueError, match=r"q_lengths must broadcast to the batch dims \(2,\)"):
        jattn.linear_attention(q, k, v, mask=jattn.masks.padding(jnp.array([3, 4, 5])))


def test_bad_input_names_the_argument():
    _, q, k, v, _ = inputs(6)
    with pytest.raises(ValueError, match="num_features must be an int >= 1"):
        jattn.performer_attention(q, k, v, key=None, num_features=0)
    with pytest.raises(TypeError, match="num_features must be an int"):
        jattn.performer_attention(q, k, v, key=None, num_features=2.5)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        jattn.linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="causal=True.*q length 13 and k length 9"):
        jattn.linear_attention(q, k[:, :9], v[:, :9], causal=True)
    with pytest.raises(ValueError, match="S=13 exceeds proj_k's max_len=10"):
        jattn.linformer_attention(q, k, v, jnp.zeros((10, 4)), jnp.zeros((10, 4)))
    with pytest.raises(ValueError, match="same length"):
        jattn.linformer_attention(q, k, v, jnp.zeros((20, 4)), jnp.zeros((20, 5)))
    with pytest.raises(ValueError, match="projected_len must be an int >= 1"):
        get_variant("linformer", projected_len=0)
    with pytest.raises(ValueError, match="projected_len=64 exceeds max_len=32"):
        get_variant("linformer", projected_len=64).init_params(
            jax.random.key(0), num_heads=1, num_kv_heads=1, head_dim=8, max_len=32
        )
    with pytest.raises(ValueError, match="q and k must have the same head dim"):
        jattn.linear_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="projected_len=64 exceeds max_len=32"):
        get_variant("linformer", projected_len=64, max_len=32)
    with pytest.raises(TypeError, match="orthogonal must be True or False"):
        get_variant("performer", orthogonal="no")
    with pytest.raises(ValueError, match='stabilizer must be "row" or "all", got \'rows\''):
        linear.positive_random_features(q[0, :, 0], jnp.ones((4, 8)), scale=1.0, stabilizer="rows")


def test_scale_may_be_a_jax_scalar_and_static_arguments_are_checked_by_name():
    """scale and num_features are static arguments of jit: a JAX scalar scale, and an unhashable
    or non-integer value, got JAX's "Non-hashable static arguments" error naming no argument."""
    _, q, k, v, _ = inputs(6)
    proj = jnp.ones((20, 4)) / 4
    for fn in (
        lambda scale: jattn.performer_attention(q, k, v, key=None, num_features=8, scale=scale),
        lambda scale: jattn.linformer_attention(q, k, v, proj, proj, scale=scale),
    ):
        np.testing.assert_array_equal(fn(1 / jnp.sqrt(8.0)), fn(8**-0.5))
        with pytest.raises(ValueError, match="scale must be positive and finite"):
            fn(jnp.float32(-1.0))
    with pytest.raises(TypeError, match="num_features must be an int, got ArrayImpl"):
        jattn.performer_attention(q, k, v, key=None, num_features=jnp.int32(8))
    with pytest.raises(
        TypeError, match=r"feature_map must be one of \['elu\+1', 'relu'\] or a function, got list"
    ):
        jattn.linear_attention(q, k, v, feature_map=["relu"])


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda q, k, v: jattn.linear_attention(q, k, v, causal="no"), "causal"),
        (lambda q, k, v: jattn.performer_attention(q, k, v, key=None, causal="False"), "causal"),
        (lambda q, k, v: jattn.performer_attention(q, k, v, key=None, orthogonal="no"), "orthogonal"),
        (lambda q, k, v: performer_features(None, 8, 8, orthogonal=1), "orthogonal"),
    ],
)
def test_flags_must_be_booleans(call, name):
    """A truthy string such as causal="no" was read as True."""
    _, q, k, v, _ = inputs(6)
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        call(q, k, v)


@pytest.mark.parametrize(
    "key",
    [3, jax.random.split(jax.random.key(0), 2), jnp.zeros((2, 2), jnp.uint32)],
    ids=["int", "batch", "legacy_batch"],
)
def test_performer_key_must_be_one_prng_key(key):
    _, q, k, v, _ = inputs(6)
    with pytest.raises(TypeError, match=r"key must be a single PRNG key .* got"):
        jattn.performer_attention(q, k, v, key=key, num_features=8)


def test_performer_takes_a_legacy_key():
    _, q, k, v, _ = inputs(6)
    out = jattn.performer_attention(q, k, v, key=jax.random.PRNGKey(1), num_features=8)
    assert out.shape == q.shape[:-1] + v.shape[-1:] and np.isfinite(np.asarray(out)).all()


def test_linformer_projection_errors_name_the_projection():
    _, q, k, v, _ = inputs(6)
    with pytest.raises(ValueError, match=r"proj_k must be .*projected_len > 0, got proj_k.shape=\(20, 0\)"):
        jattn.linformer_attention(q, k, v, jnp.zeros((20, 0)), jnp.zeros((20, 0)))
    with pytest.raises(TypeError, match="proj_k must be an array, got list"):
        jattn.linformer_attention(q, k, v, np.zeros((20, 4)).tolist(), jnp.zeros((20, 4)))
    with pytest.raises(ValueError, match=r"proj_v must be .*got proj_v.shape=\(20,\)"):
        jattn.linformer_attention(q, k, v, jnp.zeros((20, 4)), jnp.zeros((20,)))
