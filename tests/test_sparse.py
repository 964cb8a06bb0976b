"""The exact sparse implementations "banded" and "block_sparse": the shared suite against the float64
oracle, their own edge cases, what they refuse, and proof that they are sub-quadratic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from attention_suite import MASK_CASES, AttentionSuite, make_inputs, oracle_mask
from jattn import flops, masks, reference
from jattn.core import sparse

BANDED_MASKS = ("sliding_window", "causal_window", "global_tokens", "longformer", "window_or_global")
UNSTRUCTURED_MASKS = ("none", "causal", "padding", "causal_padding", "segments", "prefix_lm", "array")


class TestBanded(AttentionSuite):
    implementation = "banded"
    supported_masks = BANDED_MASKS
    max_examples = 3
    dtypes = ("float32", "bfloat16")

    @pytest.mark.parametrize(
        "mask",
        [
            masks.sliding_window(5) & masks.padding(np.array([20, 29]), np.array([13, 25])),
            masks.longformer(3, [0, 4, 27]) & masks.padding(np.array([20, 29]), np.array([13, 25])),
        ],
        ids=["window&padding", "longformer&padding"],
    )
    def test_window_with_nan_padding(self, mask):
        rng = np.random.default_rng(11)
        q, k, v, d_out = make_inputs(rng, (2,), 29, 29, 4, 2, 8, 8, jnp.float32)
        q_pad = (np.arange(29)[None, :] >= np.array([20, 29])[:, None])[..., None, None]  # [B, T, 1, 1]
        kv_pad = (np.arange(29)[None, :] >= np.array([13, 25])[:, None])[..., None, None]
        q, k, v = jnp.where(q_pad, jnp.nan, q), jnp.where(kv_pad, jnp.nan, k), jnp.where(kv_pad, jnp.nan, v)
        out, grads = self.check_against_oracle(q, k, v, d_out, mask=mask)
        assert np.isfinite(np.asarray(out)).all() and all(np.isfinite(np.asarray(g)).all() for g in grads[:3])

    @pytest.mark.parametrize(
        "mask",
        [
            masks.sliding_window(100, 100),  # wider than the sequence
            masks.causal() & masks.sliding_window(6, 6),  # the intersection is the causal window
            masks.global_tokens([2, 30]) & masks.causal(),  # no band at all, only global tokens
            masks.BlockWindow(8, 1) & masks.causal(),  # BigBird's block window is a band
            masks.sliding_window(3, 1) & masks.segments(np.repeat(np.arange(4), 10)[None]),
            masks.bigbird(8, num_random=0),  # a block window and global tokens
        ],
        ids=["wide", "causal&window", "globals_only", "block_window", "window&segments", "bigbird_no_random"],
    )
    def test_band_edge_cases(self, mask):
        rng = np.random.default_rng(12)
        q, k, v, d_out = make_inputs(rng, (1,), 40, 40, 2, 1, 8, 8, jnp.float32)
        self.check_against_oracle(q, k, v, d_out, mask=mask)

    @pytest.mark.parametrize("mask_name", sorted(set(MASK_CASES) - set(BANDED_MASKS)))
    def test_refuses_masks_outside_a_band(self, mask_name):
        rng = np.random.default_rng(13)
        q, k, v, _ = make_inputs(rng, (2,), 16, 16, 2, 2, 8, 8, jnp.float32)
        mask = MASK_CASES[mask_name](rng, (2,), 16, 16)
        with pytest.raises(NotImplementedError, match="implementation='banded' cannot run this call"):
            self.attend(q, k, v, mask=mask)


class TestBlockSparse(AttentionSuite):
    implementation = "block_sparse"
    max_examples = 3
    dtypes = ("float32", "bfloat16")

    @pytest.mark.parametrize(
        "mask_name",
        [pytest.param(name, marks=[pytest.mark.slow] * (name in UNSTRUCTURED_MASKS)) for name in MASK_CASES],
    )
    def test_each_mask_with_gqa_and_odd_lengths(self, mask_name):
        """Masks with no block structure to skip run in the slow suite (the random test still draws them)."""
        super().test_each_mask_with_gqa_and_odd_lengths(mask_name)

    @pytest.mark.parametrize("length", [63, 200])
    def test_bigbird_lengths_off_the_block(self, length):
        rng = np.random.default_rng(length)
        q, k, v, d_out = make_inputs(rng, (1,), length, length, 2, 2, 8, 8, jnp.float32)
        self.check_against_oracle(q, k, v, d_out, mask=masks.bigbird(16, num_random=2, seed=3))


GROUPED_CASES = pytest.mark.parametrize(
    "implementation, mask",
    [("banded", masks.longformer(5, [0, 9])), ("block_sparse", masks.bigbird(8, num_random=1, seed=2))],
    ids=["banded", "block_sparse"],
)


@pytest.fixture
def small_query_groups(monkeypatch):
    """Inputs whose query blocks run a couple at a time (``lax.map``), with a shorter last group, as
    long inputs do: 4 heads (batch 2 × 2 heads); banded runs 2 of its 5 blocks of 16 × 28 keys per
    step, then 1."""
    monkeypatch.setitem(sparse._LOGITS_PER_STEP, "cpu", 4 * 2 * 16 * 30)
    jax.clear_caches()  # attention() is jitted: retrace under the small group size
    yield make_inputs(np.random.default_rng(14), (2,), 75, 75, 2, 1, 8, 8, jnp.float32)
    jax.clear_caches()


@GROUPED_CASES
def test_query_blocks_processed_in_groups_match_the_oracle(small_query_groups, implementation, mask):
    suite = TestBanded() if implementation == "banded" else TestBlockSparse()
    q, k, v, d_out = small_query_groups
    jaxpr = jax.make_jaxpr(lambda *qkv: jattn.attention(*qkv, mask=mask, implementation=implementation))
    assert "scan" in str(jaxpr(q, k, v)), "the grouped path was not taken"
    suite.check_against_oracle(q, k, v, d_out, mask=mask)


@pytest.mark.slow
@GROUPED_CASES
def test_second_derivatives_through_query_groups(small_query_groups, implementation, mask):
    """Grad of grad through the groups' ``jax.checkpoint`` inside ``lax.map`` equals plain autodiff."""
    q, k, v, _ = small_query_groups

    def squared_grad(implementation):
        attend = lambda x: jattn.attention(x, k, v, mask=mask, implementation=implementation).sum()  # noqa: E731
        return lambda x: jnp.sum(jax.grad(attend)(x) ** 2)

    expected = jax.grad(squared_grad("xla"))(q)
    np.testing.assert_allclose(jax.grad(squared_grad(implementation))(q), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "implementation, mask",
    [
        # buckets of 1 and 4 key blocks and a query block row with none (block 32 is chosen at T = 96)
        ("block_sparse", masks.from_blocks([[1, 0, 0], [0, 0, 0], [1, 1, 1]], 32)),
        ("banded", masks.longformer(5, [0, 9])),  # global query rows, attended densely
    ],
    ids=["block_sparse", "banded"],
)
def test_batch_sharded_over_an_explicit_mesh(implementation, mask):
    """On a mesh with Explicit axes JAX must infer every result's sharding: the output assembled by
    scattering query block rows (or global query rows) into an unsharded ``jnp.zeros`` had none it
    could infer for batch-sharded inputs, forward without ``jax.set_mesh``, gradient with it."""
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    batch_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    inputs = make_inputs(np.random.default_rng(15), (4,), 96, 96, 2, 1, 8, 8, jnp.float32)
    q, k, v, d_out = (jax.device_put(x, batch_sharded) for x in inputs)

    def forward_and_grads(implementation):
        def loss(q, k, v, d_out):
            out = jattn.attention(q, k, v, mask=mask, implementation=implementation)
            return jnp.sum(out * d_out), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    with jax.set_mesh(mesh):
        (_, out), grads = forward_and_grads(implementation)(q, k, v, d_out)
        (_, expected), expected_grads = forward_and_grads("xla")(q, k, v, d_out)
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5, err_msg="forward")
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
    unset_mesh_out = jattn.attention(q, k, v, mask=mask, implementation=implementation)
    np.testing.assert_allclose(unset_mesh_out, expected, atol=1e-5, rtol=1e-5, err_msg="without set_mesh")


@pytest.mark.parametrize("implementation", ["banded", "block_sparse"])
def test_16_bit_key_gradients_sum_their_tiles_in_float32(implementation):
    """A global key is gathered by every query block, so its dk and dv add up one part per tile. Summed in
    bfloat16 (the gathers' own scatter-add), dv had 1.8x XLA's error against the float64 oracle; summed
    in float32, 1.0-1.3x (each tile's part is still rounded to bfloat16 once)."""
    mask = masks.longformer(16, [0, 1])
    q, k, v, d_out = make_inputs(np.random.default_rng(16), (1,), 512, 512, 2, 1, 32, 32, jnp.float32)
    dense_mask = oracle_mask(mask, (1,), 2, 512, 512)
    expected = reference.attention_vjp_reference(q, k, v, d_out, mask=dense_mask)

    def global_key_errors(implementation):  # relative errors of dk, dv at the two global keys
        def loss(k, v):
            out = jattn.attention(q.astype(jnp.bfloat16), k, v, mask=mask, implementation=implementation)
            return jnp.sum(out.astype(jnp.float32) * d_out)

        grads = jax.grad(loss, argnums=(0, 1))(k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
        return [
            np.linalg.norm(np.asarray(got, np.float64)[:, :2] - expected[name][:, :2])
            / np.linalg.norm(expected[name][:, :2])
            for name, got in zip("kv", grads, strict=True)
        ]

    ratios = np.divide(global_key_errors(implementation), global_key_errors("xla"))
    assert (ratios < 1.5).all(), f"dk, dv error / XLA's: {ratios}"


# ---------------------------------------------------------------------------------------------
# The plans
# ---------------------------------------------------------------------------------------------


def test_mask_band_combinations():
    band = sparse.mask_band
    assert band(masks.sliding_window(4, 2), 64, 64) == sparse.Band(4, 2)
    assert band(masks.longformer(8, [0, 3]), 64, 64) == sparse.Band(8, 8, frozenset({0, 3}))
    assert band(masks.causal() & masks.sliding_window(5, 5), 64, 64) == sparse.Band(5, 0)
    assert band(masks.padding(np.array([3])) & masks.sliding_window(2), 64, 64) == sparse.Band(2, 0)
    assert not band(masks.causal(), 64, 64).bounded
    assert not band(masks.sliding_window(2) | masks.padding(np.array([3])), 64, 64).bounded
    assert not band(~masks.sliding_window(2), 64, 64).bounded


def test_block_buckets_keep_a_dense_row_from_widening_the_others():
    layout = np.zeros((8, 8), np.int8)
    layout[np.arange(8), np.arange(8)] = masks.FULL  # the diagonal ...
    layout[0] = masks.PARTIAL  # ... and one global row
    buckets = sparse.block_buckets(layout)
    assert [b.kv_blocks.shape for b in buckets] == [(7, 1), (1, 8)]
    assert sparse.gathered_area(buckets, 16) == (7 + 8) * 16 * 16
    rows_of_3_and_4 = np.zeros((2, 8), np.int8)
    rows_of_3_and_4[0, :3] = rows_of_3_and_4[1, :4] = masks.FULL
    assert [b.kv_blocks.shape for b in sparse.block_buckets(rows_of_3_and_4)] == [(2, 4)]  # 3 rounds up to 4


def test_block_sparse_takes_the_largest_tile_within_the_slack_of_the_best():
    """sliding_window(100) at 512 gathers 109568 logits with 32-tiles, 110592 with 64 and 114688 with
    128: within 1.25x of the best, the largest tile (fewest, longest gathers) is taken."""
    block, layout = sparse.choose_layout(masks.sliding_window(100), 512, 512)
    assert block == 128 and layout.shape == (4, 4)
    assert sparse.gathered_area(sparse.block_buckets(layout), 128) == 114688


@pytest.mark.parametrize(
    "mask",
    [
        masks.causal(),
        masks.sliding_window(40),
        masks.strided(24),
        masks.random_blocks(16, 2),
        masks.from_fn(lambda q, k: (q + k) % 50 < 7),
        masks.padding(np.array([150, 90])),
    ],
    ids=["causal", "window", "strided", "random_blocks", "from_fn", "padding"],
)
@pytest.mark.parametrize("q_len, kv_len", [(200, 200), (97, 300)])
def test_layouts_grouped_into_larger_tiles_equal_the_masks_own(mask, q_len, kv_len):
    """block_sparse evaluates the mask once, at 32-tiles, and groups that layout into 64- and
    128-tiles to choose among them; the groups must be the layouts the mask itself gives there."""
    mask = mask.for_lengths(q_len, kv_len)
    fine = mask.blocks(q_len, kv_len, 32, 32)
    for factor in (1, 2, 4):
        block = 32 * factor
        expected = mask.blocks(q_len, kv_len, block, block)
        np.testing.assert_array_equal(sparse.coarser_layout(fine, factor), expected, err_msg=f"{block}")


def test_auto_choice_picks_the_sparse_implementations():
    q = jnp.zeros((1, 2048, 1, 8))
    assert jattn.explain(q, q, q, mask=masks.sliding_window(64, 64)).implementation == "banded"
    assert jattn.explain(q, q, q, mask=masks.bigbird(64)).implementation == "block_sparse"


# ---------------------------------------------------------------------------------------------
# Sub-quadratic for real: compiled memory and FLOPs at a moderate size
# ---------------------------------------------------------------------------------------------


def _fwd_bwd(implementation, mask):
    def loss(q, k, v):
        return jattn.attention(q, k, v, mask=mask, implementation=implementation).sum()

    return jax.grad(loss, argnums=(0, 1, 2))


def _shape(length):
    return jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)  # [B, T, N, H]


@pytest.mark.parametrize(
    "implementation, make_mask",
    [
        ("banded", lambda length: masks.longformer(32, [0])),
        ("block_sparse", lambda length: masks.bigbird(32, num_random=1)),
    ],
    ids=["banded", "block_sparse"],
)
def test_no_quadratic_array_and_linear_flops(implementation, make_mask):
    lengths = (2048, 4096)
    grads = [_fwd_bwd(implementation, make_mask(n)) for n in lengths]
    short, long = (jax.jit(g).lower(*[_shape(n)] * 3).compile() for g, n in zip(grads, lengths, strict=True))
    temp_bytes = [c.memory_analysis().temp_size_in_bytes for c in (short, long)]
    assert temp_bytes[1] < 4 * 4096 * 4096 / 2  # below half of one float32 [T, S] array
    assert "4096,4096" not in long.as_text()  # no [T, S] array anywhere in the program
    assert temp_bytes[1] / temp_bytes[0] < 2.3  # doubling the length at most doubles the memory ...
    work = [flops.matmul_flops(g, *[_shape(n)] * 3) for g, n in zip(grads, lengths, strict=True)]
    assert 1.8 < work[1] / work[0] < 2.3  # ... and doubles the work (loops counted step by step)
