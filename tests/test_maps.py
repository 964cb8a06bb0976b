"""jattn.maps: attention weights against the float64 oracle, streaming statistics against the dense
computation, implicit weights of the linear-cost variants, capture mode of the NNX modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import maps, masks, nn, reference, variants

TOL = {"atol": 2e-5, "rtol": 2e-5}


def _qkv(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(*batch, q_len, num_heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(*batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(*batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
    return q, k, v


CASES = {  # name -> (batch, T, S, N, K, mask, bias shape or None, softcap)
    "full": ((2,), 19, 19, 2, 2, None, None, None),
    "causal_gqa": ((2,), 33, 33, 4, 2, masks.causal(), None, None),
    "window_bias_softcap_mqa": ((), 40, 40, 3, 1, masks.sliding_window(5, 2), (3, 40, 40), 4.0),
    "cross_padding_empty_rows": (
        (2, 1),
        21,
        29,
        2,
        2,
        masks.padding(np.array([[0], [21]]), np.array([[29], [7]])),
        None,
        None,
    ),
    "strided_causal": ((1,), 37, 37, 2, 2, masks.strided(6), None, None),
}


def _case(name):
    batch, q_len, kv_len, num_heads, num_kv_heads, mask, bias_shape, softcap = CASES[name]
    q, k, v = _qkv(len(name), batch, q_len, kv_len, num_heads, num_kv_heads)
    bias = None if bias_shape is None else np.random.default_rng(1).normal(size=bias_shape).astype(np.float32)
    dense = None
    if mask is not None:
        dense = np.asarray(mask.dense(q_len, kv_len))  # [T, S] or [B..., 1, T, S]
        dense = np.broadcast_to(dense, (*batch, num_heads, q_len, kv_len))
    return q, k, v, mask, dense, bias, softcap


@pytest.mark.parametrize("name", sorted(CASES))
def test_weights_equal_the_oracle_and_rows_sum_to_one_over_the_mask(name):
    q, k, v, mask, dense, bias, softcap = _case(name)
    weights = maps.attention_weights(q, k, v, mask=mask, bias=bias, softcap=softcap)
    expected = reference.attention_weights_reference(q, k, mask=dense, bias=bias, softcap=softcap)
    assert weights.dtype == jnp.float32 and weights.shape == expected.shape
    np.testing.assert_allclose(weights, expected, **TOL)
    weights = np.asarray(weights)
    allowed = np.ones(weights.shape, bool) if dense is None else dense
    assert np.all(weights[~allowed] == 0.0)
    row_sums = weights.sum(-1)
    attends = allowed.any(-1)
    np.testing.assert_allclose(row_sums[attends], 1.0, atol=1e-5)
    assert np.all(row_sums[~attends] == 0.0)
    if name == "cross_padding_empty_rows":
        assert not attends.all()  # the case does have rows with nothing to attend


@pytest.mark.parametrize("name", ["causal_gqa", "window_bias_softcap_mqa"])
def test_weights_times_values_is_attention(name):
    q, k, v, mask, _, bias, softcap = _case(name)
    weights = maps.attention_weights(q, k, v, mask=mask, bias=bias, softcap=softcap)  # [B..., N, T, S]
    group = q.shape[-2] // k.shape[-2]
    v_heads = np.repeat(np.moveaxis(v, -2, -3), group, axis=-3)  # [B..., N, S, Hv]
    out = np.moveaxis(np.asarray(weights) @ v_heads, -3, -2)  # [B..., T, N, Hv]
    np.testing.assert_allclose(out, jattn.attention(q, k, v, mask=mask, bias=bias, softcap=softcap), **TOL)


def test_nan_in_padded_positions_does_not_leak():
    q, k, v = _qkv(3, (1,), 12, 12, 2, 2)
    q[:, 9:], k[:, 9:] = np.nan, np.nan
    mask = masks.padding(np.array([9]))
    weights = np.asarray(maps.attention_weights(q, k, v, mask=mask))
    stats = maps.attention_statistics(q, k, v, mask=mask, block_q=4, block_kv=4)
    assert np.isfinite(weights).all() and np.all(weights[..., 9:, :] == 0) and np.all(weights[..., 9:] == 0)
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in stats)


def _statistics_reference(p):
    """Entropy, mean |t - s| and first-token mass of float64 weights [..., T, S]."""
    q_len, kv_len = p.shape[-2:]
    gap = np.abs(np.arange(q_len)[:, None] - np.arange(kv_len)[None, :])
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(-1), (p * gap).sum(-1), p[..., 0]


STATISTICS_CASES = [(name, (8, 8)) for name in sorted(CASES)] + [
    ("cross_padding_empty_rows", (16, 4)),
    ("window_bias_softcap_mqa", (None, None)),
]


@pytest.mark.parametrize(("name", "blocks"), STATISTICS_CASES)
def test_streaming_statistics_equal_the_dense_computation(name, blocks):
    q, k, v, mask, dense, bias, softcap = _case(name)
    block_q, block_kv = blocks
    stats = maps.attention_statistics(
        q, k, v, mask=mask, bias=bias, softcap=softcap, block_q=block_q, block_kv=block_kv
    )
    p = reference.attention_weights_reference(q, k, mask=dense, bias=bias, softcap=softcap)
    for got, want in zip(stats[:3], _statistics_reference(p), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(stats.attends, p.sum(-1) > 0)
    dense_stats = maps.weight_statistics(
        maps.attention_weights(q, k, v, mask=mask, bias=bias, softcap=softcap)
    )
    for got, want in zip(stats, dense_stats, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=1e-4)


def test_an_additive_padding_bias_leaves_keys_out_of_weights_and_statistics():
    """-inf in the bias weighs nothing (no 0 · -inf NaN in the entropy); a row of it attends to nothing."""
    q, k, v = _qkv(9, (), 16, 16, 2, 2)
    valid = np.arange(16) < 11
    bias = np.where(valid[:, None] & valid[None, :], 0.0, -np.inf).astype(np.float32)  # [T, S]
    p = reference.attention_weights_reference(q, k, bias=bias)
    np.testing.assert_allclose(maps.attention_weights(q, k, v, bias=bias), p, **TOL)
    stats = maps.attention_statistics(q, k, v, bias=bias, block_q=8, block_kv=8)
    for got, want in zip(stats[:3], _statistics_reference(p), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert stats.attends[:, valid].all() and not stats.attends[:, ~valid].any()


def test_statistics_of_known_distributions():
    # Equal logits: uniform over the allowed keys, so entropy log(t + 1) and mean distance t / 2.
    q_len = 24
    q = np.zeros((q_len, 1, 4), np.float32)
    stats = maps.attention_statistics(q, q, q, mask=masks.causal(), block_q=8, block_kv=8)
    t = np.arange(q_len)
    np.testing.assert_allclose(stats.entropy[0], np.log(t + 1), atol=1e-5)
    np.testing.assert_allclose(stats.distance[0], t / 2, atol=1e-4)
    np.testing.assert_allclose(stats.first_token[0], 1 / (t + 1), atol=1e-6)
    summary = maps.summarize_heads(stats)
    np.testing.assert_allclose(summary["distance"], [np.mean(t / 2)], rtol=1e-5)


def test_summary_leaves_out_rows_that_attend_to_nothing():
    stats = maps.AttentionStatistics(
        entropy=np.array([[1.0, 3.0, 9.0]]),
        distance=np.array([[2.0, 4.0, 9.0]]),
        first_token=np.array([[0.5, 0.25, 9.0]]),
        attends=np.array([[True, True, False]]),
    )
    summary = maps.summarize_heads(stats)
    np.testing.assert_allclose(summary["entropy"], [2.0])
    np.testing.assert_allclose(summary["distance"], [3.0])
    np.testing.assert_allclose(summary["first_token"], [0.375])


def _apply_per_head(weights, v):
    group = weights.shape[-3] // v.shape[-2]
    v_heads = np.repeat(np.moveaxis(v, -2, -3), group, axis=-3)
    return np.moveaxis(np.asarray(weights) @ v_heads, -3, -2)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_and_performer_implicit_weights_reproduce_their_outputs(causal):
    q, k, v = _qkv(5, (2,), 20, 20, 4, 2)
    for feature_map in ("elu+1", "relu"):
        weights = maps.linear_attention_weights(q, k, v, feature_map=feature_map, causal=causal)
        out = jattn.linear_attention(q, k, v, feature_map=feature_map, causal=causal)
        np.testing.assert_allclose(_apply_per_head(weights, v), out, atol=1e-4, rtol=1e-4)
    key = jax.random.key(3)
    weights = maps.performer_attention_weights(q, k, v, key=key, num_features=32, causal=causal)
    out = jattn.performer_attention(q, k, v, key=key, num_features=32, causal=causal)
    np.testing.assert_allclose(_apply_per_head(weights, v), out, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)
    if causal:
        assert np.all(np.triu(np.asarray(weights), 1) == 0)


def test_linformer_weights_over_projected_positions_and_mapped_back():
    q, k, v = _qkv(6, (2,), 15, 15, 2, 2)
    rng = np.random.default_rng(0)
    proj_k, proj_v = (rng.normal(size=(24, 5)).astype(np.float32) / 3 for _ in range(2))
    projected = maps.linformer_attention_weights(q, k, v, proj_k, proj_v)
    assert projected.shape == (2, 2, 15, 5)
    np.testing.assert_allclose(np.asarray(projected).sum(-1), 1.0, atol=1e-5)
    on_keys = maps.linformer_attention_weights(q, k, v, proj_k, proj_v, over="keys")
    assert on_keys.shape == (2, 2, 15, 15)
    out = jattn.linformer_attention(q, k, v, proj_k, proj_v)
    np.testing.assert_allclose(_apply_per_head(on_keys, v), out, atol=1e-4, rtol=1e-4)


def test_linformer_statistics_are_over_projected_slots_without_positions():
    """Column p of Linformer's [T, P] weights is a projected slot, not key position p: the entropy is
    over the slots, and distance and first-token mass are not defined (None, left out of summaries)."""
    q, k, v = _qkv(6, (2,), 15, 15, 2, 2)
    rng = np.random.default_rng(0)
    params = {name: rng.normal(size=(24, 5)).astype(np.float32) / 3 for name in ("proj_k", "proj_v")}
    linformer = variants.get_variant("linformer", projected_len=5)
    stats = maps.variant_statistics(linformer, q, k, v, causal=False, params=params)
    p = np.asarray(maps.linformer_attention_weights(q, k, v, params["proj_k"], params["proj_v"]), np.float64)
    np.testing.assert_allclose(stats.entropy, -(p * np.log(p)).sum(-1), atol=1e-4, rtol=1e-4)
    assert stats.distance is None and stats.first_token is None and np.asarray(stats.attends).all()
    summary = maps.summarize_heads(stats)
    assert list(summary) == ["entropy"] and summary["entropy"].shape == (2, 2)


def test_linformer_model_captures_statistics():
    model = nn.EncoderClassifier(
        13,
        3,
        max_len=16,
        width=16,
        depth=1,
        num_heads=2,
        mlp_dim=32,
        variant=variants.get_variant("linformer", projected_len=4),
        position="learned",
        dropout_rate=0.0,
        num_kv_heads=None,
        dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )
    maps.set_capture(model, ("statistics",))
    stats = maps.run_captured(model, jnp.arange(10)[None])[1]["blocks.0.attention"]["attention_statistics"]
    assert stats.entropy.shape == (1, 2, 11) and stats.distance is None and stats.first_token is None
    assert np.all(np.asarray(stats.entropy) <= np.log(4) + 1e-5)  # a distribution over 4 slots


def test_variant_weights_apply_the_variant_pattern():
    q, k, v = _qkv(7, (1,), 24, 24, 2, 2)
    local = variants.get_variant("local", window=3)
    weights = maps.variant_weights(local, q, k, v, causal=True)
    allowed = np.asarray(masks.sliding_window(3, 0).dense(24, 24))
    expected = reference.attention_weights_reference(q, k, mask=allowed)
    np.testing.assert_allclose(weights, expected, **TOL)
    stats = maps.variant_statistics(local, q, k, v, causal=True)
    assert float(np.max(stats.distance)) <= 3.0


def _tiny_lm(variant, position="learned"):
    return nn.DecoderLM(
        13,
        max_len=16,
        width=16,
        depth=2,
        num_heads=2,
        mlp_dim=32,
        variant=variant,
        position=position,
        dropout_rate=0.0,
        num_kv_heads=None,
        dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )


def test_captured_maps_equal_the_oracle_for_a_small_model_and_leave_the_output_unchanged():
    model = _tiny_lm(None)
    tokens = jnp.asarray([[1, 5, 2, 7, 7, 3, 0, 12, 4, 9, 1]])
    plain = model(tokens)
    seen = []
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nn.MultiHeadAttention):
            module.hook = lambda *, q, k, v, out: seen.append((q, k))
    maps.set_capture(model, maps.CAPTURE_KINDS)
    output, captured = maps.run_captured(model, tokens)
    np.testing.assert_array_equal(output, plain)
    assert list(captured) == ["blocks.0.attention", "blocks.1.attention"]
    causal = np.tril(np.ones((11, 11), bool))
    for (q, k), values in zip(seen, captured.values(), strict=True):
        expected = reference.attention_weights_reference(q, k, mask=causal)  # [1, N, T, T]
        np.testing.assert_allclose(values["attention_weights"], expected, **TOL)
        stats = values["attention_statistics"]
        np.testing.assert_allclose(stats.entropy, _statistics_reference(expected)[0], atol=1e-4)
    maps.set_capture(model, ())
    assert maps.run_captured(model, tokens)[1] == {}


def test_capture_sees_rotary_heads_and_implicit_weights():
    model = _tiny_lm(variants.get_variant("linear"), position="rotary")
    maps.set_capture(model, ("weights",))
    weights = maps.run_captured(model, jnp.arange(10)[None])[1]["blocks.1.attention"]["attention_weights"]
    assert weights.shape == (1, 2, 10, 10)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(np.asarray(weights), 1) == 0)


def test_bad_input_errors_name_the_argument():
    q, k, v = _qkv(8, (1,), 8, 8, 2, 2)
    with pytest.raises(ValueError, match="capture takes names"):
        maps.check_capture(("weights", "maps"))
    with pytest.raises(TypeError, match="capture must be a sequence"):
        maps.check_capture("weights")
    with pytest.raises(ValueError, match="feature_map must be one of"):
        maps.linear_attention_weights(q, k, v, feature_map="softplus")
    with pytest.raises(ValueError, match="over must be one of"):
        maps.linformer_attention_weights(q, k, v, np.ones((8, 2)), np.ones((8, 2)), over="values")
    with pytest.raises(ValueError, match="proj_k must be"):
        maps.linformer_attention_weights(q, k, v, np.ones((4, 2)), np.ones((8, 2)))
    with pytest.raises(ValueError, match="block_kv"):
        maps.attention_statistics(q, k, v, block_kv=0)
    with pytest.raises(ValueError, match="same head dim"):
        maps.attention_weights(q, k[..., :4], v)
    with pytest.raises(ValueError, match="causal=True"):
        maps.linear_attention_weights(q, k[:, :5], v[:, :5], causal=True)
    with pytest.raises(ValueError, match="approximate"):
        maps.variant_mask(variants.get_variant("linear"), causal=True)


def test_variant_maps_take_the_variant_by_name():
    """A variant given by name failed on 'str' object has no attribute 'exact'."""
    q, k, v = _qkv(7, (1,), 12, 12, 2, 2)
    for name in ("local", "linear"):
        by_name = maps.variant_weights(name, q, k, v, causal=True)
        np.testing.assert_array_equal(
            by_name, maps.variant_weights(variants.get_variant(name), q, k, v, causal=True)
        )
        stats = maps.variant_statistics(name, q, k, v, causal=True)
        np.testing.assert_allclose(stats.entropy, maps.weight_statistics(by_name).entropy, atol=1e-5)
    with pytest.raises(TypeError, match="variant must be a jattn.variants.Variant, a registered name"):
        maps.variant_weights(jattn.attention, q, k, v, causal=False)


def test_weights_and_flags_are_checked_by_name():
    """1-D weights failed on unpacking their shape; truthy strings were read as True."""
    q, k, v = _qkv(8, (1,), 8, 8, 2, 2)
    with pytest.raises(
        ValueError, match=r"weights must be \[\.\.\., T, S\] \(at least 2 dims\), got shape \(4,\)"
    ):
        maps.weight_statistics(jnp.ones(4) / 4)
    with pytest.raises(TypeError, match="over_positions must be True or False"):
        maps.weight_statistics(jnp.ones((4, 4)) / 4, over_positions="no")
    for call in (
        lambda: maps.linear_attention_weights(q, k, v, causal="no"),
        lambda: maps.performer_attention_weights(q, k, v, key=None, causal="no"),
        lambda: maps.variant_weights(None, q, k, v, causal="no"),
        lambda: maps.variant_statistics("linear", q, k, v, causal="no"),
        lambda: maps.variant_mask(None, causal="no"),
    ):
        with pytest.raises(TypeError, match="causal must be True or False"):
            call()
    with pytest.raises(TypeError, match="orthogonal must be True or False"):
        maps.performer_attention_weights(q, k, v, key=None, orthogonal="no")
