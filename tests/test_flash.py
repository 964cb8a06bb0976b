"""The Pallas flash kernel on CPU: interpret mode against the float64 oracle, lowering for CUDA
(Triton) and TPU (Mosaic) with ``jax.export``, tile skipping, block sizes and argument errors.

Interpret mode is slow (seconds per call), so the full shared suite runs under ``make test-slow``
and the default run keeps a few small problems that still cross every code path: several tiles,
odd lengths, GQA, in-kernel and table masks, NaN padding, bias, softcap, both lowerings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jattn
from attention_suite import AttentionSuite, make_inputs, oracle_mask
from jattn import masks
from jattn.attention import make_problem
from jattn.core._common import MASK_VALUE
from jattn.core.chunked import chunked_forward_with_lse, make_plan
from jattn.core.cudnn import supports_cudnn
from jattn.kernels import _tile, aot, blocks, flash, gpu, tpu
from jattn.kernels._config import HEADER
from jattn.reference import attention_reference, attention_vjp_reference


@pytest.mark.slow
class TestFlashSuite(AttentionSuite):
    implementation = "flash"
    second_order = False
    max_examples = 4


def test_nan_in_keys_only_padded_query_rows_reach_stays_out():
    """The shared suite's test, in the default suite (``TestFlashSuite`` runs in the slow one): the
    kernel's own test of its padded query rows, which must not reach keys by position."""
    TestFlashSuite().test_nan_in_keys_only_padded_query_rows_reach_stays_out()


@pytest.mark.parametrize("lowering", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize(
    ("mask", "q_len", "kv_len", "zeroes"),
    [
        (masks.causal(), 40, 40, False),  # self-attention: every query and key is attended
        (masks.sliding_window(8), 40, 40, False),
        (masks.causal(), 31, 66, True),  # keys past the last query: an unfilled cache
        (masks.padding(np.array([30])), 40, 40, True),  # a mask that cannot tell
    ],
)
def test_masked_tiles_zero_unattended_rows_only_where_some_row_is_attended_by_nothing(
    monkeypatch, lowering, mask, q_len, kv_len, zeroes
):
    """Zeroing the rows a masked tile does not attend (a reduction over the tile and a select on
    v, k or q and dO, in each masked step) keeps NaN out only where a row is attended by nothing at
    all; where the mask attends every row, a NaN reaches the outputs anyway, and it is skipped."""
    zeroed = []
    zero_unused = _tile.zero_unused
    monkeypatch.setattr(
        _tile, "zero_unused", lambda used, x: zeroed.append(used is not None) or zero_unused(used, x)
    )
    x = jnp.zeros((1, q_len, 1, 16), jnp.float32)
    y = jnp.zeros((1, kv_len, 1, 16), jnp.float32)
    platform = "tpu" if lowering == "mosaic_tpu" else "cpu"
    block = 128 if lowering == "mosaic_tpu" else 16

    def loss(q, k, v):
        problem = make_problem(q, k, v, mask=mask)
        out = flash.flash_problem(problem, platform=platform, interpret=True, block_q=block, block_kv=block)
        return out.sum()

    jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), x, y, y)  # traces forward, dq and dk/dv
    assert len(zeroed) >= 3 and any(zeroed) == zeroes


@pytest.mark.parametrize("value", [-1e10, -1e20])
def test_a_row_at_a_large_finite_mask_value_is_uniform_not_nan(value):
    """The fused exponent ``2 ** (s·log2 e - m·log2 e)`` rounded ``s·log2 e`` at the magnitude of s:
    where every logit of a row is -1e10 (an additive padding mask), s == m gave an exponent near
    +800, p inf and the row NaN. In float32 such a row's logits are equal: it averages v."""
    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 16, 1, 16)), jnp.float32) for _ in range(3))
    bias = jnp.full((16, 16), value, jnp.float32)
    out = jattn.attention(q, k, v, bias=bias, implementation="flash")
    np.testing.assert_allclose(out, jnp.broadcast_to(v.mean(1, keepdims=True), out.shape), atol=1e-5)


def check(q, k, v, d_out, *, mask=None, bias=None, softcap=None, atol=2e-5, **kernel_kwargs):
    """Forward and all gradients of the kernel against the float64 oracle."""

    def loss(q, k, v, bias):
        out = flash.flash_problem(
            make_problem(q, k, v, mask=mask, bias=bias, softcap=softcap), interpret=True, **kernel_kwargs
        )
        return jnp.sum(out * d_out.reshape(out.shape)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)
    dense = oracle_mask(mask, q.shape[:-3], q.shape[-2], q.shape[-3], k.shape[-3])
    as64 = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    kwargs = dict(mask=dense, bias=as64(bias), softcap=softcap)
    np.testing.assert_allclose(
        out.reshape(d_out.shape), attention_reference(q, k, v, **kwargs), atol=atol, rtol=atol
    )
    expected = attention_vjp_reference(q, k, v, d_out, **kwargs)
    for name, got in zip(("q", "k", "v", "bias"), grads, strict=True):
        if bias is not None or name != "bias":
            np.testing.assert_allclose(
                got, expected[name], atol=atol * 10, rtol=atol * 10, err_msg=f"d{name}"
            )
    return out, grads


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_both_lowerings_match_oracle_with_gqa_odd_lengths_and_table_masks(platform):
    """One problem per lowering design (Triton loop, Mosaic grid) with several tiles per row."""
    rng = np.random.default_rng(0)
    block = 16 if platform == "gpu" else 128
    q_len, kv_len = 3 * block - 5, 2 * block + 7
    q, k, v, d_out = make_inputs(rng, (2,), q_len, kv_len, 4, 2, 16, 16, jnp.float32)
    mask = masks.causal() | masks.from_fn(lambda t, s: (t + s) % 7 == 0)  # needs the tile table
    bias = jnp.asarray(rng.normal(size=(1, 4, q_len, kv_len)), jnp.float32)
    check(q, k, v, d_out, mask=mask, bias=bias, platform=platform, block_q=block, block_kv=block)


@pytest.mark.parametrize("mask_kind", ["table_and_bias", "segments_and_padding"])
def test_steps_smaller_than_the_tiles_match_the_oracle(mask_kind):
    """The forward and dq walk each listed kv tile 16 keys at a time and dk/dv each q tile 16
    queries at a time: the mask (table rows/columns, or positions and vectors), bias and dbias
    follow each step."""
    rng = np.random.default_rng(7)
    q_len, kv_len = 75, 70
    q, k, v, d_out = make_inputs(rng, (2,), q_len, kv_len, 4, 2, 16, 16, jnp.float32)
    bias = None
    if mask_kind == "table_and_bias":
        mask = masks.causal() | masks.from_fn(lambda t, s: (3 * t + s) % 5 == 0)
        bias = jnp.asarray(rng.normal(size=(2, 1, q_len, kv_len)), jnp.float32)
    else:
        segment_ids = np.sort(rng.integers(0, 3, (2, q_len)), -1)
        mask = masks.segments(segment_ids[:, :q_len], segment_ids[:, :kv_len]) & masks.padding(
            np.array([75, 50]), np.array([70, 40])
        )
    sizes = flash.BlockSizes(32, 32, backward_q_step=16, backward_kv_step=16, forward_kv_step=16)
    check(q, k, v, d_out, mask=mask, bias=bias, platform="gpu", sizes=sizes)


def test_steps_are_checked_and_shrink_with_the_tiles():
    with pytest.raises(
        ValueError, match="backward_q_step must be at most block_q=32, got backward_q_step=64"
    ):
        flash.BlockSizes(32, 32, backward_q_step=64)
    with pytest.raises(ValueError, match="backward_kv_step must be a power of two >= 16"):
        flash.BlockSizes(32, 32, backward_kv_step=24)
    with pytest.raises(
        ValueError, match="forward_kv_step must be at most block_kv=32, got forward_kv_step=64"
    ):
        flash.BlockSizes(32, 32, forward_kv_step=64)
    sizes = flash.BlockSizes(128, 64, backward_q_step=64, backward_kv_step=32, forward_kv_step=64)
    smaller = sizes.with_tiles(32, 64)
    assert (smaller.backward_q_step, smaller.backward_kv_step, smaller.forward_kv_step) == (32, 32, 64)
    assert sizes.with_tiles(128, 32).forward_kv_step == 32
    whole = flash.BlockSizes(64, 32)  # default: whole tiles, which stay whole on other tiles
    assert (whole.backward_q_step, whole.backward_kv_step, whole.forward_kv_step) == (64, 32, 32)
    grown = whole.with_tiles(128, 128)
    assert (grown.backward_q_step, grown.backward_kv_step, grown.forward_kv_step) == (128, 128, 128)
    assert flash.BlockSizes(64, 64, backward_q_step=32).with_tiles(128, 128).backward_q_step == 32


def test_in_kernel_masks_segments_padding_and_softcap():
    rng = np.random.default_rng(1)
    q, k, v, d_out = make_inputs(rng, (2,), 45, 45, 2, 1, 16, 12, jnp.float32)
    segment_ids = np.sort(rng.integers(0, 3, (2, 45)), -1)
    mask = (masks.sliding_window(20) & masks.segments(segment_ids)) | ~masks.padding(np.array([30, 45]))
    check(q * 3, k, v, d_out, mask=mask, softcap=2.0, platform="gpu", block_q=16, block_kv=16)


def test_nan_padding_does_not_leak_and_empty_rows_are_zero():
    rng = np.random.default_rng(2)
    q, k, v, d_out = make_inputs(rng, (2,), 40, 40, 2, 2, 16, 16, jnp.float32)
    lengths = np.array([23, 0])  # the second sequence is entirely padding
    pad = (np.arange(40)[None, :] >= lengths[:, None])[..., None, None]  # [B, T, 1, 1]
    q, k, v = (jnp.where(pad, jnp.nan, x) for x in (q, k, v))
    mask = masks.causal() & masks.padding(lengths)
    out, grads = check(q, k, v, d_out, mask=mask, platform="gpu", block_q=16, block_kv=16)
    assert np.isfinite(np.asarray(out)).all() and all(np.isfinite(np.asarray(g)).all() for g in grads[:3])
    assert np.all(np.asarray(out)[1] == 0) and np.all(np.asarray(grads[0])[1] == 0)


def test_public_function_and_registry_agree_in_low_precision():
    rng = np.random.default_rng(3)
    q, k, v, _ = make_inputs(rng, (), 33, 33, 2, 1, 16, 16, jnp.bfloat16)
    got = jattn.flash_attention(q, k, v, mask=masks.causal())
    assert got.dtype == jnp.bfloat16 and got.shape == (33, 2, 16)
    via_registry = jattn.attention(q, k, v, mask=masks.causal(), implementation="flash")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(via_registry, np.float32))
    expected = attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=masks.causal().dense(33, 33)
    )
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=3e-2)


@pytest.mark.parametrize("batch_shape", [(0,), (2, 0)])
def test_an_empty_batch_returns_an_empty_output_and_gradients(batch_shape):
    """No kernel is launched for a batch of size 0 (a Pallas grid cannot have an empty axis)."""
    x = jnp.zeros((*batch_shape, 16, 2, 16), jnp.float32)
    assert jattn.flash_attention(x, x, x, mask=masks.causal()).shape == x.shape
    assert jattn.attention(x, x, x, implementation="flash").shape == x.shape
    grads = jax.grad(lambda q, k, v: jattn.flash_attention(q, k, v).sum(), argnums=(0, 1, 2))(x, x, x)
    assert [g.shape for g in grads] == [x.shape] * 3


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_both_lowerings_run_with_x64_enabled(platform):
    """Under ``jax_enable_x64`` a Python int is int64 while grid and loop indices stay int32: the
    kernels' index arithmetic (GQA heads, backward steps) must not mix them."""
    rng = np.random.default_rng(8)
    block = 32 if platform == "gpu" else 128
    q, k, v, d_out = make_inputs(rng, (1,), block + 9, block + 9, 4, 2, 16, 16, jnp.float32)
    sizes = flash.BlockSizes(block, block, backward_q_step=16, backward_kv_step=16)
    with jax.enable_x64(True):
        check(q, k, v, d_out, mask=masks.causal(), platform=platform, sizes=sizes)


def test_second_derivatives_raise_a_clear_error_and_first_derivatives_still_work():
    """The backward is a kernel of its own, which Pallas cannot differentiate: grad of grad and
    Hessians name the implementations that can, while grad, vmap(grad) and checkpoint still run."""
    rng = np.random.default_rng(9)
    q, k, v, _ = make_inputs(rng, (2,), 20, 20, 2, 1, 16, 16, jnp.float32)

    def loss(q, k, v, implementation="flash"):
        return jattn.attention(q, k, v, mask=masks.causal(), implementation=implementation).sum()

    grad = functools.partial(jax.grad, argnums=(0, 1, 2))
    expected = grad(functools.partial(loss, implementation="xla"))(q, k, v)
    for first_order in (grad(loss), jax.vmap(grad(loss)), grad(jax.checkpoint(loss))):
        for got, want in zip(first_order(q, k, v), expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)
    message = r"implementation='flash' has first-order gradients only.*use implementation='xla'"
    with pytest.raises(NotImplementedError, match=message):
        jax.grad(lambda x: jax.grad(loss)(x, k, v).sum())(q)
    with pytest.raises(NotImplementedError, match=message):
        jax.hessian(loss)(q, k, v)


@pytest.mark.parametrize(
    "mask",
    [masks.bigbird(64), masks.bigbird(64) & masks.padding(np.array([4000]))],
    ids=["bigbird", "bigbird&padding"],
)
def test_a_table_mask_is_evaluated_on_its_partial_tiles_only(mask):
    """A mask the kernel cannot compute from positions reaches it as a table of its P partial tiles,
    evaluated in the program: neither a constant of P·bq·bkv entries (7 MiB of program text for
    BigBird at 4096, 31 MiB at 16384, where tracing took 7 s) nor, with padding, the dense
    ``[T, S]`` mask."""
    x = jax.ShapeDtypeStruct((1, 4096, 1, 64), jnp.float32)
    text = jax.jit(lambda q, k, v: jattn.flash_attention(q, k, v, mask=mask)).lower(x, x, x).as_text()
    assert "4096x4096" not in text
    assert len(text) < 2**20


def test_table_masks_may_look_positions_up_in_data_of_the_true_lengths():
    """A ``from_fn`` mask indexing a ``[T, S]`` table is evaluated at true positions only: padding
    to whole tiles (T, S not multiples of the block) must not index past the table."""
    rng = np.random.default_rng(10)
    q_len, kv_len = 40, 35
    table = rng.random((q_len, kv_len)) < 0.5
    table[:, 0] = True  # every query attends something

    def lookup(t, s):
        return table[t, s] if isinstance(t, np.ndarray) else jnp.asarray(table)[t, s]

    q, k, v, d_out = make_inputs(rng, (), q_len, kv_len, 2, 1, 16, 16, jnp.float32)
    check(q, k, v, d_out, mask=masks.from_fn(lookup), platform="gpu", block_q=16, block_kv=16)


def test_one_head_with_its_lse_gives_rows_with_nothing_to_attend_zeros_and_the_mask_value():
    """Ring attention merges partial softmaxes by their log-sum-exp: a row with nothing to attend in
    a block must say so (lse ``MASK_VALUE``, weight 0 in the merge), as chunked's does."""
    rng = np.random.default_rng(31)
    q, k, v = (jnp.asarray(rng.normal(size=(32, 16)), jnp.float32) for _ in range(3))
    mask = masks.from_fn(lambda t, s: (t >= 5) & (s <= t))  # rows 0-4 attend nothing
    plan = make_plan(np.asarray(mask.blocks(32, 32, 16, 16)), 32, 32, 16, 16)
    out, lse = flash.flash_forward_with_lse(q, k, v, mask, plan=plan, scale=0.25)
    expected_out, expected_lse = chunked_forward_with_lse(q, k, v, mask, plan=plan, scale=0.25)
    assert (np.asarray(lse[:5]) == MASK_VALUE).all() and (np.asarray(out[:5]) == 0).all()
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5)
    np.testing.assert_allclose(out, expected_out, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sharded inputs
# ---------------------------------------------------------------------------------------------


def _mesh(kind: str):
    devices = jax.devices()[:4]
    if kind == "auto":  # jattn's own meshes (the training loop's) have Auto axes
        return jax.sharding.Mesh(np.asarray(devices).reshape(4), ("data",)), P("data")
    explicit = (jax.sharding.AxisType.Explicit,) * 2
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=explicit, devices=devices)
    return mesh, P("data", None, "model")  # heads sharded too (tensor parallelism)


def _collectives(fn, *args) -> int:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sum(text.count(f" {op}(") + text.count(f" {op}-start(") for op in ("all-gather", "all-to-all"))


@pytest.mark.parametrize(
    ("kind", "num_kv_heads"),
    [("auto", 2), ("explicit", 2), ("explicit", 1)],
    ids=["auto", "explicit", "mqa"],
)
def test_under_a_mesh_the_kernel_runs_on_each_devices_share(kind, num_kv_heads):
    """XLA cannot partition a Pallas call: on batch-sharded inputs it gathered the whole batch onto
    every device (and on Explicit axes the call failed). Under ``jax.set_mesh`` the kernel runs on
    each device's share of the batch (and, on Explicit axes, of the heads, grouped-query heads with
    their kv heads): nothing is gathered, the output stays sharded, and the numbers are XLA's. One
    kv head cannot be split over two devices: multi-query heads are gathered for the kernel; nor can
    a bias shared by the batch and heads, which every device reads whole."""
    mesh, spec = _mesh(kind)
    rng = np.random.default_rng(30)
    q, k, v, d_out = make_inputs(rng, (4,), 40, 40, 4, num_kv_heads, 16, 16, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(40, 40)), jnp.float32)  # [T, S]
    shard = lambda x, s=spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, s))  # noqa: E731
    kv_spec = spec if num_kv_heads > 1 else P("data")  # one kv head: not split
    q, k, v, d_out = shard(q), shard(k, kv_spec), shard(v, kv_spec), shard(d_out)
    lengths = shard(jnp.array([40, 21, 9, 0]), P("data"))

    def attend(implementation):
        def run(q, k, v, lengths):
            mask = masks.causal() & masks.padding(lengths)
            return jattn.attention(q, k, v, mask=mask, bias=bias, implementation=implementation)

        return run

    def grads(implementation):
        return jax.grad(lambda *a: (attend(implementation)(*a) * d_out).sum(), argnums=(0, 1, 2))

    with jax.set_mesh(mesh):
        out = jax.jit(attend("flash"))(q, k, v, lengths)
        if num_kv_heads > 1:
            assert tuple(out.sharding.spec)[: len(spec)] == tuple(spec)
        np.testing.assert_allclose(out, attend("xla")(q, k, v, lengths), atol=2e-5)
        for got, want in zip(
            jax.jit(grads("flash"))(q, k, v, lengths), grads("xla")(q, k, v, lengths), strict=True
        ):
            np.testing.assert_allclose(got, want, atol=2e-5)
        if num_kv_heads > 1:
            assert _collectives(attend("flash"), q, k, v, lengths) == 0
            assert _collectives(grads("flash"), q, k, v, lengths) == 0


# ---------------------------------------------------------------------------------------------
# Lowering for real hardware
# ---------------------------------------------------------------------------------------------

EXPORT_MASKS = {
    "causal": masks.causal(),
    "window_and_segments": masks.sliding_window(128) & masks.segments(np.zeros((2, 384), np.int32)),
    "bigbird_table": masks.bigbird(64, num_random=1),
}


def _exported_text(platform: str, head_dim: int, mask, gradient: bool, bias_shape=None, sizes=None) -> str:
    """The exported module of flash on bfloat16 inputs (4 query heads, 2 key/value heads), with a
    bfloat16 bias of ``bias_shape`` if given (its gradient taken too), on ``sizes`` if given."""

    def attend(q, k, v, bias=None):
        problem = make_problem(q, k, v, mask=mask, bias=bias)
        out = flash.flash_problem(problem, platform=platform, interpret=False, sizes=sizes)
        return out.astype(jnp.float32).sum() if gradient else out

    q = jax.ShapeDtypeStruct((2, 384, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 384, 2, head_dim), jnp.bfloat16)
    args = (q, kv, kv) if bias_shape is None else (q, kv, kv, jax.ShapeDtypeStruct(bias_shape, jnp.bfloat16))
    fn = jax.grad(attend, argnums=tuple(range(len(args)))) if gradient else attend
    return aot.export_for(fn, *args, platform=platform).mlir_module()


@pytest.mark.parametrize("gradient", [False, True], ids=["forward", "grad"])
@pytest.mark.parametrize("mask_name", sorted(EXPORT_MASKS))
@pytest.mark.parametrize("head_dim", [96, 256])
def test_lowers_for_cuda_through_triton(head_dim, mask_name, gradient):
    text = _exported_text("cuda", head_dim, EXPORT_MASKS[mask_name], gradient)
    assert text.count(aot.TRITON_CALL) == (3 if gradient else 1)  # forward (+ dq and dk/dv kernels)


def test_steps_smaller_than_the_tiles_lower_for_cuda():
    """Forward, dq and dk/dv steps inside 128x128 tiles, with a table mask and a bias (whose tiles
    and table columns follow each step)."""
    sizes = flash.BlockSizes(
        128, 128, 4, 2, 8, 2, backward_q_step=32, backward_kv_step=64, forward_kv_step=64
    )
    text = _exported_text(
        "cuda", 128, EXPORT_MASKS["bigbird_table"], True, bias_shape=(4, 384, 384), sizes=sizes
    )
    assert text.count(aot.TRITON_CALL) == 3


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_with_a_float32_bias_on_bfloat16_inputs(platform):
    """The bias stays float32 whatever the input dtype; both lowerings take its tiles, forward and grad."""
    text = _exported_text(platform, 128, masks.causal(), gradient=True, bias_shape=(4, 384, 384))
    assert text.count(aot.TRITON_CALL if platform == "cuda" else "tpu_custom_call") == 3


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_inside_a_shard_map_that_checks_varying_axes(platform):
    """Inside ``jax.shard_map`` with its default ``check_vma=True`` a Pallas call must say how its
    outputs vary over the mesh (they did not: a ValueError). Lowered on a 4-device abstract mesh.
    (On CPU, Pallas' interpreter itself needs ``check_vma=False``.)"""
    kind, mesh_platform = ("NVIDIA H100", "gpu") if platform == "cuda" else ("TPU v5 lite", "tpu")
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=None, platform=mesh_platform)
    explicit = (jax.sharding.AxisType.Explicit,)
    mesh = jax.sharding.AbstractMesh((4,), ("data",), axis_types=explicit, abstract_device=device)

    def attend(q, lengths):
        problem = make_problem(q, q, q, mask=masks.causal() & masks.padding(lengths))
        return flash.flash_problem(problem, platform=platform, interpret=False)

    per_shard = jax.shard_map(attend, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    loss = jax.grad(lambda q, lengths: per_shard(q, lengths).astype(jnp.float32).sum())
    sharded = functools.partial(jax.ShapeDtypeStruct, sharding=jax.sharding.NamedSharding(mesh, P("data")))
    args = (sharded((4, 256, 2, 64), jnp.bfloat16), sharded((4,), jnp.int32))
    disabled = [jax.export.DisabledSafetyCheck.custom_call(aot.TRITON_CALL)]
    call = aot.TRITON_CALL if platform == "cuda" else "tpu_custom_call"
    for fn, kernels in ((per_shard, 1), (loss, 3)):
        with jax.sharding.use_abstract_mesh(mesh):
            exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args)
        assert exported.mlir_module().count(call) == kernels


def test_export_names_the_platforms_it_takes():
    with pytest.raises(ValueError, match=r"platform must be one of \('cuda', 'tpu'\), got 'rocm'"):
        aot.export_for(lambda x: x, jnp.zeros(2), platform="rocm")


@pytest.mark.parametrize("gradient", [False, True], ids=["forward", "grad"])
@pytest.mark.parametrize("mask_name", sorted(EXPORT_MASKS))
@pytest.mark.parametrize("head_dim", [80, 128])
def test_lowers_for_tpu_through_mosaic(head_dim, mask_name, gradient):
    text = _exported_text("tpu", head_dim, EXPORT_MASKS[mask_name], gradient)
    assert text.count("tpu_custom_call") == (3 if gradient else 1)


# ---------------------------------------------------------------------------------------------
# Tile skipping
# ---------------------------------------------------------------------------------------------


def _record_schedules(monkeypatch) -> list[blocks.Schedule]:
    """The schedules ``blocks.make_schedule`` builds from now on, in order (tracing a call builds them)."""
    seen: list[blocks.Schedule] = []
    make = blocks.make_schedule
    monkeypatch.setattr(blocks, "make_schedule", lambda *a: seen.append(make(*a)) or seen[-1])
    return seen


def _schedule_given_to_kernel(monkeypatch, q_len: int, mask, block: int) -> blocks.Schedule:
    """Trace a call (no execution) and keep the schedule the kernel operands are built from."""
    seen = _record_schedules(monkeypatch)
    x = jax.ShapeDtypeStruct((1, q_len, 1, 64), jnp.bfloat16)
    jax.eval_shape(
        functools.partial(jattn.flash_attention, mask=mask, block_q=block, block_kv=block), x, x, x
    )
    (schedule,) = seen
    return schedule


def test_sliding_window_visits_only_its_band(monkeypatch):
    q_len, block, window = 4096, 128, 1024
    causal = _schedule_given_to_kernel(monkeypatch, q_len, masks.causal(), block)
    local = _schedule_given_to_kernel(monkeypatch, q_len, masks.sliding_window(window), block)
    num_blocks = q_len // block
    assert blocks.visited_tiles(causal) == (num_blocks * (num_blocks + 1) // 2,) * 2
    band = window // block + 1  # kv tiles a q tile of the window reaches
    expected = band * num_blocks - band * (band - 1) // 2
    assert blocks.visited_tiles(local) == (expected, expected)
    layout = masks.sliding_window(window).blocks(q_len, q_len, block, block)
    assert expected == np.count_nonzero(layout != masks.EMPTY)
    ratio = expected / blocks.visited_tiles(causal)[0]
    assert ratio == pytest.approx(2 * window / q_len, rel=0.1)  # ≈ 2w/T of the causal triangle
    # Only the two edge tiles of each band (the diagonal and the window's left end) are masked.
    count, num_full = local.rows[:, 0], local.rows[:, 1]
    assert (count - num_full).sum() == num_blocks + (num_blocks - band + 1)


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "cols"])
def test_schedule_lists_full_tiles_first_then_masked(transposed):
    """Each row: its full tiles, then its masked ones, both ascending; the kernels loop over the two
    runs separately and take entry j as masked exactly when ``num_full <= j < count``. A masked
    entry's table index points at its tile in ``partial_tiles``."""
    mask = masks.sliding_window(40) | masks.from_fn(lambda t, s: (t + s) % 97 == 0)
    layout = np.asarray(mask.blocks(200, 200, 16, 16))
    schedule = blocks.make_schedule(layout, 200, 200, 16, 16)
    packed = schedule.cols if transposed else schedule.rows
    width = schedule.transposed_width if transposed else schedule.width
    assert (packed[:, 0] < width).any()  # some rows are padded
    in_table = layout[tuple(schedule.partial_tiles.T)]
    assert (in_table != masks.EMPTY).all()  # the table holds visited tiles only
    crosses_end = np.zeros(layout.shape, bool)
    crosses_end[:, -1] = True  # 200 keys end inside the last 16-key tile
    must_mask = (layout == masks.PARTIAL) | (crosses_end & (layout != masks.EMPTY))
    body = packed[:, HEADER:]
    for r, (count, num_full) in enumerate(packed[:, :HEADER]):
        ids, table = body[r, :count], body[r, width : width + count]
        tiles = (ids, np.full(count, r)) if transposed else (np.full(count, r), ids)
        np.testing.assert_array_equal(must_mask[tiles], np.arange(count) >= num_full)
        for j in np.flatnonzero(layout[tiles] == masks.PARTIAL):
            np.testing.assert_array_equal(schedule.partial_tiles[table[j]], [tiles[0][j], tiles[1][j]])
        listed = layout[tiles]
        assert (listed != masks.EMPTY).all() and (np.diff(ids[:num_full]) > 0).all()
        assert (np.diff(ids[num_full:]) > 0).all()
        expected = layout[:, r] if transposed else layout[r]
        assert sorted(ids) == list(np.flatnonzero(expected != masks.EMPTY))
        assert (body[r, count:width] == (ids[-1] if count else 0)).all()  # padding repeats the last id


def test_triton_loop_bodies_have_no_branch(monkeypatch, capsys):
    """Full and masked tiles run in separate loops: a branch inside a loop body stops Triton from
    pipelining the K/V loads and the matmuls (no cp.async, no async wgmma; checked with Triton 3.6
    for sm_90 by ``benchmarks/triton_static.py``)."""
    monkeypatch.setattr(gpu.pl, "pallas_call", functools.partial(gpu.pl.pallas_call, debug=True))
    _exported_text("cuda", 64, masks.sliding_window(128), gradient=True)
    modules = capsys.readouterr().out.split("The Triton module for pallas_call ")[1:]
    names = sorted(module.split()[0] for module in modules)
    assert names == ["jattn_flash_dkv", "jattn_flash_dq", "jattn_flash_forward"]
    for module in modules:
        assert module.count("scf.for") >= 2 and "scf.if" not in module, module.split()[0]


def test_float32_matmuls_follow_jax_matmul_precision(monkeypatch, capsys):
    """JAX's default float32 matmul on NVIDIA GPUs is TF32, the kernel's too; under
    ``jax.default_matmul_precision("highest")`` every matmul of the three kernels is IEEE float32,
    which the GPU check uses for its 1e-4 float32 bar."""
    monkeypatch.setattr(gpu.pl, "pallas_call", functools.partial(gpu.pl.pallas_call, debug=True))
    x = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.float32)

    def loss(q, k, v):
        problem = make_problem(q, k, v, mask=masks.causal())
        return flash.flash_problem(problem, platform="cuda", interpret=False).sum()

    for precision, tf32 in ((None, True), ("highest", False)):
        with jax.default_matmul_precision(precision):
            aot.export_for(jax.grad(loss, argnums=(0, 1, 2)), x, x, x, platform="cuda")
        dots = [line for line in capsys.readouterr().out.splitlines() if "tt.dot" in line]
        assert len(dots) >= 5 and all(("tf32" in dot) == tf32 for dot in dots), (precision, dots)


def test_interpreted_kernel_skips_empty_tiles():
    """A block-diagonal layout: garbage in the skipped tiles' K/V cannot change the output."""
    rng = np.random.default_rng(4)
    q, k, v, _ = make_inputs(rng, (), 64, 64, 1, 1, 16, 16, jnp.float32)
    mask = masks.from_blocks(np.eye(4, dtype=bool), 16)
    poisoned = jnp.where((jnp.arange(64) >= 16)[:, None, None], jnp.nan, k)  # K of tiles 1..3
    out = jattn.flash_attention(q[:16], poisoned, v, mask=mask, block_q=16, block_kv=16)
    assert np.isfinite(np.asarray(out)).all()
    assert blocks.visited_tiles(blocks.make_schedule(mask.blocks(64, 64, 16, 16), 64, 64, 16, 16)) == (4, 4)


# ---------------------------------------------------------------------------------------------
# Block sizes and argument errors
# ---------------------------------------------------------------------------------------------


def test_block_size_table_lookup_and_override():
    entry = flash.lookup_block_sizes("triton", jnp.bfloat16, 128)
    assert entry == flash.block_size_table()["triton"]["sm90"]["bfloat16"][128]  # no GPU here: sm90
    assert flash.lookup_block_sizes("triton", jnp.bfloat16, 96) == entry  # next tabulated dim up
    x = jnp.zeros((4096, 2, 128), jnp.bfloat16)
    problem = make_problem(x, x, x)
    assert flash.choose_block_sizes("triton", problem) == entry
    short = make_problem(x[:20], x[:20], x[:20])
    assert flash.choose_block_sizes("triton", short).block_q == 32  # fitted to the length
    exact = make_problem(x[:64], x[:64], x[:64])
    assert flash.choose_block_sizes("triton", exact).block_q == min(64, entry.block_q)  # a power of two
    wide_values = make_problem(x[..., :64], x[..., :64], jnp.zeros((4096, 2, 256), jnp.bfloat16))
    widest = flash.lookup_block_sizes("triton", jnp.bfloat16, 256)
    assert flash.choose_block_sizes("triton", wide_values).block_q == widest.block_q  # by max(H, Hv)
    assert flash.choose_block_sizes("triton", wide_values).block_kv == widest.block_kv
    overridden = flash.choose_block_sizes("triton", problem, block_q=32, block_kv=16)
    assert (overridden.block_q, overridden.block_kv, overridden.num_warps) == (32, 16, entry.num_warps)
    assert flash.choose_block_sizes("mosaic_tpu", short).block_q == 128  # TPU tiles stay >= 128


def _tpu_schedule(monkeypatch, length: int, mask, *, with_bias=False, **blocks_given):
    """(tiles, schedule bytes) of a traced TPU call at ``length`` (nothing runs or compiles)."""
    seen = _record_schedules(monkeypatch)
    x = jax.ShapeDtypeStruct((1, length, 1, 128), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, 1, length, length), jnp.float32) if with_bias else None
    run = lambda q, bias: flash.flash_problem(  # noqa: E731
        make_problem(q, q, q, mask=mask, bias=bias), platform="tpu", interpret=False, **blocks_given
    )
    jax.eval_shape(run, x, bias)
    schedule = seen[-1]
    return (schedule.block_q, schedule.block_kv), 4 * max(schedule.rows.size, schedule.cols.size)


SMEM_FOR_THE_SCHEDULE = 768 * 1024  # three quarters of a TPU v4+ TensorCore's 1 MiB of SMEM


def test_tpu_tiles_grow_until_the_schedule_fits_scalar_memory(monkeypatch):
    """A TPU kernel prefetches its tile schedule into SMEM. A causal schedule of 128-tiles at 64k
    tokens takes 2 MiB, so the tiles chosen from the table grow; sparse ones fit as they are."""
    tiles, used = _tpu_schedule(monkeypatch, 65536, masks.causal())
    assert tiles == (256, 256) and used <= SMEM_FOR_THE_SCHEDULE
    tiles, used = _tpu_schedule(monkeypatch, 131072, None)
    assert tiles == (512, 512) and used <= SMEM_FOR_THE_SCHEDULE
    assert _tpu_schedule(monkeypatch, 65536, masks.sliding_window(1024))[0] == (128, 128)
    assert _tpu_schedule(monkeypatch, 16384, masks.causal())[0] == (128, 128)
    # Only the tiles not passed in grow.
    tiles, used = _tpu_schedule(monkeypatch, 65536, masks.causal(), block_q=128)
    assert tiles == (128, 512) and used <= SMEM_FOR_THE_SCHEDULE
    with pytest.raises(ValueError, match="SMEM"):  # tiles grow to 512 at most: 128 x 512 is too many at 128k
        _tpu_schedule(monkeypatch, 131072, masks.causal(), block_q=128)


def test_tpu_tiles_grow_only_while_their_vmem_estimate_fits(monkeypatch):
    """With a bias, 512-tiles are estimated at 13 MiB of VMEM, over the 12 MiB that grown tiles may
    take (a TPU v4 TensorCore has 16): the tiles stop at 256, and a schedule still too large is
    refused with the reason."""
    assert _tpu_schedule(monkeypatch, 65536, masks.causal(), with_bias=True)[0] == (256, 256)
    with pytest.raises(ValueError, match="while their VMEM estimate stays within 12 MiB"):
        _tpu_schedule(monkeypatch, 131072, None, with_bias=True)


def test_the_tabulated_tpu_tiles_are_within_the_vmem_estimate_at_any_head_dim():
    """The table's tiles (the grown ones' starting point) fit with room to spare in the worst case:
    head dim 256 in float32, a bias, a mask table and two vectors each side (segment ids and lengths)."""
    entries = [
        (dtype, entry)
        for by_dtype in flash.block_size_table()["mosaic_tpu"].values()
        for dtype, by_dim in by_dtype.items()
        for entry in by_dim.values()
    ]
    assert entries
    for dtype, entry in entries:
        worst = tpu.vmem_bytes(
            entry.block_q,
            entry.block_kv,
            head_dim=flash.MAX_HEAD_DIM,
            value_dim=flash.MAX_HEAD_DIM,
            itemsize=jnp.dtype(dtype).itemsize,
            has_bias=True,
            has_table=True,
            num_q_vectors=2,
            num_kv_vectors=2,
        )
        assert worst <= flash.TPU_VMEM_BYTES / 2, (dtype, entry, worst)


def test_grown_tpu_tiles_lower_through_mosaic():
    def loss(q, k, v):
        problem = make_problem(q, k, v, mask=masks.causal())
        return flash.flash_problem(problem, platform="tpu", interpret=False).astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((1, 65536, 2, 128), jnp.bfloat16)  # 256-tiles (the test above)
    text = aot.export_for(jax.grad(loss, argnums=(0, 1, 2)), x, x, x, platform="tpu").mlir_module()
    assert text.count("tpu_custom_call") == 3


@pytest.mark.parametrize(
    ("length", "given"), [(65536, {"block_q": 128, "block_kv": 128}), (262144, {})], ids=["given", "grown"]
)
def test_a_tpu_schedule_too_large_for_scalar_memory_is_refused_by_name(monkeypatch, length, given):
    with pytest.raises(ValueError, match=r"T=\d+, S=\d+ with block_q=\d+, block_kv=\d+ takes \d+ KiB.*SMEM"):
        _tpu_schedule(monkeypatch, length, masks.causal(), **given)


def test_ring_shards_check_their_tpu_schedule(monkeypatch):
    """Ring attention hands the kernel its own per-shard plans: on TPU they are checked too."""
    monkeypatch.setattr(flash.jax, "default_backend", lambda: "tpu")
    length, block = 65536, 128
    layout = np.full((length // block,) * 2, masks.FULL, np.int8)
    plan = make_plan(layout, length, length, block, block)
    x = jax.ShapeDtypeStruct((length, 128), jnp.bfloat16)
    forward = functools.partial(
        flash.flash_forward_with_lse, mask=None, plan=plan, scale=1.0, interpret=False
    )
    with pytest.raises(ValueError, match="block_q=128, block_kv=128 takes 2052 KiB"):
        jax.eval_shape(forward, x, x, x)


@pytest.mark.parametrize("precision", ["highest", "float32", "F32_F32_F32"])
def test_ieee_float32_takes_tiles_that_do_not_spill(precision, monkeypatch):
    """IEEE float32 matmuls run as FMA loops on CUDA cores, where the table's float32 tiles (chosen
    for TF32 tensor cores) spill: under precision "highest" the Triton tiles are capped. Other
    dtypes, precisions and lowerings keep the table's tiles, and block sizes passed in still win."""
    x = jnp.zeros((4096, 2, 64), jnp.float32)
    entry = flash.lookup_block_sizes("triton", jnp.float32, 64)
    assert (entry.block_q, entry.block_kv) == (128, 128)  # sm90's TF32 entry
    assert flash.choose_block_sizes("triton", make_problem(x, x, x)) == entry
    with jax.default_matmul_precision(precision):
        assert flash.ieee_float32(jnp.float32) and not flash.ieee_float32(jnp.bfloat16)
        capped = flash.choose_block_sizes("triton", make_problem(x, x, x))
        assert (capped.block_q, capped.block_kv) == flash.IEEE_FLOAT32_MAX_TILES
        assert (capped.num_warps, capped.num_stages) == (entry.num_warps, entry.num_stages)
        assert flash.choose_block_sizes("mosaic_tpu", make_problem(x, x, x)).block_q >= 128
        assert flash.choose_block_sizes("triton", make_problem(x, x, x), block_q=128).block_q == 128
        bf16 = x.astype(jnp.bfloat16)
        assert flash.choose_block_sizes("triton", make_problem(bf16, bf16, bf16)).block_q == 128
    for precision in (None, "default", "high", "tensorfloat32", "bfloat16", "BF16_BF16_F32"):
        with jax.default_matmul_precision(precision):
            assert not flash.ieee_float32(jnp.float32), precision
    # sm80's float32 entry at head dim 128 once had 4 backward warps, chosen for TF32: IEEE loops
    # spilled 41 KB a thread there. An entry with fewer warps takes IEEE_FLOAT32_MIN_BACKWARD_WARPS.
    four_warps = flash.BlockSizes(64, 32, 8, 3, backward_num_warps=4, backward_num_stages=2)
    monkeypatch.setattr(flash, "lookup_block_sizes", lambda *args: four_warps)
    assert flash.tabulated_block_sizes("triton", jnp.float32, 128, "sm80").backward_num_warps == 4
    with jax.default_matmul_precision("highest"):
        ieee = flash.tabulated_block_sizes("triton", jnp.float32, 128, "sm80")
    assert ieee.backward_num_warps == flash.IEEE_FLOAT32_MIN_BACKWARD_WARPS


@pytest.mark.parametrize(
    ("capability", "target"),
    [
        ((9, 0), "sm90"),  # H100, H200
        ((10, 0), "sm90"),  # B200: 227 KiB like Hopper
        ((8, 0), "sm80"),  # A100
        ((8, 6), "sm86"),  # RTX 30xx, A10
        ((8, 9), "sm86"),  # RTX 40xx, L4, L40
        ((12, 0), "sm86"),  # RTX 50xx: 99 KiB
        (None, "sm86"),  # a GPU without a CUDA capability: the smallest tiles
    ],
)
def test_triton_table_by_gpu_architecture(capability, target):
    assert flash.triton_target(capability) == target
    assert set(flash.block_size_table()["triton"]) == set(flash.TRITON_TARGETS)


def _attach_gpu(monkeypatch, kind: str, capability: str):
    """Make jax report one GPU of ``kind`` and ``capability`` (e.g. "8.9")."""
    gpu = type("Gpu", (), {"device_kind": kind, "compute_capability": capability})()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *_: [gpu])


def test_a_gpu_reads_the_table_of_its_architecture(monkeypatch):
    """On a GPU the lookup takes the device's compute capability: an RTX 4090's 99 KiB of shared
    memory cannot hold the H100's tiles. Without a GPU (here) the table is sm90's."""
    assert flash.device_target("triton") == "sm90"
    _attach_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", "8.9")
    assert flash.device_target("triton") == "sm86"
    sm86 = flash.block_size_table()["triton"]["sm86"]
    assert flash.lookup_block_sizes("triton", jnp.bfloat16, 128) == sm86["bfloat16"][128]
    assert flash.device_target("mosaic_tpu") == "tpu"
    _attach_gpu(monkeypatch, "AMD Instinct MI300X", "gfx942")
    assert flash.device_target("triton") == "sm86"


def test_gpus_older_than_ampere_fall_back_from_the_fused_kernels(monkeypatch):
    """A Tesla T4 (7.5) has neither asynchronous copies nor bfloat16 tensor cores: flash and cuDNN
    decline it by name, flash_attention says why, and attention() picks a pure-JAX implementation."""
    _attach_gpu(monkeypatch, "Tesla T4", "7.5")
    x = jnp.zeros((1, 64, 2, 32), jnp.bfloat16)
    problem = make_problem(x, x, x, mask=masks.causal())
    for why_not in (flash.unsupported_reason(problem), supports_cudnn(problem)):
        assert why_not is not None and "compute capability 8.0" in why_not and "Tesla T4 is 7.5" in why_not
    choice = jattn.explain(x, x, x, mask=masks.causal())
    assert choice.implementation in ("xla", "chunked") and set(choice.rejected) == {"flash", "cudnn"}
    with pytest.raises(NotImplementedError, match="Tesla T4 is 7.5"):
        jattn.flash_attention(x, x, x)
    _attach_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", "8.0")
    assert flash.unsupported_reason(problem) is None


def test_on_an_nvidia_gpu_cudnn_comes_first_where_it_can_run_the_call(monkeypatch):
    """cuDNN ran 1.4-2.5x as fast as flash on an H200 without a mask and causal, so
    implementation=None takes it for those calls, and flash for the rest."""
    _attach_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", "9.0")
    x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    for mask in (None, masks.causal()):
        assert jattn.explain(x, x, x, mask=mask).implementation == "cudnn"
    assert jattn.explain(x, x, x, mask=masks.bigbird(64, num_random=1)).implementation == "flash"
    softcapped = jattn.explain(x, x, x, mask=masks.causal(), softcap=30.0)
    assert softcapped.implementation == "flash" and "softcap" in softcapped.rejected["cudnn"]
    # cuDNN could run these, but a query may attend nothing (flash is tested to return zeros
    # there), a bias may be broadcast over T or S, and its windows are untimed
    short, bias = x[:, :100], jnp.zeros((2, 1, 256), jnp.float32)
    for q, kv, others in (
        (x, x, dict(mask=masks.padding(np.array([0]), np.array([256])))),
        (x, short, dict(mask=masks.causal())),
        (x, x, dict(mask=masks.causal(), bias=bias)),
        (x, x, dict(mask=masks.sliding_window(64))),
    ):
        assert jattn.explain(q, kv, kv, **others).implementation == "flash"
    empty = jnp.zeros((0, 256, 2, 64), jnp.bfloat16)
    assert "empty batch" in supports_cudnn(make_problem(empty, empty, empty))
    _attach_gpu(monkeypatch, "AMD Instinct MI300X", "gfx942")
    assert "no CUDA compute capability" in supports_cudnn(make_problem(x, x, x))
    f32 = x.astype(jnp.float32)
    assert jattn.explain(f32, f32, f32, mask=masks.causal()).implementation == "flash"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert jattn.explain(x, x, x, mask=masks.causal()).implementation == "flash"


def test_a_jax_without_the_pallas_triton_backend(monkeypatch):
    """JAX deprecated Pallas' Triton backend in 0.11. Without it, interpret mode still runs and, on
    a GPU, flash declines by saying so, so the choice falls to cuDNN or pure JAX."""
    monkeypatch.setattr(gpu, "pl_triton", None)
    rng = np.random.default_rng(5)
    q, k, v, _ = make_inputs(rng, (), 40, 40, 2, 1, 16, 16, jnp.float32)
    expected = attention_reference(q, k, v, mask=masks.causal().dense(40, 40))
    np.testing.assert_allclose(jattn.flash_attention(q, k, v, mask=masks.causal()), expected, atol=1e-5)
    _attach_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", "9.0")
    x = jnp.zeros((1, 64, 2, 32), jnp.bfloat16)
    why_not = flash.unsupported_reason(make_problem(x, x, x))
    assert why_not is not None and "Triton backend, which jax" in why_not
    assert "flash" in jattn.explain(x, x, x, softcap=30.0).rejected  # a call cuDNN cannot run


def test_forward_and_dq_launch_the_last_q_tile_first(monkeypatch):
    """Program 0 of the forward and dq grids takes the last q tile (the longest under a causal mask)."""
    first_q_tile = {}
    pallas_call = gpu.pl.pallas_call

    def record(kernel, *, name, grid, in_specs, **kwargs):
        q_spec = in_specs[1]  # the schedule row comes first, then q
        first_q_tile[name] = (grid[0], q_spec.index_map(0, 0, 0)[1])
        return pallas_call(kernel, name=name, grid=grid, in_specs=in_specs, **kwargs)

    monkeypatch.setattr(gpu.pl, "pallas_call", record)
    x = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.float32)

    def loss(q, k, v):
        problem = make_problem(q, k, v, mask=masks.causal())
        return flash.flash_problem(problem, platform="gpu", interpret=True, block_q=32, block_kv=32).sum()

    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x)
    assert first_q_tile["jattn_flash_forward"] == (4, 3) and first_q_tile["jattn_flash_dq"] == (4, 3)


def test_backward_launch_settings_default_to_forward_and_reach_the_backward_kernels(monkeypatch):
    assert flash.BlockSizes(64, 64, 8, 3) == flash.BlockSizes(64, 64, 8, 3, 8, 3)
    with pytest.raises(ValueError, match="backward_num_warps must be an int >= 1, got backward_num_warps=0"):
        flash.BlockSizes(64, 64, backward_num_warps=0)
    launched = {}
    pallas_call = gpu.pl.pallas_call

    def record(kernel, *, name, compiler_params, **kwargs):
        launched[name] = (compiler_params.num_warps, compiler_params.num_stages)
        return pallas_call(kernel, name=name, compiler_params=compiler_params, **kwargs)

    monkeypatch.setattr(gpu.pl, "pallas_call", record)
    sizes = flash.BlockSizes(64, 32, num_warps=4, num_stages=3, backward_num_warps=8, backward_num_stages=2)
    x = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        out = flash.flash_problem(make_problem(q, k, v), platform="gpu", interpret=False, sizes=sizes)
        return out.astype(jnp.float32).sum()

    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x)
    assert launched == {"jattn_flash_forward": (4, 3), "jattn_flash_dq": (8, 2), "jattn_flash_dkv": (8, 2)}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"block_q": 24}, ValueError, "block_q must be a power of two >= 16, got block_q=24"),
        ({"block_kv": 8}, ValueError, "block_kv must be a power of two >= 16"),
        ({"block_q": 32.0}, TypeError, "block_q must be an int"),
        ({"interpret": False}, ValueError, "interpret=False compiles the kernel for a GPU or TPU"),
        ({"interpret": "yes"}, TypeError, "interpret must be True, False or None"),
        ({"scale": -1.0}, ValueError, "scale must be positive"),
        ({"mask": "causal"}, TypeError, "mask must be a jattn.masks.Mask"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    x = jnp.zeros((16, 2, 16), jnp.float32)
    with pytest.raises(error, match=message.replace("(", r"\(")):
        jattn.flash_attention(x, x, x, **kwargs)


def test_unsupported_calls_name_the_reason():
    wide = jnp.zeros((16, 1, 512), jnp.float32)
    with pytest.raises(NotImplementedError, match="head dims up to 256, got 512"):
        jattn.flash_attention(wide, wide, wide)
    with pytest.raises(NotImplementedError, match="cannot run this call: the flash kernel takes head dims"):
        jattn.attention(wide, wide, wide, implementation="flash")
    with pytest.raises(ValueError, match="must be an int >= 1"):
        flash.BlockSizes(64, 64, num_warps=0)
