"""The shared test suite every exact attention implementation must pass.

Subclass ``AttentionSuite`` once per implementation (``class TestMine(AttentionSuite):
implementation = "mine"``) and narrow the capability flags to what it claims; the whole suite —
forward and gradients against the float64 oracle on random shapes, every mask it supports, GQA and
MQA, cross attention, odd lengths, NaN padding, fully masked rows, bias, softcap, dtypes — is
inherited.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jattn
from jattn import masks
from jattn.reference import attention_reference, attention_vjp_reference

# name -> builder(rng, batch_shape, q_len, kv_len) -> Mask | None
MASK_CASES = {
    "none": lambda rng, b, t, s: None,
    "causal": lambda rng, b, t, s: masks.causal(),
    "sliding_window": lambda rng, b, t, s: masks.sliding_window(
        int(rng.integers(0, 9)), int(rng.integers(0, 9))
    ),
    "causal_window": lambda rng, b, t, s: masks.sliding_window(int(rng.integers(1, 12))),
    "padding": lambda rng, b, t, s: masks.padding(rng.integers(0, t + 1, b), rng.integers(1, s + 1, b)),
    "causal_padding": lambda rng, b, t, s: (
        masks.causal() & masks.padding(rng.integers(0, t + 1, b), rng.integers(1, s + 1, b))
    ),
    "segments": lambda rng, b, t, s: masks.segments(
        np.sort(rng.integers(0, 3, (*b, t)), -1), np.sort(rng.integers(0, 3, (*b, s)), -1)
    ),
    "prefix_lm": lambda rng, b, t, s: masks.prefix_lm(int(rng.integers(0, t + 1))),
    "strided": lambda rng, b, t, s: masks.strided(int(rng.integers(1, 6))),
    "fixed": lambda rng, b, t, s: masks.fixed(8, 2),
    "global_tokens": lambda rng, b, t, s: masks.global_tokens([0, 5]) & masks.causal(),
    "longformer": lambda rng, b, t, s: masks.longformer(4, [0, 3]),
    "bigbird": lambda rng, b, t, s: masks.bigbird(8, num_random=1, seed=int(rng.integers(100))),
    "random_blocks": lambda rng, b, t, s: masks.random_blocks(8, 2, seed=int(rng.integers(100))),
    "from_blocks": lambda rng, b, t, s: masks.from_blocks(rng.random((-(-t // 16), -(-s // 16))) < 0.4, 16),
    "from_fn": lambda rng, b, t, s: masks.from_fn(lambda q, k: (q - k) % 3 == 0),
    "array": lambda rng, b, t, s: masks.from_array(rng.random((*b, 1, t, s)) < 0.7),
    "not_causal": lambda rng, b, t, s: ~masks.causal(),
    "window_or_global": lambda rng, b, t, s: masks.sliding_window(2, 2) | masks.global_tokens([1]),
}

TOLERANCES = {  # dtype -> (forward atol, gradient atol), on outputs and gradients of order one
    "float32": (5e-5, 2e-4),
    "float16": (5e-3, 2e-2),
    "bfloat16": (3e-2, 1e-1),
}


def oracle_mask(mask, batch_shape, num_heads, q_len, kv_len):
    """The mask as a NumPy bool array broadcastable to [B..., N, T, S] (None stays None)."""
    if mask is None:
        return None
    canonical = mask.for_lengths(q_len, kv_len)._canonical(batch_shape, num_heads)
    dense = np.asarray(canonical.tile(jnp.arange(q_len), jnp.arange(kv_len)))
    if dense.ndim == 2:
        return dense
    lead = batch_shape if dense.shape[0] > 1 else (1,) * len(batch_shape)
    return dense.reshape(*lead, *dense.shape[1:])


def make_inputs(rng, batch_shape, q_len, kv_len, num_heads, num_kv_heads, head_dim, value_dim, dtype):
    def draw(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    q = draw(*batch_shape, q_len, num_heads, head_dim)
    k = draw(*batch_shape, kv_len, num_kv_heads, head_dim)
    v = draw(*batch_shape, kv_len, num_kv_heads, value_dim)
    d_out = draw(*batch_shape, q_len, num_heads, value_dim)
    return q, k, v, d_out


def as64(x):
    return None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)


class AttentionSuite:
    """Inherit, set ``implementation`` and narrow the capabilities."""

    implementation: str = ""
    supported_masks: tuple[str, ...] = tuple(MASK_CASES)
    supports_bias: bool = True
    supports_softcap: bool = True
    supports_gqa: bool = True
    supports_value_dim: bool = True  # Hv != H
    second_order: bool = True  # plain autodiff; a hand-written backward raises a clear error instead
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    head_dims: tuple[int, ...] = (8, 16)
    max_len: int = 70
    max_examples: int = 8

    # -- helpers ----------------------------------------------------------------------------
    def attend(self, q, k, v, **kwargs):
        return jattn.attention(q, k, v, implementation=self.implementation, **kwargs)

    def check_against_oracle(
        self, q, k, v, d_out, *, mask=None, bias=None, softcap=None, scale=None, dtype="float32"
    ):
        batch_shape = q.shape[:-3]
        num_heads, q_len, kv_len = q.shape[-2], q.shape[-3], k.shape[-3]
        fwd_tol, grad_tol = TOLERANCES[dtype]

        def loss(q, k, v, bias):
            out = self.attend(q, k, v, mask=mask, bias=bias, softcap=softcap, scale=scale)
            return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)
        dense = oracle_mask(mask, batch_shape, num_heads, q_len, kv_len)
        kwargs = dict(mask=dense, bias=as64(bias), softcap=softcap, scale=scale)
        expected = attention_reference(as64(q), as64(k), as64(v), **kwargs)
        expected_grads = attention_vjp_reference(as64(q), as64(k), as64(v), as64(d_out), **kwargs)
        assert out.dtype == q.dtype and out.shape == expected.shape
        np.testing.assert_allclose(as64(out), expected, atol=fwd_tol, rtol=fwd_tol, err_msg="forward")
        for name, got in zip(("q", "k", "v", "bias"), grads, strict=True):
            if name == "bias" and bias is None:
                continue
            np.testing.assert_allclose(
                as64(got), expected_grads[name], atol=grad_tol, rtol=grad_tol, err_msg=f"d{name}"
            )
        return out, grads

    def _draw_problem(self, data):
        rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
        batch_shape = data.draw(st.sampled_from([(), (1,), (2,), (2, 1)]), label="batch_shape")
        q_len = data.draw(st.integers(1, self.max_len), label="q_len")
        kv_len = data.draw(st.sampled_from([q_len, data.draw(st.integers(1, self.max_len))]), label="kv_len")
        num_kv_heads = data.draw(st.sampled_from([1, 2]), label="num_kv_heads")
        group = data.draw(st.sampled_from([1, 2] if self.supports_gqa else [1]), label="group")
        head_dim = data.draw(st.sampled_from(self.head_dims), label="head_dim")
        value_dim = data.draw(st.sampled_from([head_dim, 12] if self.supports_value_dim else [head_dim]))
        mask_name = data.draw(st.sampled_from(self.supported_masks), label="mask")
        mask = MASK_CASES[mask_name](rng, batch_shape, q_len, kv_len)
        inputs = make_inputs(
            rng,
            batch_shape,
            q_len,
            kv_len,
            num_kv_heads * group,
            num_kv_heads,
            head_dim,
            value_dim,
            jnp.float32,
        )
        return rng, inputs, mask

    # -- the suite ----------------------------------------------------------------------------
    def test_random_problems_match_oracle(self):
        @settings(max_examples=self.max_examples, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.data())
        def run(data):
            _, (q, k, v, d_out), mask = self._draw_problem(data)
            self.check_against_oracle(q, k, v, d_out, mask=mask)

        run()

    @pytest.mark.parametrize("mask_name", sorted(MASK_CASES))
    def test_each_mask_with_gqa_and_odd_lengths(self, mask_name):
        if mask_name not in self.supported_masks:
            pytest.skip(f"{self.implementation} does not claim {mask_name}")
        rng = np.random.default_rng(abs(hash(mask_name)) % 2**32)
        group = 2 if self.supports_gqa else 1
        q, k, v, d_out = make_inputs(
            rng, (2,), 37, 45, 2 * group, 2, self.head_dims[-1], self.head_dims[-1], jnp.float32
        )
        self.check_against_oracle(q, k, v, d_out, mask=MASK_CASES[mask_name](rng, (2,), 37, 45))

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
    def test_dtypes(self, dtype):
        if dtype not in self.dtypes:
            pytest.skip(f"{self.implementation} does not claim {dtype}")
        rng = np.random.default_rng(1)
        q, k, v, d_out = make_inputs(rng, (1,), 33, 33, 2, 2, 16, 16, jnp.dtype(dtype))
        mask = MASK_CASES[self.supported_masks[min(1, len(self.supported_masks) - 1)]](rng, (1,), 33, 33)
        self.check_against_oracle(q, k, v, d_out, mask=mask, dtype=dtype)

    @pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
    def test_a_scale_16_bits_cannot_hold_multiplies_float32_scores(self, dtype):
        """Folded into a 16-bit q, a scale such as 3 (or 1/√H for H = 32 or 128) would be rounded
        with q·scale, and every logit with them: in bfloat16 0.096 off the oracle here, against
        0.011 for ``jax.nn.dot_product_attention``, which scales the float32 scores."""
        if dtype not in self.dtypes:
            pytest.skip(f"{self.implementation} does not claim {dtype}")
        rng = np.random.default_rng(5)
        q, k, v, d_out = make_inputs(rng, (1,), 64, 64, 2, 2, 16, 16, jnp.dtype(dtype))
        mask = MASK_CASES[self.supported_masks[0]](rng, (1,), 64, 64)
        d_out = d_out / 8  # dq and dk grow with the scale (up to 31 here); the tolerances assume order one
        self.check_against_oracle(q, k, v, d_out, mask=mask, scale=3.0, dtype=dtype)

    def test_cross_attention_and_no_batch_dims(self):
        rng = np.random.default_rng(2)
        q, k, v, d_out = make_inputs(rng, (), 19, 53, 2, 2, 8, 8, jnp.float32)
        self.check_against_oracle(q, k, v, d_out, mask=MASK_CASES[self.supported_masks[0]](rng, (), 19, 53))

    def test_an_empty_batch_gives_empty_outputs_and_gradients(self):
        rng = np.random.default_rng(9)
        q, k, v, _ = make_inputs(rng, (0,), 24, 24, 2, 2, 8, 8, jnp.float32)
        mask = MASK_CASES[self.supported_masks[0]](rng, (0,), 24, 24)
        out, grads = jax.value_and_grad(lambda *qkv: self.attend(*qkv, mask=mask).sum(), argnums=(0, 1, 2))(
            q, k, v
        )
        assert out.shape == () and [g.shape for g in grads] == [q.shape, k.shape, v.shape]

    def test_fully_masked_rows_give_zeros_and_zero_grads(self):
        rng = np.random.default_rng(3)
        q, k, v, d_out = make_inputs(rng, (2,), 24, 24, 2, 2, 8, 8, jnp.float32)
        name = "causal_padding" if "causal_padding" in self.supported_masks else self.supported_masks[0]
        mask = MASK_CASES[name](rng, (2,), 24, 24)
        if name == "causal_padding":  # second batch element: no queries and no keys are valid
            mask = masks.causal() & masks.padding(np.array([10, 0]), np.array([24, 0]))
        out, (dq, _, _, _) = self.check_against_oracle(q, k, v, d_out, mask=mask)
        dense = oracle_mask(mask, (2,), 2, 24, 24)
        empty_rows = ~np.broadcast_to(dense, (2, 2, 24, 24)).any(-1)  # [B, N, T]
        if name == "causal_padding":
            assert empty_rows.any()
        rows = np.moveaxis(empty_rows, -2, -1)  # [B, T, N]
        assert np.all(np.asarray(out)[rows] == 0) and np.all(np.asarray(dq)[rows] == 0)

    def test_nan_in_padding_does_not_leak(self):
        name = next((m for m in ("padding", "causal_padding") if m in self.supported_masks), None)
        if name is None:
            pytest.skip(f"{self.implementation} does not claim padding masks")
        rng = np.random.default_rng(4)
        q, k, v, d_out = make_inputs(rng, (2,), 29, 29, 2, 2, 8, 8, jnp.float32)
        q_lengths, kv_lengths = np.array([20, 29]), np.array([13, 25])
        mask = masks.padding(q_lengths, kv_lengths)
        if name == "causal_padding":
            mask = masks.causal() & mask
        positions = np.arange(29)
        q_pad = (positions[None, :] >= q_lengths[:, None])[..., None, None]  # [B, T, 1, 1]
        kv_pad = (positions[None, :] >= kv_lengths[:, None])[..., None, None]
        q, k, v = jnp.where(q_pad, jnp.nan, q), jnp.where(kv_pad, jnp.nan, k), jnp.where(kv_pad, jnp.nan, v)
        out, grads = self.check_against_oracle(q, k, v, d_out, mask=mask)
        assert np.isfinite(np.asarray(out)).all()
        assert all(np.isfinite(np.asarray(g)).all() for g in grads[:3])

    def test_nan_in_keys_only_padded_query_rows_reach_stays_out(self):
        """Keys that no real query attends may hold NaN (an unfilled KV cache). With T not a tile
        multiple, the tile's padded query rows reached them by position (causal: row 31 reaches key
        31) or by their padding segment id, and 0 · NaN made every output NaN."""
        rng = np.random.default_rng(11)
        cases = []
        if "causal" in self.supported_masks:
            cases.append((masks.causal(), 31, 66, np.arange(66) >= 31))
        if "segments" in self.supported_masks:
            kv_ids = np.repeat([0, 1], 5)
            cases.append((masks.segments(np.array([1]), kv_ids), 1, 10, kv_ids == 0))
        if not cases:
            pytest.skip(f"{self.implementation} claims neither causal nor segment masks")
        for mask, q_len, kv_len, unattended in cases:
            q, k, v, d_out = make_inputs(rng, (1,), q_len, kv_len, 2, 1, 8, 8, jnp.float32)
            nan = unattended[None, :, None, None]  # [1, S, 1, 1]
            k, v = jnp.where(nan, jnp.nan, k), jnp.where(nan, jnp.nan, v)
            self.check_against_oracle(q, k, v, d_out, mask=mask)

    def test_large_bias_on_a_padded_query_tile_keeps_gradients_finite(self):
        """A per-key bias of 90 (float32) with T = 3: the padded query rows of the tile see it too,
        and must not overflow into inf · 0 = NaN in dk, dv or dbias."""
        if not self.supports_bias:
            pytest.skip(f"{self.implementation} takes no bias")
        rng = np.random.default_rng(12)
        q, k, v, d_out = make_inputs(rng, (1,), 3, 16, 1, 1, 8, 8, jnp.float32)
        bias = jnp.zeros((16,), jnp.float32).at[5].set(90.0)  # broadcast over batch, heads, queries
        self.check_against_oracle(
            q, k, v, d_out, mask=MASK_CASES[self.supported_masks[0]](rng, (1,), 3, 16), bias=bias
        )

    def test_bias_and_softcap(self):
        """Per-head bias and masks under grouped-query attention (N=4 query heads on K=2 key heads):
        each query head must get its own slice, not its group's or another group's."""
        rng = np.random.default_rng(5)
        q, k, v, d_out = make_inputs(rng, (2,), 21, 26, 4, 2, 8, 8, jnp.float32)
        mask = MASK_CASES[self.supported_masks[0]](rng, (2,), 21, 26)
        if self.supports_bias:
            bias = jnp.asarray(3 * rng.normal(size=(1, 4, 21, 26)), jnp.float32)  # shared over the batch
            self.check_against_oracle(q, k, v, d_out, mask=mask, bias=bias)
            alibi_like = jnp.asarray(3 * rng.normal(size=(4, 1, 26)), jnp.float32)  # [N, 1, S]
            self.check_against_oracle(q, k, v, d_out, mask=mask, bias=alibi_like)
        if "array" in self.supported_masks:
            per_head = masks.from_array(rng.random((2, 4, 21, 26)) < 0.5)  # [B, N, T, S]
            self.check_against_oracle(q, k, v, d_out, mask=per_head)
        if self.supports_softcap:
            self.check_against_oracle(q * 4, k, v, d_out, mask=mask, softcap=2.0)

    def test_second_derivatives(self):
        """Grad of grad equals that of "xla" (plain autodiff of the dense math), or, for a hand-written
        backward, raises an error naming the implementation instead of failing inside JAX."""
        rng = np.random.default_rng(10)
        q, k, v, _ = make_inputs(rng, (1,), 24, 24, 2, 1, 8, 8, jnp.float32)
        mask = MASK_CASES[self.supported_masks[-1]](rng, (1,), 24, 24)

        def squared_grad(implementation):
            def attend(x):
                return jattn.attention(x, k, v, mask=mask, implementation=implementation).sum()

            return lambda x: jnp.sum(jax.grad(attend)(x) ** 2)

        if not self.second_order:
            message = rf"implementation='{self.implementation}' has first-order gradients only"
            with pytest.raises(NotImplementedError, match=message):
                jax.grad(squared_grad(self.implementation))(q)
            return
        expected = jax.grad(squared_grad("xla"))(q)
        np.testing.assert_allclose(
            jax.grad(squared_grad(self.implementation))(q), expected, atol=1e-4, rtol=1e-4
        )

    def test_nan_bias_where_masked_stays_out_of_softcap_gradients(self):
        """The tanh's derivative at a masked NaN score would be NaN, and 0 · NaN is NaN."""
        if not (self.supports_bias and self.supports_softcap and "causal" in self.supported_masks):
            pytest.skip(f"{self.implementation} takes no causal mask with bias and softcap")
        rng = np.random.default_rng(9)
        q, k, v, d_out = make_inputs(rng, (1,), 24, 24, 2, 2, 8, 8, jnp.float32)
        bias = jnp.asarray(np.where(np.tri(24, dtype=bool), 0.5, np.nan), jnp.float32)  # NaN above diagonal
        _, grads = self.check_against_oracle(
            q, k, v, d_out, mask=MASK_CASES["causal"](rng, (1,), 24, 24), bias=bias, softcap=2.0
        )
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)

    def test_additive_padding_bias(self):
        """A bias of -inf leaves keys out as a mask does, and a row of them gives zeros (the oracle's
        rule). float32's most negative number stays finite with bfloat16 inputs: the bias is kept at
        float32, where a cast to bfloat16 would make it -inf."""
        if not self.supports_bias:
            pytest.skip(f"{self.implementation} takes no bias")
        rng = np.random.default_rng(8)
        valid = np.arange(12) < 7
        allowed_pairs = valid[:, None] & valid[None, :]  # [T, S]: rows and keys past 7 are padding
        mask = MASK_CASES[self.supported_masks[0]](rng, (2,), 12, 12)
        q, k, v, d_out = make_inputs(rng, (2,), 12, 12, 2, 2, 8, 8, jnp.float32)
        minus_inf = jnp.asarray(np.where(allowed_pairs, 0.0, -np.inf), jnp.float32)
        for softcap in (None, 2.0) if self.supports_softcap else (None,):
            out, grads = self.check_against_oracle(q, k, v, d_out, mask=mask, bias=minus_inf, softcap=softcap)
            assert np.all(np.asarray(out)[:, ~valid] == 0) and np.isfinite(np.asarray(grads[3])).all()
        if self.supports_softcap and "none" in self.supported_masks:  # the cap keeps the additive mask
            kept = np.flatnonzero(valid)
            cut = self.attend(q[:, kept], k[:, kept], v[:, kept], mask=None, softcap=2.0)
            full = self.attend(q, k, v, mask=None, bias=minus_inf, softcap=2.0)
            np.testing.assert_allclose(np.asarray(full)[:, kept], cut, atol=1e-5, rtol=1e-5)
        if "bfloat16" in self.dtypes:
            q, k, v, d_out = make_inputs(rng, (2,), 12, 12, 2, 2, 8, 8, jnp.bfloat16)
            most_negative = jnp.asarray(np.where(allowed_pairs, 0.0, np.finfo(np.float32).min), jnp.float32)
            self.check_against_oracle(q, k, v, d_out, mask=mask, bias=most_negative, dtype="bfloat16")

    def test_a_large_finite_additive_mask_matches_xla(self):
        """T5X-style padding, -1e9 to -1e30 added to padded rows and keys: a padded row's logits are
        all near that value and round alike, so it attends uniformly; finite masks are not masks to
        the oracle, and float32 cannot hold their digits, so the peer is XLA at the same dtype. The
        loss reads valid rows only, as a padded batch's does."""
        if not self.supports_bias:
            pytest.skip(f"{self.implementation} takes no bias")
        rng = np.random.default_rng(10)
        valid = np.arange(16) < 12
        mask = MASK_CASES[self.supported_masks[0]](rng, (2,), 16, 16)
        for dtype in [d for d in ("float32", "float16") if d in self.dtypes]:
            q, k, v, d_out = make_inputs(rng, (2,), 16, 16, 1, 1, 16, 16, jnp.dtype(dtype))
            d_out = d_out * valid[:, None, None]
            for value in (-1e9, -1e30):
                bias = jnp.asarray(np.where(valid[:, None] & valid[None, :], 0.0, value), jnp.float32)

                def loss(q, k, v, implementation, bias=bias):
                    out = jattn.attention(q, k, v, mask=mask, bias=bias, implementation=implementation)
                    return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

                grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
                (_, got), got_grads = grad(q, k, v, self.implementation)
                (_, want), want_grads = grad(q, k, v, "xla")
                tol = TOLERANCES[dtype][1]
                pairs = zip(("out", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads), strict=True)
                for name, a, b in pairs:
                    np.testing.assert_allclose(
                        as64(a), as64(b), atol=tol, rtol=tol, err_msg=f"{value}: {name}"
                    )

    def test_matches_jax_nn_dot_product_attention(self):
        rng = np.random.default_rng(6)
        q, k, v, _ = make_inputs(rng, (2,), 40, 40, 4, 2, 16, 16, jnp.float32)
        for is_causal in (False, True):
            mask = masks.causal() if is_causal else None
            if mask is not None and "causal" not in self.supported_masks:
                continue
            if mask is None and "none" not in self.supported_masks:
                continue
            expected = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
            np.testing.assert_allclose(self.attend(q, k, v, mask=mask), expected, atol=1e-5, rtol=1e-5)

    def test_jit_and_vmap_compose(self):
        rng = np.random.default_rng(7)
        q, k, v, _ = make_inputs(rng, (3,), 16, 16, 2, 2, 8, 8, jnp.float32)
        mask = MASK_CASES[self.supported_masks[0]](rng, (), 16, 16)
        per_example = functools.partial(self.attend, mask=mask)
        batched = jax.jit(jax.vmap(per_example))(q, k, v)
        np.testing.assert_allclose(batched, self.attend(q, k, v, mask=mask), atol=1e-5, rtol=1e-5)
