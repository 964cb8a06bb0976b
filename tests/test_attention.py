"""The attention() call itself: argument checks, the automatic choice, dtypes, memory."""

import dataclasses
import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import masks
from jattn.attention import make_problem
from jattn.core.chunked import make_plan

attention_module = importlib.import_module("jattn.attention")  # the module, not jattn.attention()


def qkv(
    batch=(2,), q_len=16, kv_len=16, num_heads=4, num_kv_heads=2, head_dim=8, value_dim=8, dtype=jnp.float32
):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(*batch, q_len, num_heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(*batch, kv_len, num_kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(*batch, kv_len, num_kv_heads, value_dim)), dtype)
    return q, k, v


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda q, k, v: (q, k[..., :4], v), ValueError, r"q and k must have the same head dim"),
        (lambda q, k, v: (q[..., :3, :], k, v), ValueError, r"multiple of the number of key/value heads"),
        (lambda q, k, v: (q, k, v[:, :5]), ValueError, r"k and v must have the same length"),
        (lambda q, k, v: (q[0, 0], k, v), ValueError, r"q must be \[B..., length, heads, head_dim\]"),
        (lambda q, k, v: (q, k[None], v[None]), ValueError, r"same batch dims"),
        (lambda q, k, v: (q.astype(jnp.bfloat16), k, v), TypeError, r"share a dtype"),
        (lambda q, k, v: (q.astype(jnp.int32), k, v), TypeError, r"q must have a floating dtype"),
        (lambda q, k, v: ([[1.0]], k, v), TypeError, r"q must be an array"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, r"head dims must be positive.*q.shape="),
        (lambda q, k, v: (q, k, v[..., :0]), ValueError, r"head dims must be positive.*v.shape="),
        (lambda q, k, v: (q[:, :0], k, v), ValueError, r"sequence lengths, head counts and head dims"),
    ],
)
def test_bad_shapes_and_dtypes(change, error, message):
    with pytest.raises(error, match=message):
        jattn.attention(*change(*qkv()))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(scale=0.0), ValueError, "scale must be positive and finite"),
        (dict(scale=float("nan")), ValueError, "scale must be positive and finite"),
        (dict(softcap=-1.0), ValueError, "softcap must be positive and finite"),
        (dict(scale="big"), TypeError, "scale must be a positive number"),
        (dict(scale=True), TypeError, "scale must be a positive number, got True"),
        (
            dict(implementation="fast"),
            ValueError,
            r"unknown implementation='fast'; valid: \[.*'chunked'.*'xla'",
        ),
        (dict(mask=np.ones((3, 16, 16), bool)), ValueError, r"mask must broadcast to \[B..., N, T, S\]"),
        (dict(mask=np.ones((16, 16))), TypeError, "dtype bool"),
        (dict(mask="causal"), TypeError, "mask must be a jattn.masks.Mask"),
        (dict(bias=jnp.ones((5, 16))), ValueError, r"bias must broadcast to \[B..., N, T, S\]"),
        (dict(mask=masks.padding(np.array([1, 2, 3]))), ValueError, "padding q_lengths must broadcast"),
        (
            dict(mask=masks.segments(np.zeros((2, 15), int))),
            ValueError,
            r"q_segment_ids must have shape \[B..., 16\]",
        ),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        jattn.attention(*qkv(), **kwargs)


def test_a_traced_scale_is_refused_as_not_static():
    with pytest.raises(TypeError, match=r"scale must be a Python number, fixed when the function is traced"):
        jax.jit(lambda scale: jattn.attention(*qkv(), scale=scale))(0.5)


def test_implementation_that_cannot_run_says_which_can():
    with pytest.raises(NotImplementedError, match=r"implementation='cudnn' cannot run this call: .*can: \["):
        jattn.attention(*qkv(), implementation="cudnn")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_output_dtype_and_shape(dtype):
    q, k, v = qkv(batch=(2, 3), kv_len=24, value_dim=12, dtype=dtype)
    for implementation in ("xla", "chunked"):
        out = jattn.attention(q, k, v, mask=masks.causal(), implementation=implementation)
        assert out.shape == (2, 3, 16, 4, 12) and out.dtype == dtype


def test_explain_names_choice_and_reason():
    q, k, v = qkv()
    choice = jattn.explain(q, k, v, mask=masks.causal())
    assert choice.implementation == "xla" and "MiB" in choice.reason
    assert str(choice).startswith("xla:")
    assert jattn.choose(make_problem(q, k, v)).implementation == "xla"
    with pytest.raises(TypeError, match=r"choose takes a jattn.Problem .* for arrays, jattn.explain"):
        jattn.choose(q)


@pytest.mark.parametrize(
    "mask",
    [
        masks.padding(jnp.array([200])),
        masks.segments(jnp.repeat(jnp.arange(8), 128)[None]),
        masks.from_array(jnp.tril(jnp.ones((1024, 1024), bool))),
        masks.sliding_window(16),
        masks.causal(),
    ],
    ids=["padding", "segments", "array", "window", "causal"],
)
def test_explain_names_the_implementation_attention_runs(mask, monkeypatch):
    """Data masks are traced inside ``attention``'s jit (their layout is all PARTIAL there); explain
    must choose the same way, not from the concrete arrays it was given."""
    ran = []
    for name, impl in list(attention_module._REGISTRY.items()):

        def run(problem, name=name, impl=impl):
            ran.append(name)
            return impl.run(problem)

        monkeypatch.setitem(attention_module._REGISTRY, name, dataclasses.replace(impl, run=run))
    jax.clear_caches()  # attention must trace again, through the wrapped implementations
    q = jax.random.normal(jax.random.key(0), (1, 1024, 1, 8))
    jattn.attention(q, q, q, mask=mask)
    assert ran == [jattn.explain(q, q, q, mask=mask).implementation]


def test_auto_choice_prefers_o_n_memory_for_long_sequences():
    q = jnp.zeros((1, 32768, 8, 64), jnp.float32)  # dense scores would take 32 GiB
    assert jattn.explain(q, q, q).implementation == "chunked"


def test_auto_choice_prefers_o_n_memory_for_a_symbolic_batch():
    """A batch dim that ``jax.export`` leaves symbolic may be any size: chosen as for scores over budget."""
    (batch,) = jax.export.symbolic_shape("b")
    q = jax.ShapeDtypeStruct((batch, 64, 4, 8), jnp.float32)  # concrete batch 1: "xla", 64 KiB of scores
    assert jattn.explain(q, q, q, mask=masks.causal()).implementation == "chunked"


def test_auto_choice_skips_empty_tiles_for_sparse_masks():
    q = jnp.zeros((1, 4096, 1, 8))
    choice = jattn.explain(q, q, q, mask=masks.sliding_window(64))
    assert "tiles non-empty" in choice.reason
    assert choice.implementation in ("banded", "block_sparse", "chunked")


@pytest.mark.parametrize(
    "implementation, mask",
    [("banded", masks.sliding_window(8)), ("block_sparse", masks.causal()), (None, masks.causal())],
    ids=["banded", "block_sparse", "auto"],
)
def test_export_with_a_symbolic_batch(implementation, mask):
    """``jax.export`` with the batch dim left symbolic: sizing the sparse implementations' query
    groups and choosing an implementation must not compare a size of unknown batch with a number."""
    (batch,) = jax.export.symbolic_shape("b")
    q, k, v = qkv(batch=(3,), q_len=64, kv_len=64)
    specs = [jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype) for x in (q, k, v)]
    attend = jax.jit(lambda q, k, v: jattn.attention(q, k, v, mask=mask, implementation=implementation))
    exported = jax.export.export(attend)(*specs)
    expected = jattn.attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(exported.call(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_implementations_are_listed_with_summaries():
    listed = jattn.implementations()
    assert {"xla", "chunked", "cudnn"} <= set(listed) and all(listed.values())


def _temp_bytes(implementation, length):
    x = jax.ShapeDtypeStruct((1, length, 1, 64), jnp.float32)

    def loss(q, k, v):
        return jattn.attention(q, k, v, implementation=implementation).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_is_linear_not_quadratic():
    """Forward+backward at T = S = 16384 (one head, H = 64, float32): chunked needs at most 1/16 of
    the temporary memory of dense attention, per XLA's compiled memory analysis."""
    dense, chunked = _temp_bytes("xla", 16384), _temp_bytes("chunked", 16384)
    assert dense >= 16384 * 16384 * 4  # at least the [T, S] float32 scores
    assert chunked * 16 <= dense, (chunked, dense)
    # Doubling the length roughly doubles chunked's memory (O(T + S)), not quadruples it.
    assert _temp_bytes("chunked", 32768) < 2.5 * chunked


def test_chunked_visits_only_nonempty_tiles():
    layout = masks.sliding_window(512).blocks(8192, 8192, 512, 512)
    plan = make_plan(np.array(layout), 8192, 8192, 512, 512)
    visited = sum(len(row) for row in plan.kv_ids)
    assert visited == int((layout != masks.EMPTY).sum()) == 16 + 15
    assert sum(len(col) for col in plan.q_ids) == visited


def test_implementations_leave_out_the_logits_the_oracle_does():
    """The oracle's cut-off for an excluded logit is the implementations' finite stand-in for -inf:
    the online softmax of chunked, flash and ring cannot weigh a logit below its starting maximum."""
    from jattn.core._common import MASK_VALUE
    from jattn.reference import MASKED_LOGIT

    assert MASKED_LOGIT == MASK_VALUE


def test_bias_is_kept_at_float32_for_low_precision_inputs():
    x = jnp.ones((4, 1, 8), jnp.bfloat16)
    alibi_step = jnp.arange(4, dtype=jnp.float32) * -683.0  # not a bfloat16 number
    problem = make_problem(x, x, x, bias=alibi_step)
    assert problem.bias.dtype == jnp.float32
    np.testing.assert_array_equal(problem.bias.reshape(-1), alibi_step)


@pytest.mark.parametrize("implementation", ["xla", "chunked", "block_sparse"])
def test_a_two_dimensional_boolean_mask_without_batch_dims_and_under_vmap(implementation):
    x = jax.random.normal(jax.random.key(0), (8, 2, 16))  # [T, N, H]: no batch dims
    tril = np.tril(np.ones((8, 8), bool))  # [T, S]
    expected = jattn.attention(x, x, x, mask=masks.causal())
    attend = lambda y: jattn.attention(y, y, y, mask=tril, implementation=implementation)  # noqa: E731
    np.testing.assert_allclose(attend(x), expected, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(attend)(jnp.stack([x, x]))[1], expected, atol=1e-6)


def test_submodules_are_reached_from_the_package_on_first_use():
    """``import jattn`` stays light (no Flax, Optax or matplotlib), yet ``jattn.nn``, ``jattn.train``
    and the other submodules the docs name work without their own import."""
    code = (
        "import sys, jattn\n"
        "heavy = [m for m in ('flax', 'optax', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(jattn.nn.MultiHeadAttention) and callable(jattn.train.load_run)\n"
        "assert callable(jattn.viz.plot_mask) and callable(jattn.maps.attention_weights)\n"
        "assert {'nn', 'train', 'scaling', 'data', 'parallel', 'flops'} <= set(dir(jattn))\n"
        "assert 'importlib' not in dir(jattn)\n"
        "try:\n"
        "    jattn.no_such_thing\n"
        "except AttributeError as err:\n"
        "    assert \"no attribute 'no_such_thing'\" in str(err)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
