"""Plots: a plain module of functions, each returning a matplotlib ``Figure`` (no pyplot state).

``plot_mask`` draws a mask and its block layout side by side, like the pattern figures of the
Sparse Transformer (Child et al. 2019) and BigBird (Zaheer et al. 2020) papers.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from jattn import masks as masks_lib
from jattn._checks import check_int

_TILES = (  # (class, color, legend)
    (masks_lib.EMPTY, "#ffffff", "empty (skipped)"),
    (masks_lib.PARTIAL, "#9ecae1", "partial (masked)"),
    (masks_lib.FULL, "#08519c", "full"),
)


def _first_example(dense, q_len: int, kv_len: int) -> np.ndarray:
    """A mask's dense ``[..., T, S]`` view -> ``[T, S]`` of its first batch element and head."""
    dense = np.asarray(dense)
    return np.broadcast_to(dense, (*dense.shape[:-2], q_len, kv_len)).reshape(-1, q_len, kv_len)[0]


def plot_mask(
    mask: masks_lib.Mask, q_len: int, kv_len: int, *, block: int = 16, title: str | None = None, path=None
) -> Figure:
    """Draw ``mask`` as a ``[T, S]`` image next to its block layout at ``block × block`` tiles.

    Args:
      mask: any ``jattn.masks`` mask (a data-dependent one is drawn for its first batch element and
        head; its segment ids or boolean array must fit ``q_len`` and ``kv_len``, as in
        ``jattn.attention``).
      q_len: T, rows. kv_len: S, columns.
      block: tile size of the layout panel (the tiles ``block_sparse`` and ``flash`` skip or visit).
      title: figure title; defaults to the mask's class name.
      path: if given, the figure is also written there as a PNG.
    Returns:
      The matplotlib ``Figure``.
    """
    if not isinstance(mask, masks_lib.Mask):
        raise TypeError(f"mask must be a jattn.masks.Mask, got {type(mask).__name__}")
    block = check_int("block", block)
    allowed = _first_example(mask.dense(q_len, kv_len), q_len, kv_len)  # [T, S]
    layout = mask.blocks(q_len, kv_len, block, block)  # [nq, nk]

    fig = Figure(figsize=(9, 4.4), layout="constrained")
    dense_ax, layout_ax = fig.subplots(1, 2)
    on_off = ListedColormap([_TILES[0][1], _TILES[-1][1]])
    dense_ax.imshow(allowed, cmap=on_off, vmin=0, vmax=1, interpolation="nearest")
    dense_ax.set_title(f"mask [T={q_len}, S={kv_len}]: {allowed.mean():.0%} attended")
    colors = ListedColormap([color for _, color, _ in _TILES])  # indexed by tile class 0, 1, 2
    layout_ax.imshow(layout, cmap=colors, vmin=0, vmax=2, interpolation="nearest")
    layout_ax.set_xticks(np.arange(-0.5, layout.shape[1]), minor=True)
    layout_ax.set_yticks(np.arange(-0.5, layout.shape[0]), minor=True)
    layout_ax.grid(which="minor", color="#bdbdbd", linewidth=0.5)
    layout_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    layout_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    layout_ax.tick_params(which="minor", length=0)
    layout_ax.set_title(f"blocks of {block}: {np.mean(layout != masks_lib.EMPTY):.0%} of tiles visited")
    for ax, (rows, cols) in ((dense_ax, ("query t", "key s")), (layout_ax, ("query block", "key block"))):
        ax.set_ylabel(rows)
        ax.set_xlabel(cols)
    handles = [Patch(facecolor=color, edgecolor="#636363", label=name) for _, color, name in _TILES]
    layout_ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8)
    fig.suptitle(title or type(mask).__name__)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------------------------------------
# Attention maps (jattn.maps)
# ---------------------------------------------------------------------------------------------

_STATISTICS = (  # (key of jattn.maps.summarize_heads, axis label)
    ("entropy", "entropy (nats)"),
    ("distance", "mean distance |t - s|"),
    ("first_token", "mass on the first token"),
)


def plot_attention_heads(
    weights, q_labels, kv_labels, *, title: str = "", max_columns: int = 2, path=None
) -> Figure:
    """A grid of heatmaps, one per head, of attention weights with token labels on both axes.

    Args:
      weights: ``[N, T, S]`` (e.g. one layer of ``jattn.maps.attention_weights`` for one example).
      q_labels: T labels of the query rows. kv_labels: S labels of the key columns.
      title: figure title. max_columns: heads per row of the grid.
      path: if given, the figure is also written there as a PNG.
    Returns:
      The matplotlib ``Figure``.
    """
    weights = np.asarray(weights, np.float32)
    if weights.ndim != 3 or 0 in weights.shape:
        raise ValueError(f"weights must be [N, T, S] with N, T, S >= 1, got shape {weights.shape}")
    num_heads, q_len, kv_len = weights.shape
    if len(q_labels) != q_len or len(kv_labels) != kv_len:
        raise ValueError(
            f"need {q_len} query labels and {kv_len} key labels for weights of shape {weights.shape}, got "
            f"{len(q_labels)} and {len(kv_labels)}"
        )
    max_columns = check_int("max_columns", max_columns)
    columns = min(num_heads, max_columns)
    rows = -(-num_heads // columns)
    cell = max(3.0, 0.15 * max(q_len, kv_len))  # inches per head, so every label stays legible
    fig = Figure(figsize=(cell * columns + 1.0, cell * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).reshape(-1)
    font = 8 if max(q_len, kv_len) <= 40 else 6
    image = None
    for head, ax in enumerate(axes):
        if head >= num_heads:
            ax.set_axis_off()
            continue
        image = ax.imshow(weights[head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(np.arange(kv_len), labels=list(kv_labels), fontsize=font, rotation=90)
        ax.set_yticks(np.arange(q_len), labels=list(q_labels), fontsize=font)
        ax.tick_params(length=0)
        ax.set_title(f"head {head}", fontsize=9)
        ax.set_xlabel("key (attended)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=axes.tolist(), shrink=0.6, label="weight")  # type: ignore[arg-type]
    fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _num_heads(summaries: dict[str, dict[str, np.ndarray]], keys: list[str]) -> int:
    """N, checking that every ``summaries[layer][key]`` is ``[N]`` with the same N >= 1."""
    first_layer = next(iter(summaries))
    first = np.shape(summaries[first_layer][keys[0]])
    for layer, summary in summaries.items():
        for key in keys:
            if key not in summary:
                raise ValueError(
                    f"summaries[{layer!r}] has no {key!r}; every layer needs the statistics {keys}"
                )
            shape = np.shape(summary[key])
            if len(shape) != 1 or shape[0] == 0:
                raise ValueError(
                    f"summaries[{layer!r}][{key!r}] must be [N] with N >= 1, one value per head "
                    f"(jattn.maps.summarize_heads of one example), got shape {shape}"
                )
            if shape != first:
                raise ValueError(
                    f"summaries[{layer!r}][{key!r}] has shape {shape} but summaries[{first_layer!r}]"
                    f"[{keys[0]!r}] has shape {first}: every layer and statistic needs the same number "
                    "of heads"
                )
    return first[0]


def plot_head_statistics(
    summaries: dict[str, dict[str, np.ndarray]], *, title: str = "", path=None
) -> Figure:
    """Per-head entropy, mean attended distance and first-token mass, one bar group per layer.

    Args:
      summaries: ``{layer name: jattn.maps.summarize_heads(...)}`` for one example, each value ``[N]``
        with the same N everywhere. The statistics of the first layer are drawn (a Linformer summary
        has only the entropy) and every layer must have them.
      title: figure title. path: if given, the figure is also written there as a PNG.
    Returns:
      The matplotlib ``Figure``.
    """
    if not summaries:
        raise ValueError("summaries must hold at least one layer")
    layers = list(summaries)
    shown = [(key, label) for key, label in _STATISTICS if key in summaries[layers[0]]]
    if not shown:
        raise ValueError(
            f"summaries[{layers[0]!r}] has none of the statistics {[key for key, _ in _STATISTICS]}; "
            "pass jattn.maps.summarize_heads(...) per layer"
        )
    num_heads = _num_heads(summaries, [key for key, _ in shown])
    fig = Figure(figsize=(3.7 * len(shown), 3.4), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    width = 0.8 / num_heads
    positions = np.arange(len(layers))
    for ax, (key, label) in zip(axes, shown, strict=True):
        for head in range(num_heads):
            values = [float(summaries[layer][key][head]) for layer in layers]
            ax.bar(positions + (head - (num_heads - 1) / 2) * width, values, width, label=f"head {head}")
        ax.set_xticks(positions, labels=layers, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
