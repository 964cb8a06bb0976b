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
        head).
      q_len: T, rows. kv_len: S, columns.
      block: tile size of the layout panel (the tiles ``block_sparse`` and ``flash`` skip or visit).
      title: figure title; defaults to the mask's class name.
      path: if given, the figure is also written there as a PNG.
    Returns:
      The matplotlib ``Figure``.
    """
    if not isinstance(mask, masks_lib.Mask):
        raise TypeError(f"mask must be a jattn.masks.Mask, got {type(mask).__name__}")
    block = masks_lib._check_positive_int("block", block)
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
