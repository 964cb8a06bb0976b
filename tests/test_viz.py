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
    with pytest.raises(ValueError, match="block must be an int >= 1"):
        viz.plot_mask(masks.causal(), 8, 8, block=0)
    with pytest.raises(ValueError, match="q_len must be an int >= 1"):
        viz.plot_mask(masks.causal(), 0, 8)
    with pytest.raises(TypeError, match="mask must be a jattn.masks.Mask"):
        viz.plot_mask(np.ones((8, 8), bool), 8, 8)


def test_plot_mask_rejects_data_masks_that_do_not_fit_the_lengths():
    segments = masks.segments(np.array([[0, 0, 1, 1]]))  # [B=1, 4]
    viz.plot_mask(segments, 4, 4, block=2)
    with pytest.raises(ValueError, match=r"q_segment_ids must have shape \[B\.\.\., 8\]"):
        viz.plot_mask(segments, 8, 8, block=2)
    with pytest.raises(ValueError, match=r"mask array must end in \[T, S\] = \[4, 4\].*got shape \(8, 8\)"):
        viz.plot_mask(masks.from_array(np.tri(8, dtype=bool)), 4, 4, block=2)
    with pytest.raises(ValueError, match="q_segment_ids"):  # also inside a combination
        viz.plot_mask(masks.causal() & segments, 8, 8, block=2)
    per_head = np.ones((2, 3, 8, 8), bool)  # [B, N, T, S]: batch and head dims are not lengths
    per_head[0, 0] = np.tri(8, dtype=bool)
    fig = viz.plot_mask(masks.causal() & masks.from_array(per_head), 8, 8, block=4)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), np.tri(8, dtype=bool))


def test_plot_attention_heads_rejects_empty_weights():
    with pytest.raises(
        ValueError, match=r"weights must be \[N, T, S\] with N, T, S >= 1, got shape \(0, 2, 2\)"
    ):
        viz.plot_attention_heads(np.zeros((0, 2, 2)), ["a", "b"], ["a", "b"])


def _summary(num_heads, keys=("entropy", "distance", "first_token")):
    return {key: np.arange(num_heads, dtype=float) for key in keys}


def test_plot_head_statistics_draws_every_head_of_every_layer():
    fig = viz.plot_head_statistics({"l0": _summary(3), "l1": _summary(3)})
    assert [len(ax.patches) for ax in fig.axes[:3]] == [6, 6, 6]  # 3 heads x 2 layers per statistic
    only_entropy = viz.plot_head_statistics({"l0": _summary(2, ["entropy"])})  # a Linformer summary
    assert len(only_entropy.axes) == 1 and only_entropy.axes[0].get_ylabel() == "entropy (nats)"


def test_plot_head_statistics_rejects_inconsistent_heads_and_batched_summaries():
    for summaries in ({"l0": _summary(2), "l1": _summary(4)}, {"l0": _summary(4), "l1": _summary(2)}):
        with pytest.raises(
            ValueError, match=r"summaries\['l1'\]\['entropy'\] has shape .* same number of heads"
        ):
            viz.plot_head_statistics(summaries)
    mixed = {"l0": {**_summary(3), "first_token": np.ones(2)}}
    with pytest.raises(ValueError, match=r"summaries\['l0'\]\['first_token'\] has shape \(2,\)"):
        viz.plot_head_statistics(mixed)
    batched = {"l0": {key: value[None] for key, value in _summary(4).items()}}  # [1, N]
    with pytest.raises(
        ValueError, match=r"summaries\['l0'\]\['entropy'\] must be \[N\] .* got shape \(1, 4\)"
    ):
        viz.plot_head_statistics(batched)
    with pytest.raises(ValueError, match=r"summaries\['l1'\] has no 'distance'"):
        viz.plot_head_statistics({"l0": _summary(2), "l1": _summary(2, ["entropy"])})
    with pytest.raises(ValueError, match=r"summaries\['l0'\] has none of the statistics"):
        viz.plot_head_statistics({"l0": {}})
