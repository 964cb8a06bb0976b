"""Masks: dense views, block layouts, combinators and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jattn
from jattn import masks
from jattn.masks import EMPTY, FULL, PARTIAL, _layout_from_predicate

POSITION_MASKS = {
    "full": masks.full(),
    "causal": masks.causal(),
    "window": masks.sliding_window(5, 3),
    "window_left": masks.sliding_window(7),
    "window_zero": masks.sliding_window(0, 0),
    "prefix_lm": masks.prefix_lm(6),
    "strided": masks.strided(4),
    "strided_bidirectional": masks.strided(4, causal=False),
    "fixed": masks.fixed(8, 2),
    "fixed_bidirectional": masks.fixed(8, 2, causal=False),
    "global": masks.global_tokens([0, 9]),
    "longformer": masks.longformer(3, [0]),
    "bigbird": masks.bigbird(4, num_random=1),
    "random_blocks": masks.random_blocks(4, 2, seed=3),
    "random_blocks_odd": masks.random_blocks(3, 2, seed=1),  # blocks that tiles do not align with
    "random_blocks_none": masks.random_blocks(4, 0),
    "from_blocks": masks.from_blocks(np.random.default_rng(0).random((24, 14)) < 0.5, 3, 5),
    "from_fn": masks.from_fn(lambda q, k: (q + k) % 5 == 0),
    "and": masks.causal() & masks.sliding_window(6, 6),
    "or": masks.sliding_window(1, 1) | masks.global_tokens([3]),
    "not": ~masks.causal(),
}


def dense_layout(dense, block_q, block_kv):
    """Layout straight from a dense [T, S] matrix, the slow and obvious way."""
    q_len, kv_len = dense.shape
    rows = []
    for i in range(0, q_len, block_q):
        row = []
        for j in range(0, kv_len, block_kv):
            tile = dense[i : i + block_q, j : j + block_kv]
            row.append(FULL if tile.all() else PARTIAL if tile.any() else EMPTY)
        rows.append(row)
    return np.array(rows, np.int8)


@pytest.mark.parametrize("name", sorted(POSITION_MASKS))
@settings(max_examples=10, deadline=None)
@given(
    q_len=st.integers(1, 70),
    kv_len=st.integers(1, 70),
    block_q=st.sampled_from([1, 4, 8, 16]),
    block_kv=st.sampled_from([1, 4, 8, 16]),
)
def test_layout_agrees_with_dense_mask(name, q_len, kv_len, block_q, block_kv):
    mask = POSITION_MASKS[name]
    expected = dense_layout(mask.dense(q_len, kv_len), block_q, block_kv)
    layout = mask.blocks(q_len, kv_len, block_q, block_kv)
    if isinstance(mask, (masks.And, masks.Or)):
        # Combinations may say PARTIAL where the exact answer is EMPTY or FULL, never the reverse.
        assert np.all((layout == expected) | (layout == PARTIAL))
    else:
        np.testing.assert_array_equal(layout, expected)


def test_dense_patterns_by_hand():
    np.testing.assert_array_equal(masks.causal().dense(3, 3), np.tril(np.ones((3, 3), bool)))
    window = masks.sliding_window(1, 0).dense(4, 4).astype(int)
    np.testing.assert_array_equal(window, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    prefix = masks.prefix_lm(2).dense(3, 3).astype(int)
    np.testing.assert_array_equal(prefix, [[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    glob = masks.global_tokens([0]).dense(3, 3).astype(int)
    np.testing.assert_array_equal(glob, [[1, 1, 1], [1, 0, 0], [1, 0, 0]])
    fixed = masks.fixed(2, 1).dense(4, 4).astype(int)  # own block + last cell of each block, causal
    np.testing.assert_array_equal(fixed, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]])


HEAD_MASK = np.random.default_rng(0).random((2, 3, 6, 6)) > 0.3  # [B, N, T, S]


def test_strided_by_hand():
    """Child et al. 2019: the previous ``stride`` positions, and every ``stride``-th one before."""
    t, s = np.mgrid[:7, :7]
    near_or_on_stride = ((t - s) < 3) | ((t - s) % 3 == 0)
    np.testing.assert_array_equal(masks.strided(3).dense(7, 7), (t >= s) & near_or_on_stride)
    distance = np.abs(t - s)
    np.testing.assert_array_equal(
        masks.strided(3, causal=False).dense(7, 7), (distance < 3) | (distance % 3 == 0)
    )


@pytest.mark.parametrize(
    "mask",
    [
        masks.causal(),
        masks.sliding_window(3),
        masks.strided(3),
        masks.fixed(4, 2),
        masks.longformer(2, [0, 4], causal=True),
    ],
    ids=["causal", "window", "strided", "fixed", "longformer"],
)
def test_causal_builders_never_reach_the_future(mask):
    dense = mask.dense(11, 11)
    assert not np.triu(dense, 1).any()
    assert np.diag(dense).all()  # and every query sees itself


def test_causal_longformer_keeps_its_global_tokens_in_the_past():
    """Causal means the whole pattern: a global token neither reads the future nor is read by it."""
    dense = masks.longformer(2, [0, 5], causal=True).dense(8, 8)
    assert not np.triu(dense, 1).any()
    np.testing.assert_array_equal(dense[5], [1, 1, 1, 1, 1, 1, 0, 0])  # global token 5: all of its past
    np.testing.assert_array_equal(dense[:, 0], np.ones(8, bool))  # global token 0: read by everyone
    past = np.tril(np.ones((8, 8), bool))
    np.testing.assert_array_equal(dense, masks.longformer(2, [0, 5]).dense(8, 8) & past)


@pytest.mark.parametrize(
    "mask",
    [
        masks.padding(jnp.array([6, 2]), jnp.array([5, 3])),
        masks.segments(jnp.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]])),
        masks.padding(jnp.array([6, 2])) & masks.from_array(HEAD_MASK),
        ~masks.padding(jnp.array([4, 2])) | masks.causal(),
    ],
    ids=["padding", "segments", "padding_and_heads", "not_padding_or_causal"],
)
def test_dense_of_a_batch_mask_is_the_same_mask_as_an_array(mask):
    """``dense()`` is broadcastable to [B, N, T, S]: per-batch lengths and ids get a unit head axis,
    so the array means what the mask means, even where B == N or beside a per-head array."""
    dense = np.asarray(mask.dense(6, 6))
    assert dense.ndim == 4 and dense.shape[0] == 2
    q = jax.random.normal(jax.random.key(0), (2, 6, 3, 4))  # [B, T, N, H]
    np.testing.assert_array_equal(
        jattn.attention(q, q, q, mask=mask, implementation="xla"),
        jattn.attention(q, q, q, mask=dense, implementation="xla"),
    )


@pytest.mark.parametrize("implementation", ["xla", "chunked", "block_sparse"])
def test_a_window_reaching_past_int32_is_unbounded_not_wrapped(implementation):
    """``t + right`` in int32 positions would wrap for ``right = 2**31 - 1`` (and ``sys.maxsize``
    would not fit at all), leaving rows with nothing to attend."""
    x = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))
    for reach, same in [(2**31 - 1, masks.full()), (2**63 - 1, masks.full()), (1 << 30, masks.full())]:
        window = masks.sliding_window(reach, reach)
        np.testing.assert_array_equal(window.dense(8, 8), same.dense(8, 8))
        got = jattn.attention(x, x, x, mask=window, implementation=implementation)
        np.testing.assert_allclose(got, jattn.attention(x, x, x), atol=1e-6, rtol=1e-6)
    assert masks.sliding_window(2**31 - 1) == masks.sliding_window(1 << 30) == masks.causal()
    assert masks.sliding_window((1 << 30) - 1) != masks.causal()


@pytest.mark.parametrize("implementation", ["xla", "chunked", "block_sparse", "flash"])
def test_causal_with_an_offset_decodes_against_a_cache(implementation):
    """The last T queries of a causal self-attention over S positions, given the S keys and
    ``causal(offset=S - T)``, equal the last T rows of the whole: decoding with a KV cache."""
    x = jax.random.normal(jax.random.key(0), (2, 37, 4, 16))
    k = x[..., :2, :]  # GQA: two kv heads
    whole = jattn.attention(x, k, k, mask=masks.causal(), implementation="xla")
    for new in (1, 5):
        got = jattn.attention(
            x[:, -new:], k, k, mask=masks.causal(offset=37 - new), implementation=implementation
        )
        np.testing.assert_allclose(got, whole[:, -new:], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(masks.causal(offset=2).dense(2, 4), np.tril(np.ones((2, 4), bool), 2))


def test_sliding_window_layout_is_sparse_at_length():
    layout = masks.sliding_window(256).blocks(4096, 4096, 128, 128)
    causal = masks.causal().blocks(4096, 4096, 128, 128)
    assert (layout != EMPTY).sum() == 32 + 31 + 30  # a row block reaches two blocks back
    assert (causal != EMPTY).sum() == 32 * 33 // 2


def test_data_dependent_masks():
    pad = masks.padding(np.array([2, 3]), np.array([3, 1]))
    dense = np.asarray(pad.dense(4, 4))[:, 0]  # [B, 1, T, S]: one head axis, broadcast over heads
    assert dense.shape == (2, 4, 4)
    assert dense[0, :2, :3].all() and not dense[0, 2:].any() and not dense[0, :, 3:].any()
    seg = masks.segments(np.array([[0, 0, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(seg.dense(4, 4))[0, 0], np.kron(np.eye(2), np.ones((2, 2))) > 0)
    layout = (masks.causal() & pad).blocks(4, 4, 2, 2)
    np.testing.assert_array_equal(layout, [[PARTIAL, EMPTY], [PARTIAL, EMPTY]])  # no valid pair in (1, 1)


def test_data_masks_must_cover_the_lengths_they_are_viewed_at():
    """tile() clips positions past the data, so a short mask would repeat its last position."""
    seg = masks.segments(np.array([[0, 0, 1, 1]]))
    for view in (lambda m: m.dense(8, 8), lambda m: m.blocks(8, 8, 4, 4)):
        with pytest.raises(
            ValueError, match=r"q_segment_ids must have shape \[B\.\.\., 8\].*got shape \(1, 4\)"
        ):
            view(~(masks.causal() & seg))
        with pytest.raises(ValueError, match=r"mask array must end in \[T, S\] = \[8, 8\].*\(2, 4, 4\)"):
            view(masks.from_array(np.ones((2, 4, 4), bool)))
    assert masks.from_array(np.ones((3, 1, 8), bool)).dense(8, 8).shape == (3, 8, 8)  # broadcasts


def test_traced_data_masks_have_all_partial_layouts():
    def layout_under_jit(lengths):
        mask = masks.padding(lengths)
        return jnp.asarray(mask.blocks(8, 8, 4, 4))

    out = jax.jit(layout_under_jit)(jnp.array([3]))
    np.testing.assert_array_equal(out, np.full((2, 2), PARTIAL))


def test_masks_are_pytrees_and_hashable():
    assert masks.bigbird(8) == masks.bigbird(8) and hash(masks.causal()) == hash(masks.causal())
    pad = masks.padding(jnp.array([1, 2]))
    leaves = jax.tree.leaves(pad & masks.causal())
    assert len(leaves) == 2
    assert jax.tree.leaves(masks.causal()) == []


def test_truth_value_raises():
    with pytest.raises(TypeError, match="no truth value"):
        bool(masks.causal())
    with pytest.raises(TypeError, match="no truth value"):
        _ = masks.causal() and masks.full()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: masks.sliding_window(-1), "left must be an int >= 0"),
        (lambda: masks.sliding_window(2, -3), "right must be an int >= 0"),
        (lambda: masks.sliding_window(2.5), "left must be an int"),
        (lambda: masks.strided(0), "stride must be an int >= 1"),
        (lambda: masks.fixed(4, 5), "summary must be <= block"),
        (lambda: masks.padding(np.array([-1])), "q_lengths must be >= 0"),
        (lambda: masks.padding(np.array([1.5])), "q_lengths must hold integers"),
        (lambda: masks.segments(np.array(3)), "segment ids must have a sequence axis"),
        (lambda: masks.causal(offset=-1), "offset must be an int >= 0"),
        (
            lambda: masks.padding(np.array([1, 2]), np.array([1, 2, 3])),
            r"batch dims of q_lengths and kv_lengths must broadcast together, got \(2,\) and \(3,\)",
        ),
        (
            lambda: masks.segments(np.zeros((2, 4), int), np.zeros((3, 4), int)),
            r"q_segment_ids and kv_segment_ids must broadcast together, got \(2,\) and \(3,\)",
        ),
        (lambda: masks.global_tokens([-2]), "indices must be >= 0"),
        (lambda: masks.global_tokens([1.5]), "indices must be integer positions, got float64"),
        (lambda: masks.global_tokens([True]), "indices must be integer positions, got bool"),
        (lambda: masks.longformer(-1), "window must be an int >= 0"),
        (lambda: masks.longformer(2, causal="no"), "causal must be True or False, got str 'no'"),
        (lambda: masks.strided(2, causal="no"), "causal must be True or False"),
        (lambda: masks.fixed(4, 1, causal=1), "causal must be True or False, got int 1"),
        (lambda: masks.from_blocks(np.ones(3), 4), "layout must be 2-D"),
        (lambda: masks.from_blocks(np.full((2, 2), 7), 4), r"boolean or 0/1 .* got values \[7\]"),
        (
            lambda: masks.from_blocks(masks.causal().blocks(8, 8, 4, 4), 4),
            "FULL 2",
        ),
        (
            lambda: masks.from_blocks(np.ones((1, 2), bool), 16).dense(32, 32),
            r"\[1, 2\] with 16x16 blocks covers 16 queries and 32 keys; T=32, S=32 need at least \[2, 2\]",
        ),
        (lambda: masks.from_array(np.ones((3, 3))), "dtype bool"),
        (lambda: masks.from_fn(3), "fn must be callable"),
        (lambda: masks.random_blocks(0, 1), "block must be an int >= 1"),
        (lambda: masks.random_blocks(4, 1, seed=-1), "seed must be an int >= 0"),
        (lambda: masks.random_blocks(4, 1, seed=1.5), "seed must be an int"),
        (lambda: masks.random_blocks(4, 1, seed=True), "seed must be an int"),
        (lambda: masks.bigbird(4, seed=-1), "seed must be an int >= 0"),
        (lambda: masks.bigbird(4, num_window_blocks=2), "num_window_blocks must be odd"),
        (lambda: masks.causal().blocks(8, 8, 0, 4), "block_q must be an int >= 1"),
        (lambda: masks.causal() & 3, "other must be a jattn.masks.Mask"),
    ],
)
def test_bad_arguments_name_themselves(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_layouts_from_the_predicate_are_evaluated_a_bounded_rectangle_at_a_time(monkeypatch):
    """With a budget below one row of tiles, the predicate is evaluated a few tiles at a time along
    the keys as well (at S = 131072 a row of 512-query tiles was 67M pairs at once), and the layout
    is the same."""
    sizes = []

    def stripes(q, k):
        sizes.append(q.size * k.size)
        return (q + 2 * k) % 7 < 3

    expected = dense_layout(masks.from_fn(stripes).dense(37, 45), 4, 8)  # [10, 6] tiles
    sizes.clear()
    monkeypatch.setattr(masks, "_PAIRS_PER_EVAL", 3 * 4 * 8)  # three 4x8 tiles
    layout = _layout_from_predicate(masks.from_fn(stripes).tile, 37, 45, 4, 8)
    np.testing.assert_array_equal(layout, expected)
    assert max(sizes) <= 3 * 4 * 8 and len(sizes) == 10 * 2


def test_layout_from_predicate_handles_ragged_edges():
    layout = _layout_from_predicate(masks.full().tile, 5, 7, 4, 4)
    np.testing.assert_array_equal(layout, np.full((2, 2), FULL))


INTEGER_FN = masks.from_fn(lambda q, k: (q - k) % 2)


@pytest.mark.parametrize(
    "use",
    [
        lambda: INTEGER_FN.dense(4, 4),
        lambda: (~INTEGER_FN).dense(4, 4),
        lambda: INTEGER_FN.blocks(8, 8, 4, 4),
        lambda: (masks.causal() & INTEGER_FN).blocks(8, 8, 4, 4),
        lambda: INTEGER_FN.tile(jnp.arange(4), jnp.arange(4)),
        lambda: jax.jit(lambda q: INTEGER_FN.tile(q, q))(jnp.arange(4)),
    ],
    ids=["dense", "inverted", "blocks", "combined", "jnp", "jit"],
)
def test_from_fn_must_return_booleans(use):
    with pytest.raises(TypeError, match=r"from_fn: fn must return booleans .*, got int"):
        use()


def test_from_fn_accepts_boolean_results():
    causal = masks.from_fn(lambda q, k: q >= k)
    np.testing.assert_array_equal(causal.dense(3, 3), np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(masks.from_fn(lambda q, k: True).dense(2, 3), np.ones((2, 3), bool))


@pytest.mark.parametrize("implementation", [None, "chunked", "block_sparse", "flash"])
def test_from_fn_with_jnp_functions_runs_in_every_implementation(implementation):
    """Layouts and kernel tables evaluate the predicate in NumPy while JAX traces the call."""
    x = jax.random.normal(jax.random.key(0), (1, 40, 2, 16))
    band = masks.from_fn(lambda q, k: jnp.logical_and(jnp.abs(q - k) <= 2, q >= 0))
    expected = jattn.attention(x, x, x, mask=band, implementation="xla")
    out = jax.jit(lambda x: jattn.attention(x, x, x, mask=band, implementation=implementation))(x)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_from_fn_with_numpy_functions_on_traced_positions_is_refused_by_name():
    band = masks.from_fn(lambda q, k: np.abs(q - k) <= 2)
    x = jnp.ones((1, 40, 2, 16))
    with pytest.raises(TypeError, match="from_fn: fn called a NumPy function on traced positions"):
        jattn.attention(x, x, x, mask=band, implementation="chunked")


def test_bigbird_window_is_centred_on_the_query_block():
    dense = masks.bigbird(2, num_window_blocks=5, num_global_blocks=0, num_random=0).dense(12, 12)
    expected = np.abs(np.arange(6)[:, None] - np.arange(6)[None, :]) <= 2  # two blocks each side
    np.testing.assert_array_equal(dense, np.kron(expected, np.ones((2, 2), int)) > 0)


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jnp"])
@pytest.mark.parametrize("op", ["and", "or"])
def test_array_on_the_left_combines_like_array_on_the_right(xp, op):
    array = xp.asarray(np.random.default_rng(0).random((6, 6)) < 0.5)
    mask = masks.sliding_window(1, 1)
    combine = (lambda a, b: a & b) if op == "and" else (lambda a, b: a | b)
    left = combine(array, mask)
    assert isinstance(left, masks.Mask)
    np.testing.assert_array_equal(left.dense(6, 6), combine(mask, array).dense(6, 6))


@pytest.mark.parametrize("left", [None, 0, 3, 9])
@pytest.mark.parametrize("right", [None, 0, 2])
@pytest.mark.parametrize(("q_len", "kv_len"), [(1, 1), (8, 8), (5, 13), (13, 5), (31, 66)])
def test_a_window_attends_every_row_exactly_when_its_dense_mask_does(left, right, q_len, kv_len):
    """The flash kernels skip zeroing unattended rows only where the mask says every query and
    every key is attended: the claim must agree with the dense matrix, and never be wrong."""
    mask = masks.SlidingWindow(left, right)
    dense = np.asarray(mask.dense(q_len, kv_len))
    assert mask._attends_every_row(q_len, kv_len) == bool(dense.any(axis=1).all() and dense.any(axis=0).all())


def test_masks_that_cannot_tell_claim_nothing_about_their_rows():
    assert masks.full()._attends_every_row(3, 5)
    assert not masks.padding(np.array([3]))._attends_every_row(3, 5)  # a default: unknown
    assert not (masks.causal() & masks.causal())._attends_every_row(4, 4)
    assert not masks.causal()._attends_every_row(0, 4)
