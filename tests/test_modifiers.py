"""ALiBi bias helper."""

import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.reference import attention_reference


def test_slopes_follow_the_paper():
    np.testing.assert_allclose(jattn.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
    six = np.asarray(jattn.alibi_slopes(6))  # 4 from the power of two, 2 interleaved from 8
    np.testing.assert_allclose(six[:4], [2.0 ** (-2 * (i + 1)) for i in range(4)], rtol=1e-6)
    np.testing.assert_allclose(six[4:], [2.0**-1, 2.0**-3], rtol=1e-6)


def test_bias_is_negative_distance_and_works_as_attention_bias():
    bias = jattn.alibi_bias(2, 4, 5)
    assert bias.shape == (2, 4, 5)
    np.testing.assert_allclose(bias[0, 3], -0.0625 * np.abs(3 - np.arange(5)))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, n, 2, 8)), jnp.float32) for n in (4, 5, 5))
    out = jattn.attention(q, k, v, bias=bias)
    expected = attention_reference(q, k, v, bias=np.asarray(bias, np.float64))
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("args", [(0, 4), (2, -1), (2, 4, 0)])
def test_bad_sizes(args):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        jattn.alibi_bias(*args)


@pytest.mark.parametrize(
    ("offset", "error", "message"),
    [
        (None, TypeError, "offset must be an int"),
        (1.5, TypeError, "offset must be an int"),
        (-1, ValueError, ">= 0"),
    ],
)
def test_bad_offsets_are_refused_by_name(offset, error, message):
    with pytest.raises(error, match=message):
        jattn.alibi_bias(2, 4, 8, offset=offset)
