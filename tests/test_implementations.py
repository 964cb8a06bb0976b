"""The built-in pure-JAX implementations against the float64 oracle (the shared suite)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from attention_suite import AttentionSuite, as64, make_inputs
from jattn import masks
from jattn.core.chunked import chunked_attention
from jattn.reference import attention_reference, attention_vjp_reference


class TestXla(AttentionSuite):
    implementation = "xla"


class TestChunked(AttentionSuite):
    implementation = "chunked"
    second_order = False


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("bias_shape", [(1, 2, 37, 45), (1, 2, 1, 45)], ids=["per_head", "per_key"])
def test_chunked_bias_gradient_across_several_key_tiles(bias_shape, x64):
    """At the default blocks a short sequence is one key tile; with tiles of 16, dbias is gathered
    from three key tiles (the last ragged), each at its own offset. Under ``jax_enable_x64`` float32
    inputs must give the same (the bias tile's query block index was int64 there and its key block
    index int32, which ``dynamic_slice`` refused)."""
    rng = np.random.default_rng(3)
    q, k, v, d_out = make_inputs(rng, (2,), 37, 45, 2, 1, 8, 8, jnp.float32)
    bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
    mask = masks.sliding_window(20, 4)

    def loss(q, k, v, bias):
        out = chunked_attention(q, k, v, mask, bias, scale=8**-0.5, block_q=16, block_kv=16)
        return jnp.sum(out * d_out), out

    with jax.enable_x64(x64):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)
    oracle_args = (as64(q), as64(k), as64(v))
    oracle_kwargs = dict(mask=mask.dense(37, 45), bias=as64(bias), scale=8**-0.5)
    expected_out = attention_reference(*oracle_args, **oracle_kwargs)
    expected = attention_vjp_reference(*oracle_args, as64(d_out), **oracle_kwargs)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected_out, atol=5e-5, rtol=5e-5, err_msg="forward")
    for name, got in zip("qkv", grads[:3], strict=True):
        np.testing.assert_allclose(got, expected[name], atol=2e-4, rtol=2e-4, err_msg=name)
    np.testing.assert_allclose(grads[3], expected["bias"], atol=2e-4, rtol=2e-4, err_msg="bias")


def test_chunked_inside_a_shard_map_that_checks_varying_axes():
    """Inside ``jax.shard_map`` with its default ``check_vma=True``, chunked's zero-filled loop carries
    were typed as the same on every device while the loop bodies made them vary: a TypeError."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    rng = np.random.default_rng(16)
    q, k, v, d_out = make_inputs(rng, (4,), 40, 40, 2, 1, 8, 8, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(4, 2, 40, 40)), jnp.float32)
    lengths = jnp.array([40, 17, 3, 0])

    def loss(implementation):
        def attend(q, k, v, bias, lengths, d_out):
            mask = masks.causal() & masks.padding(lengths)
            out = jattn.attention(q, k, v, mask=mask, bias=bias, implementation=implementation)
            return jnp.sum(out * d_out)

        return attend

    batch = jax.sharding.PartitionSpec("data")
    grads = jax.grad(loss("chunked"), argnums=(0, 1, 2, 3))  # of one shard's loss: its share of the gradients
    per_shard = jax.shard_map(grads, mesh=mesh, in_specs=batch, out_specs=batch)
    got_grads = jax.jit(per_shard)(q, k, v, bias, lengths, d_out)
    expected = jax.grad(loss("xla"), argnums=(0, 1, 2, 3))(q, k, v, bias, lengths, d_out)
    for name, got, want in zip(("q", "k", "v", "bias"), got_grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=name)
