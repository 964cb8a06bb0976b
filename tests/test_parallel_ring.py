"""Ring attention on the 4-device CPU mesh equals single-device attention and the float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import masks
from jattn.core.chunked import chunked_attention
from jattn.parallel import make_mesh, ring_attention, sharding
from jattn.reference import attention_reference, attention_vjp_reference

NUM_DEVICES = 4
TOLERANCE = {"out": 2e-5, "grad": 1e-4}


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < NUM_DEVICES:
        pytest.skip(f"needs {NUM_DEVICES} devices (tests/conftest.py sets XLA_FLAGS)")
    return make_mesh({"seq": NUM_DEVICES}, devices=jax.devices()[:NUM_DEVICES])


def _inputs(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, num_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
    d_out = rng.standard_normal((batch, q_len, num_heads, head_dim)).astype(np.float32)
    return q, k, v, d_out


def _segment_ids(seed, batch, length):
    """Packed sequences: sorted random segment ids per batch row."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, 4, (batch, length)), axis=-1).astype(np.int32)


def _dense(mask, batch, q_len, kv_len):
    """bool [B|1, 1, T, S] for the oracle (None without a mask)."""
    if mask is None:
        return None
    allowed = np.asarray(mask.dense(q_len, kv_len))
    return allowed.reshape((-1, 1, q_len, kv_len)) if allowed.ndim == 3 else allowed


def _check_against_oracle(mesh, q, k, v, d_out, mask, **options):
    q_len, kv_len = q.shape[1], k.shape[1]
    dense = _dense(mask, q.shape[0], q_len, kv_len)

    def loss(q, k, v):
        out = ring_attention(q, k, v, mesh=mesh, axis_name="seq", mask=mask, **options)
        return jnp.sum(out * d_out), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, attention_reference(q, k, v, mask=dense), atol=TOLERANCE["out"])
    expected = attention_vjp_reference(q, k, v, d_out, mask=dense)
    for name, grad in zip("qkv", grads, strict=True):
        np.testing.assert_allclose(grad, expected[name], atol=TOLERANCE["grad"], err_msg=f"d{name}")
    return out


# Each case compiles a forward and backward ring (about 10 s of CPU): two run by default, the
# rest with `make test-slow`.
_slow = pytest.mark.slow
CASES = {
    "causal": (lambda b, t: masks.causal(), {}),
    "segments_causal": (lambda b, t: masks.segments(_segment_ids(1, b, t)) & masks.causal(), {}),
    "full": pytest.param(lambda b, t: None, {}, marks=_slow),
    "causal_contiguous": pytest.param(lambda b, t: masks.causal(), {"load_balance": False}, marks=_slow),
    "sliding_window": pytest.param(lambda b, t: masks.sliding_window(5), {}, marks=_slow),
    "symmetric_window": pytest.param(lambda b, t: masks.sliding_window(3, 9), {}, marks=_slow),
    "segments": pytest.param(lambda b, t: masks.segments(_segment_ids(2, b, t)), {}, marks=_slow),
    "causal_xla": pytest.param(lambda b, t: masks.causal(), {"implementation": "xla"}, marks=_slow),
}


@pytest.mark.parametrize(("make_mask", "options"), list(CASES.values()), ids=list(CASES))
def test_ring_matches_oracle_forward_and_gradients(mesh, make_mask, options):
    q, k, v, d_out = _inputs(0, batch=2, q_len=64, kv_len=64, num_heads=4, num_kv_heads=2)
    _check_against_oracle(mesh, q, k, v, d_out, make_mask(2, 64), **options)


def test_flash_per_shard_compute_matches_oracle(mesh):
    """The Pallas flash kernel (interpreted on CPU) as the per-shard compute: causal, zig-zag, GQA;
    chunks of 8 positions are rounded up to the kernel's 16-position tiles (padding never attended)."""
    q, k, v, d_out = _inputs(6, batch=1, q_len=64, kv_len=64, num_heads=2, num_kv_heads=1)
    _check_against_oracle(mesh, q, k, v, d_out, masks.causal(), implementation="flash")


@pytest.mark.parametrize("q_len", [61, pytest.param(70, marks=_slow)])
def test_lengths_that_do_not_divide_are_padded(mesh, q_len):
    q, k, v, d_out = _inputs(1, batch=1, q_len=q_len, kv_len=q_len, num_heads=2, num_kv_heads=1)
    _check_against_oracle(mesh, q, k, v, d_out, masks.causal(), pad=True)


@pytest.mark.parametrize("implementation", ["chunked", "flash"])
def test_nan_in_keys_only_padded_query_rows_reach_stays_out(mesh, implementation):
    """T = 30 padded to 32: under a causal mask the padded rows 30 and 31 reach keys 30 and 31, which
    no real query attends. NaN there (an unfilled KV cache) had reached real rows through 0 · NaN."""
    q, k, v, d_out = _inputs(10, batch=1, q_len=30, kv_len=66, num_heads=2, num_kv_heads=1)
    unattended = (np.arange(66) >= 30)[None, :, None, None]
    k, v = np.where(unattended, np.nan, k), np.where(unattended, np.nan, v)
    _check_against_oracle(mesh, q, k, v, d_out, masks.causal(), pad=True, implementation=implementation)


def test_cross_attention_lengths_and_multi_query(mesh):
    q, k, v, d_out = _inputs(2, batch=1, q_len=32, kv_len=48, num_heads=4, num_kv_heads=1)
    _check_against_oracle(mesh, q, k, v, d_out, None)


@pytest.mark.slow
def test_many_tiles_per_shard_and_batch_axis():
    """Chunks longer than one tile (several tiles per ring step), batch split over a second axis."""
    if jax.device_count() < NUM_DEVICES:
        pytest.skip("needs 4 devices")
    mesh2 = make_mesh({"data": 2, "seq": 2}, devices=jax.devices()[:4])
    q, k, v, d_out = _inputs(3, batch=2, q_len=2 * 2 * 1040, kv_len=2 * 2 * 1040, num_heads=1, num_kv_heads=1)
    out = ring_attention(q, k, v, mesh=mesh2, axis_name="seq", mask=masks.causal(), batch_axis="data")
    expected = jattn.attention(q, k, v, mask=masks.causal(), implementation="chunked")
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_chunks_without_a_good_divisor_are_padded_to_even_tiles():
    """A prime chunk of 521 has no divisor but 1 up to 512; it is padded to two tiles of 264 (1x1
    tiles ran 8-13x slower). Chunks with a divisor of at least 128 keep their length."""
    from jattn.parallel.ring import _chunk_tiles

    assert _chunk_tiles(521) == (528, 264) and _chunk_tiles(1031) == (1032, 344)
    assert _chunk_tiles(1040) == (1040, 260) and _chunk_tiles(1024) == (1024, 512)
    assert _chunk_tiles(300) == (300, 300) and _chunk_tiles(7) == (7, 7)


def test_prime_chunks_padded_to_even_tiles_match_the_oracle():
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    mesh2 = make_mesh({"seq": 2}, devices=jax.devices()[:2])
    q, k, v, d_out = _inputs(
        9, batch=1, q_len=1042, kv_len=1042, num_heads=1, num_kv_heads=1
    )  # chunks of 521
    _check_against_oracle(mesh2, q, k, v, d_out, masks.causal(), pad=True)


def test_padding_on_a_two_axis_mesh_keeps_gradients_upstream_exact():
    """T = 23 over data x seq (2 x 2) with learned positions gathered upstream and a residual: XLA
    had carried the ring's sequence sharding back through the padding onto the uneven unpadded
    length, and the positions' gradient took a padding row into row 0 (NaN or off by ~6)."""
    if jax.device_count() < NUM_DEVICES:
        pytest.skip("needs 4 devices")
    mesh2 = make_mesh({"data": 2, "seq": 2}, devices=jax.devices()[:4])
    batch, length, heads, head_dim = 4, 23, 2, 4
    width = heads * head_dim
    rng = np.random.default_rng(0)
    params = {
        "positions": rng.standard_normal((length, width)).astype(np.float32),
        "w": (rng.standard_normal((width, width)) / 3).astype(np.float32),
    }
    x = rng.standard_normal((batch, length, width)).astype(np.float32)

    def loss(params, x, ring):
        h = x + jnp.take(params["positions"], jnp.arange(length), axis=0)  # [B, T, D]
        q = (h @ params["w"]).reshape(batch, length, heads, head_dim)
        if ring:
            out = ring_attention(
                q, q, q, mesh=mesh2, axis_name="seq", mask=masks.causal(), pad=True, batch_axis="data"
            )
        else:
            out = jattn.attention(q, q, q, mask=masks.causal())
        return jnp.sum(jnp.sin(out.reshape(batch, length, width) + h))

    expected = jax.grad(loss)(params, x, False)
    with jax.set_mesh(mesh2):
        got = jax.jit(jax.grad(loss), static_argnums=2)(
            params, jax.device_put(x, sharding(mesh2, "data")), True
        )
    for name in params:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, err_msg=name)


def test_explicit_axes_of_jax_make_mesh(mesh):
    """``jax.make_mesh`` makes Explicit axes, where shard_map wants inputs already in its specs:
    unsharded inputs, batch split over a second axis, padding, gradients, and the ring variant."""
    explicit = jax.make_mesh((2, 2), ("data", "seq"), devices=jax.devices()[:NUM_DEVICES])
    assert jax.sharding.AxisType.Explicit in explicit.axis_types
    q, k, v, d_out = _inputs(8, batch=2, q_len=24, kv_len=24, num_heads=2, num_kv_heads=1)
    mask = masks.causal() & masks.padding(np.array([24, 17]))
    unsharded = ring_attention(q, k, v, mesh=explicit, axis_name="seq", batch_axis="data", mask=mask)
    np.testing.assert_allclose(
        unsharded, attention_reference(q, k, v, mask=_dense(mask, 2, 24, 24)), atol=2e-5
    )
    with jax.set_mesh(explicit):  # JAX wants the mesh in context for a loss over explicitly sharded arrays
        _check_against_oracle(explicit, q, k, v, d_out, mask, batch_axis="data")
        in_context = jattn.attention(q, k, v, mask=mask, implementation="ring")
    np.testing.assert_allclose(in_context, unsharded, atol=1e-6)


@pytest.mark.slow
def test_equals_single_device_attention_on_sharded_inputs(mesh):
    q, k, v, _ = _inputs(4, batch=2, q_len=64, kv_len=64, num_heads=2, num_kv_heads=2)
    q, k, v = (jax.device_put(x, sharding(mesh, None, "seq")) for x in (q, k, v))
    out = ring_attention(q, k, v, mesh=mesh, axis_name="seq", mask=masks.causal())
    np.testing.assert_allclose(out, jattn.attention(q, k, v, mask=masks.causal()), atol=2e-6)


@pytest.mark.slow
def test_bfloat16_keeps_dtype_and_stays_close(mesh):
    q, k, v, _ = _inputs(5, batch=1, q_len=64, kv_len=64, num_heads=2, num_kv_heads=2)
    q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out = ring_attention(q16, k16, v16, mesh=mesh, axis_name="seq", mask=masks.causal())
    assert out.dtype == jnp.bfloat16
    expected = attention_reference(
        q16.astype(np.float32),
        k16.astype(np.float32),
        v16.astype(np.float32),
        mask=masks.causal().dense(64, 64),
    )
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2)


def test_fully_masked_rows_are_zero_without_nan(mesh):
    """Rows past the padding length attend nothing: zeros and zero gradients, never NaN."""
    q, k, v, d_out = _inputs(6, batch=2, q_len=32, kv_len=32, num_heads=2, num_kv_heads=2)
    mask = masks.padding(np.array([20, 32]))
    out = _check_against_oracle(mesh, q, k, v, d_out, mask)
    assert np.all(np.asarray(out)[0, 20:] == 0)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_memory_per_device_scales_with_the_shard_not_the_sequence(mesh):
    """Compiled per-device temporaries of ring attention (forward and backward) at length L on D
    devices are about those of single-device chunked attention at L / D, far below chunked at L."""
    length, num_heads, head_dim = 8192, 4, 64
    spec = jax.ShapeDtypeStruct((1, length, num_heads, head_dim), jnp.float32)
    shard_spec = jax.ShapeDtypeStruct((1, length // NUM_DEVICES, num_heads, head_dim), jnp.float32)
    seq = sharding(mesh, None, "seq")
    sharded_spec = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=seq)

    def ring_loss(q, k, v):
        return ring_attention(q, k, v, mesh=mesh, axis_name="seq", mask=masks.causal()).sum()

    def chunked_loss(q, k, v):
        return chunked_attention(q, k, v, masks.causal(), None, scale=0.1).sum()

    grad = lambda f: jax.grad(f, argnums=(0, 1, 2))  # noqa: E731
    ring = _temp_bytes(grad(ring_loss), sharded_spec, sharded_spec, sharded_spec)
    single_shard = _temp_bytes(grad(chunked_loss), shard_spec, shard_spec, shard_spec)
    single_full = _temp_bytes(grad(chunked_loss), spec, spec, spec)
    # Ring keeps a second key/value block in flight and float32 accumulators: within 2.5x of the
    # shard's chunked temporaries, and below the full sequence's (benchmarks/ring.py: ~1.5x, ~0.65x).
    assert ring < 2.5 * single_shard, (ring, single_shard)
    assert ring < single_full, (ring, single_full)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_length_that_does_not_divide_without_pad_names_the_argument(mesh):
    q, k, v, _ = _inputs(0, batch=1, q_len=30, kv_len=30, num_heads=1, num_kv_heads=1)
    with pytest.raises(ValueError, match=r"q.shape\[-3\]=30 .*divisible by 8.*pad=True"):
        ring_attention(q, k, v, mesh=mesh, axis_name="seq", mask=masks.causal())


def test_unknown_axis_name(mesh):
    q, k, v, _ = _inputs(0, batch=1, q_len=32, kv_len=32, num_heads=1, num_kv_heads=1)
    with pytest.raises(ValueError, match=r"axis_name='sequence' is not an axis of the mesh.*\('seq',\)"):
        ring_attention(q, k, v, mesh=mesh, axis_name="sequence")


def test_mismatched_shardings_of_q_and_kv(mesh):
    q, k, v, _ = _inputs(0, batch=1, q_len=32, kv_len=32, num_heads=1, num_kv_heads=1)
    q = jax.device_put(q, sharding(mesh, None, "seq"))
    k, v = (jax.device_put(x, sharding(mesh)) for x in (k, v))
    with pytest.raises(ValueError, match="sharded alike along the sequence.*q: 'seq', k: None"):
        ring_attention(q, k, v, mesh=mesh, axis_name="seq")


def test_second_derivatives_raise_a_clear_error(mesh):
    q, k, v, _ = _inputs(0, batch=1, q_len=32, kv_len=32, num_heads=1, num_kv_heads=1)

    def squared_grad(x):
        attend = lambda y: ring_attention(y, k, v, mesh=mesh, axis_name="seq", mask=masks.causal()).sum()  # noqa: E731
        return jnp.sum(jax.grad(attend)(x) ** 2)

    with pytest.raises(NotImplementedError, match="implementation='ring' has first-order gradients only"):
        jax.grad(squared_grad)(q)


def test_dense_array_mask_and_unknown_implementation_are_refused(mesh):
    q, k, v, _ = _inputs(0, batch=1, q_len=32, kv_len=32, num_heads=1, num_kv_heads=1)
    with pytest.raises(NotImplementedError, match="dense boolean array"):
        ring_attention(q, k, v, mesh=mesh, axis_name="seq", mask=np.ones((32, 32), bool))
    with pytest.raises(NotImplementedError, match="implementation='magic'"):
        ring_attention(q, k, v, mesh=mesh, axis_name="seq", implementation="magic")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        ring_attention(q, k, v, mesh="seq", axis_name="seq")
    with pytest.raises(TypeError, match="load_balance must be a bool or None.*load_balance='no'"):
        ring_attention(q, k, v, mesh=mesh, axis_name="seq", load_balance="no")
    with pytest.raises(TypeError, match="pad a bool.*pad=1"):
        ring_attention(q, k, v, mesh=mesh, axis_name="seq", pad=1)
