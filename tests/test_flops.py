"""jattn.flops.matmul_flops: known counts for products, loops, branches, nesting and gradients; refusals."""

import jax
import jax.numpy as jnp
import pytest

from jattn import flops

A = jax.ShapeDtypeStruct((8, 16), jnp.float32)
B = jax.ShapeDtypeStruct((16, 4), jnp.float32)
PRODUCT = 2 * 8 * 16 * 4


def test_a_product_and_a_batched_einsum():
    assert flops.matmul_flops(jnp.matmul, A, B) == PRODUCT
    x = jax.ShapeDtypeStruct((3, 5, 7), jnp.float32)  # [batch, T, H]
    y = jax.ShapeDtypeStruct((3, 9, 7), jnp.float32)  # [batch, S, H]
    assert flops.matmul_flops(lambda x, y: jnp.einsum("bth,bsh->bts", x, y), x, y) == 2 * 3 * 5 * 9 * 7


def test_scan_bodies_count_once_per_step_and_nesting_is_entered():
    def scanned(a, b):
        step = jax.checkpoint(lambda carry, _: (carry, jax.jit(jnp.matmul)(a, b)))
        return jax.lax.scan(step, 0.0, None, length=6)[1]

    assert flops.matmul_flops(scanned, A, B) == 6 * PRODUCT
    mapped = jax.ShapeDtypeStruct((10, 8, 16), jnp.float32)
    assert (
        flops.matmul_flops(lambda xs, b: jax.lax.map(lambda x: x @ b, xs, batch_size=4), mapped, B)
        == 10 * PRODUCT
    )


def test_cond_counts_its_costliest_branch():
    def branchy(flag, a, b):
        return jax.lax.cond(flag, lambda: (a @ b) @ b.T, lambda: jnp.zeros((8, 16)))

    assert flops.matmul_flops(branchy, True, A, B) == PRODUCT + 2 * 8 * 4 * 16


def test_gradients_of_a_product_cost_three_products():
    assert flops.matmul_flops(jax.grad(lambda a, b: (a @ b).sum(), argnums=(0, 1)), A, B) == 3 * PRODUCT


def test_loops_without_a_trip_count_are_refused():
    def dynamic(n, a, b):
        return jax.lax.fori_loop(0, n, lambda i, acc: acc + a @ b, jnp.zeros((8, 4)))

    with pytest.raises(ValueError, match="cannot count 'while'"):
        flops.matmul_flops(dynamic, 3, A, B)
