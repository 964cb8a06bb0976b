"""Comparison plots of finished runs (matplotlib, written as PNG files)."""

from __future__ import annotations

import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_learning_curves(curves: dict[str, list[dict]], metric: str, path: pathlib.Path) -> None:
    """One line per run: ``metric`` of the validation records against the step."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, records in curves.items():
        points = [(r["step"], r[metric]) for r in records if r["split"] == "val"]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:  # every run stopped (diverged) before its first validation step
        ax.text(0.5, 0.5, "no run reached a validation step", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(values: dict[str, float | None], ylabel: str, path: pathlib.Path) -> None:
    """One bar per run (final metric, time per step, ...); a missing value (None or NaN) is an
    empty bar labelled "n/a"."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    labels = list(values)
    known = {k: v for k, v in values.items() if v is not None and not math.isnan(v)}
    bars = ax.bar(labels, [known.get(k, 0.0) for k in labels], color="tab:blue")
    ax.bar_label(bars, labels=[f"{known[k]:.3g}" if k in known else "n/a" for k in labels], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
