"""plot_mask draws the dense mask and its block layout, writes a PNG, and rejects bad input."""

import numpy as np
import pytest

from jattn import masks, viz


def test_plot_mask_shows_the_mask_and_its_layout(tmp_path):
    mask = masks.longformer(4, [0])
    path = tmp_path / "longformer.png"
    fig = viz.plot_mask(mask, 40, 48, block=8, path=path)
    dense_ax, layout_ax = fig.axes[:2]
    np.testing.assert_array_equal(dense_ax.images[0].get_array(), mask.dense(40, 48))
    np.testing.assert_array_equal(layout_ax.images[0].get_array(), mask.blocks(40, 48, 8, 8))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_mask_draws_the_first_example_of_a_data_mask():
    mask = masks.padding(np.array([3, 10]))
    fig = viz.plot_mask(mask, 10, 10, block=4)
    assert fig.axes[0].images[0].get_array().sum() == 9  # 3 valid queries x 3 valid keys


def test_plot_mask_bad_input():
    with pytest.raises(ValueError, match="block must be > 0"):
        viz.plot_mask(masks.causal(), 8, 8, block=0)
    with pytest.raises(ValueError, match="q_len must be > 0"):
        viz.plot_mask(masks.causal(), 0, 8)
    with pytest.raises(TypeError, match="mask must be a jattn.masks.Mask"):
        viz.plot_mask(np.ones((8, 8), bool), 8, 8)
