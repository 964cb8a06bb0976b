"""jattn.nn models: shapes, causality, padding, positions, dropout, parameter counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import nn
from jattn.variants import get_variant

SMALL = dict(
    width=16, depth=1, num_heads=2, mlp_dim=32, dropout_rate=0.0, num_kv_heads=None, dtype=jnp.float32
)


def _lm(variant, position="learned", **kw):
    return nn.DecoderLM(
        11, max_len=24, variant=variant, position=position, rngs=nnx.Rngs(0), **{**SMALL, **kw}
    )


@pytest.mark.parametrize(
    "name, options", [("full", {}), ("local", {"window": 3}), ("bigbird", {"block": 16}), ("linear", {})]
)
def test_decoder_is_causal(name, options):
    model = _lm(get_variant(name, **options), position="rotary")
    tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, 11)
    changed = tokens.at[:, 12:].set((tokens[:, 12:] + 1) % 11)
    np.testing.assert_allclose(model(tokens)[:, :12], model(changed)[:, :12], atol=1e-5)
    assert not np.allclose(model(tokens)[:, 12:], model(changed)[:, 12:])


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_ignores_padding_contents(pooling):
    model = nn.EncoderClassifier(
        11,
        5,
        max_len=17,
        pooling=pooling,
        variant=get_variant("full"),
        position="sinusoidal",
        rngs=nnx.Rngs(0),
        **SMALL,
    )
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 1, 11)
    lengths = jnp.array([9, 16])
    junk = tokens.at[0, 9:].set(3)
    logits = model(tokens, lengths=lengths)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    np.testing.assert_allclose(model(junk, lengths=lengths), logits, atol=1e-5)
    assert model.masks_padding


def test_encoder_decoder_shapes_and_source_padding():
    model = nn.EncoderDecoder(
        9, 7, max_len=12, variant=get_variant("full"), position="learned", rngs=nnx.Rngs(0), **SMALL
    )
    source = jax.random.randint(jax.random.key(0), (2, 10), 0, 9)
    target_in = jax.random.randint(jax.random.key(1), (2, 6), 0, 7)
    lengths = jnp.array([4, 10])
    out = model(source, target_in, source_lengths=lengths)
    assert out.shape == (2, 6, 7)
    np.testing.assert_allclose(
        model(source.at[0, 4:].set(0), target_in, source_lengths=lengths), out, atol=1e-5
    )


def _mean_pooling_classifier():
    return nn.EncoderClassifier(
        11, 3, max_len=17, pooling="mean", variant=None, position="learned", rngs=nnx.Rngs(0), **SMALL
    )


def test_lengths_outside_the_padded_length_are_refused_or_clipped():
    model = _mean_pooling_classifier()
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 1, 11)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 8\]"):
        model(tokens, lengths=jnp.array([8, 12]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        model(tokens, lengths=jnp.array([8]))
    with pytest.raises(TypeError, match="lengths must hold integer lengths"):
        model(tokens, lengths=jnp.array([8.0, 8.0]))
    # Under jit they cannot be checked; a mean over 8 real positions is not scaled down by 12.
    jitted = nnx.jit(lambda m, t, n: m(t, lengths=n))
    np.testing.assert_allclose(
        jitted(model, tokens, jnp.array([12, 12])), model(tokens, lengths=jnp.array([8, 8])), atol=1e-5
    )
    seq2seq = nn.EncoderDecoder(9, 7, max_len=12, variant=None, position="learned", rngs=nnx.Rngs(0), **SMALL)
    with pytest.raises(ValueError, match=r"source_lengths must lie in \[0, 10\]"):
        seq2seq(
            jnp.zeros((2, 10), jnp.int32), jnp.zeros((2, 6), jnp.int32), source_lengths=jnp.array([4, 11])
        )


def test_cross_attention_shares_the_grouped_key_value_heads():
    model = nn.EncoderDecoder(
        9, 7, max_len=12, variant=None, position="learned", rngs=nnx.Rngs(0), **{**SMALL, "num_kv_heads": 1}
    )
    block = model.decoder.blocks[0]
    assert block.attention.key["kernel"].shape == block.cross.key["kernel"].shape == (16, 1, 8)
    out = model(
        jnp.zeros((2, 10), jnp.int32), jnp.zeros((2, 6), jnp.int32), source_lengths=jnp.array([4, 10])
    )
    assert out.shape == (2, 6, 7)


def test_hook_sees_the_rotated_queries_and_keys_the_attention_used():
    seen = {}
    layer = nn.MultiHeadAttention(16, 2, rotary=True, rngs=nnx.Rngs(0), hook=lambda **t: seen.update(t))
    layer(jax.random.normal(jax.random.key(0), (1, 8, 16)))
    weights = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", seen["q"], seen["k"]) / jnp.sqrt(8.0), axis=-1)
    np.testing.assert_allclose(jnp.einsum("bnts,bsnh->btnh", weights, seen["v"]), seen["out"], atol=1e-5)


def test_linformer_parameters_are_created_by_the_module():
    plain = nn.param_count(_lm(get_variant("full")))
    with_proj = nn.param_count(_lm(get_variant("linformer", projected_len=8)))
    assert with_proj - plain == 2 * 24 * 8  # proj_k and proj_v, [max_len, projected_len], one layer
    # A max_len of the variant's own sizes its projections; longer inputs are refused by name.
    layer = nn.MultiHeadAttention(
        16, 2, variant=get_variant("linformer", projected_len=4, max_len=32), rngs=nnx.Rngs(0)
    )
    assert layer.variant_params["proj_k"].shape == (32, 4)
    assert layer(jnp.ones((1, 24, 16))).shape == (1, 24, 16)


def test_param_count_of_attention_layer():
    layer = nn.MultiHeadAttention(16, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
    # query 16*4*4 + 4*4, key and value 16*2*4 + 2*4 each, out 4*4*16 + 16
    assert nn.param_count(layer) == (256 + 16) + 2 * (128 + 8) + (256 + 16)


def test_dropout_only_with_a_key():
    model = _lm(get_variant("full"), dropout_rate=0.5)
    tokens = jnp.arange(12)[None] % 11
    np.testing.assert_array_equal(model(tokens), model(tokens))
    assert not np.allclose(model(tokens, key=jax.random.key(0)), model(tokens, key=jax.random.key(1)))


def test_rotary_scores_depend_on_relative_position_only():
    q = jax.random.normal(jax.random.key(0), (1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 8))
    seq = lambda x: jnp.broadcast_to(x, (16, 1, 8))  # noqa: E731  same vector at every position
    rq, rk = nn.apply_rotary(seq(q)), nn.apply_rotary(seq(k))
    score = lambda i, j: float(jnp.dot(rq[i, 0], rk[j, 0]))  # noqa: E731
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
    np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(seq(q), axis=-1), rtol=1e-5)
    with pytest.raises(ValueError, match="even head dim"):
        nn.apply_rotary(jnp.ones((4, 1, 3)))
    with pytest.raises(ValueError, match=r"x of shape \[B..., L, N, H\], got shape \(4,\)"):
        nn.apply_rotary(jnp.ones(4))


def test_rotary_with_an_offset_encodes_the_rows_of_a_later_window():
    """Decoding after a cache: the T new rows sit at positions S - T ... S - 1."""
    x = jax.random.normal(jax.random.key(0), (2, 10, 3, 8))
    np.testing.assert_array_equal(nn.apply_rotary(x[:, 6:], offset=6), nn.apply_rotary(x)[:, 6:])
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        nn.apply_rotary(x, offset=-1)


def test_sinusoidal_table():
    table = nn.sinusoidal_table(10, 6)
    assert table.shape == (10, 6)
    np.testing.assert_allclose(table[3, 0], np.sin(3.0))
    np.testing.assert_allclose(table[3, 1], np.cos(3.0))


def test_errors_name_the_problem():
    model = _lm(get_variant("full"))
    with pytest.raises(ValueError, match="sequence length 30 of tokens exceeds the model's max_len=24"):
        model(jnp.zeros((1, 30), jnp.int32))
    with pytest.raises(ValueError, match="position must be one of"):
        _lm(get_variant("full"), position="alibi")
    with pytest.raises(ValueError, match="pooling must be one of"):
        nn.EncoderClassifier(
            5, 2, max_len=8, pooling="max", variant=None, position="none", rngs=nnx.Rngs(0), **SMALL
        )
    with pytest.raises(ValueError, match="implementation must be None when a variant is given"):
        nn.MultiHeadAttention(16, 2, variant="full", implementation="xla", rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"implementation must be one of \[.*'xla'\] or None \(auto\), got 'nope'"
    ):
        get_variant("full", implementation="nope")  # when it is built, not at the module's first call


def test_bfloat16_compute_gives_float32_logits():
    model = _lm(get_variant("full"), dtype=jnp.bfloat16)
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("rate", [-0.5, 1.0, float("nan")])
def test_dropout_rate_must_be_in_unit_interval(rate):
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        _lm(get_variant("full"), dropout_rate=rate)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        nn.TransformerBlock(16, 2, 32, variant=None, dropout_rate=rate, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"dropout_rate must be a number in \[0, 1\)"):
        _lm(get_variant("full"), dropout_rate="0.1")


def _classifier(num_classes=3, **kw):
    return nn.EncoderClassifier(
        11, num_classes, max_len=8, variant=None, position="none", rngs=nnx.Rngs(0), **{**SMALL, **kw}
    )


def _seq2seq(source_vocab_size=9, target_vocab_size=7):
    return nn.EncoderDecoder(
        source_vocab_size,
        target_vocab_size,
        max_len=8,
        variant=None,
        position="none",
        rngs=nnx.Rngs(0),
        **SMALL,
    )


@pytest.mark.parametrize(
    "build, name",
    [
        (
            lambda: nn.DecoderLM(0, max_len=8, variant=None, position="none", rngs=nnx.Rngs(0), **SMALL),
            "vocab_size",
        ),
        (
            lambda: nn.DecoderLM(11, max_len=0, variant=None, position="none", rngs=nnx.Rngs(0), **SMALL),
            "max_len",
        ),
        (lambda: _lm(None, width=0), "width"),
        (lambda: _lm(None, depth=0), "depth"),
        (lambda: _lm(None, mlp_dim=0), "mlp_dim"),
        (lambda: _classifier(num_classes=0), "num_classes"),
        (lambda: _seq2seq(source_vocab_size=0), "source_vocab_size"),
        (lambda: _seq2seq(target_vocab_size=0), "target_vocab_size"),
        (lambda: nn.TransformerBlock(16, 2, 0, variant=None, rngs=nnx.Rngs(0)), "mlp_dim"),
        (lambda: nn.TransformerBlock(0, 2, 32, variant=None, rngs=nnx.Rngs(0)), "width"),
    ],
)
def test_sizes_must_be_positive(build, name):
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got {name}=0"):
        build()


def test_token_ids_outside_the_vocabulary_are_rejected():
    model = _lm(get_variant("full"))  # vocab_size 11
    for bad in (11, -1):
        with pytest.raises(ValueError, match=rf"tokens must hold ids in \[0, vocab_size=11\), got .*: {bad}"):
            model(jnp.full((2, 8), bad))
    with pytest.raises(TypeError, match="tokens must hold integer token ids, got dtype float32"):
        model(jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=r"source must hold ids in \[0, vocab_size=9\)"):
        _seq2seq()(jnp.full((1, 4), 9), jnp.zeros((1, 4), jnp.int32))
    # Under jit the ids are tracers and cannot be checked; valid ids still run.
    tokens = jnp.arange(8)[None] % 11
    np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(model, tokens), model(tokens), atol=1e-5)


def _models(variant, max_len=8):
    """The three models, built alike with ``variant``."""
    kwargs = {**SMALL, "max_len": max_len, "variant": variant, "position": "learned"}
    return (
        nn.EncoderClassifier(11, 3, rngs=nnx.Rngs(0), **kwargs),
        nn.DecoderLM(11, rngs=nnx.Rngs(0), **kwargs),
        nn.EncoderDecoder(11, 7, rngs=nnx.Rngs(0), **kwargs),
    )


def test_models_take_the_variant_by_name():
    """A variant given by name reached the attention layers resolved but the models kept the string
    (AttributeError in takes_mask at the first call, and in masks_padding)."""
    tokens, lengths = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]), jnp.array([3, 5])
    by_name, by_variant = _models("local"), _models(get_variant("local"))
    classifier, lm, seq2seq = by_name
    assert classifier.masks_padding and lm.masks_padding and seq2seq.encoder.masks_padding
    calls = (
        lambda m: m(tokens, lengths=lengths),
        lambda m: m(tokens),
        lambda m: m(tokens, tokens[:, :3] % 7, source_lengths=lengths),
    )
    for call, named, built in zip(calls, by_name, by_variant, strict=True):
        np.testing.assert_array_equal(call(named), call(built))


@pytest.mark.parametrize(
    "build",
    [
        lambda: _models(jattn.attention),
        lambda: nn.MultiHeadAttention(16, 2, variant=jattn.attention, rngs=nnx.Rngs(0)),
        lambda: nn.TransformerBlock(16, 2, 32, variant=jattn.attention, rngs=nnx.Rngs(0)),
    ],
)
def test_a_variant_that_is_not_one_is_refused_by_name(build):
    """A function passed as variant was kept and failed later on a missing attribute."""
    with pytest.raises(
        TypeError, match=r"variant must be a jattn.variants.Variant, a registered name .* got function"
    ):
        build()


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: nn.MultiHeadAttention(16, 2, causal="no", rngs=nnx.Rngs(0)), "causal"),
        (lambda: nn.MultiHeadAttention(16, 2, rotary="no", rngs=nnx.Rngs(0)), "rotary"),
        (lambda: nn.MultiHeadAttention(16, 2, use_bias="no", rngs=nnx.Rngs(0)), "use_bias"),
        (lambda: nn.TransformerBlock(16, 2, 32, variant=None, causal="no", rngs=nnx.Rngs(0)), "causal"),
        (lambda: nn.TransformerBlock(16, 2, 32, variant=None, cross="no", rngs=nnx.Rngs(0)), "cross"),
    ],
)
def test_flags_must_be_booleans(build, name):
    """A truthy string such as causal="no" was stored and applied as True."""
    with pytest.raises(TypeError, match=f"{name} must be True or False, got str 'no'"):
        build()


def test_tokens_must_be_a_batch():
    """1-D tokens failed in the classifier on unpacking their shape, and ran in the decoder: every
    model now takes [B, T] and names the argument otherwise."""
    classifier, lm, seq2seq = _models(None)
    tokens = jnp.array([1, 2, 3, 4])
    for call, name in (
        (lambda: classifier(tokens), "tokens"),
        (lambda: lm(tokens), "tokens"),
        (lambda: lm(tokens[None, None]), "tokens"),
        (lambda: seq2seq(tokens, tokens[None]), "source"),
        (lambda: seq2seq(tokens[None], tokens), "target_in"),
    ):
        with pytest.raises(ValueError, match=rf"{name} must be token ids of shape \[B, T\], got shape"):
            call()
