"""The built-in pure-JAX implementations against the float64 oracle (the shared suite)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_suite import AttentionSuite, as64, make_inputs
from jattn import masks
from jattn.core.chunked import chunked_attention
from jattn.reference import attention_vjp_reference


class TestXla(AttentionSuite):
    implementation = "xla"


class TestChunked(AttentionSuite):
    implementation = "chunked"
    second_order = False


@pytest.mark.parametrize("bias_shape", [(1, 2, 37, 45), (1, 2, 1, 45)], ids=["per_head", "per_key"])
def test_chunked_bias_gradient_across_several_key_tiles(bias_shape):
    """At the default blocks a short sequence is one key tile; with tiles of 16, dbias is gathered
    from three key tiles (the last ragged), each at its own offset."""
    rng = np.random.default_rng(3)
    q, k, v, d_out = make_inputs(rng, (2,), 37, 45, 2, 1, 8, 8, jnp.float32)
    bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
    mask = masks.sliding_window(20, 4)

    def loss(q, k, v, bias):
        out = chunked_attention(q, k, v, mask, bias, scale=8**-0.5, block_q=16, block_kv=16)
        return jnp.sum(out * d_out)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    expected = attention_vjp_reference(
        as64(q), as64(k), as64(v), as64(d_out), mask=mask.dense(37, 45), bias=as64(bias)
    )
    for name, got in zip("qkv", grads[:3], strict=True):
        np.testing.assert_allclose(got, expected[name], atol=2e-4, rtol=2e-4, err_msg=name)
    np.testing.assert_allclose(grads[3], expected["bias"], atol=2e-4, rtol=2e-4, err_msg="bias")
