"""Draw what a trained character-level language model attends to.

    python experiments/visualize.py <run folder> [--text "..."] [--out DIR] [--step N] [--top K]

Loads the run's config and checkpoint (the latest, or ``--step``), feeds ``--text`` (default: "The
skilled surgeon operated on the patient with a") with the attention modules in capture mode
(``jattn.maps.set_capture``), and writes to ``--out`` (default ``<run folder>/attention_maps``):

    layer<i>.png      a grid of heads of layer i: weights of every query character (rows) over the
                      characters it may attend to (columns); implicit weights for linear-cost variants
    statistics.png    per head and layer: entropy, mean attended distance, mass on the first character
    statistics.md     the same as a table, with the top attended characters of the last position

and prints the table and the model's most likely next characters.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np

from jattn import maps, viz
from jattn.train import ConfigError, build_task, load_run
from jattn.train.build import model_max_len

DEFAULT_TEXT = "The skilled surgeon operated on the patient with a"
_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥"}


def char_label(char: str) -> str:
    """A character as an axis label: whitespace made visible."""
    return _VISIBLE.get(char, char)


def encode_text(task, text: str, max_len: int) -> np.ndarray:
    """``text`` as token ids ``[T]`` of the run's character vocabulary.

    Raises:
      ValueError: the task is not character-level, the text is empty, holds characters outside the
        vocabulary (named), or is longer than the model's ``max_len``.
    """
    vocabulary = getattr(task, "vocabulary", None)
    if vocabulary is None:
        raise ValueError(
            f"visualize needs a character-level language model (task.name: text), got a run of task "
            f"{type(task).__name__}"
        )
    if not text:
        raise ValueError("--text must hold at least one character, got an empty string")
    unknown = sorted(set(text) - set(vocabulary))
    if unknown:
        raise ValueError(
            f"--text holds {len(unknown)} character(s) outside the model's vocabulary of {len(vocabulary)}: "
            f"{''.join(unknown)!r}; use only characters of the training text"
        )
    if len(text) > max_len:
        raise ValueError(
            f"--text has {len(text)} characters, more than the model's maximum length max_len={max_len}; "
            "shorten it"
        )
    return task.encode(text)


def top_attended(weights, labels: list[str], k: int) -> list[list[tuple[str, int, float]]]:
    """Per head, the ``k`` keys with the largest weight: ``(label, position, weight)``.

    Args:
      weights: ``[N, S]``, one query row per head.
    """
    weights = np.asarray(weights)
    order = np.argsort(-weights, axis=-1, kind="stable")[:, :k]  # [N, k]
    return [[(labels[s], int(s), float(weights[h, s])) for s in row] for h, row in enumerate(order)]


def statistics_table(summaries: dict[str, dict], tops: dict[str, list]) -> str:
    """Markdown: one row per (layer, head) with its statistics and top attended characters."""
    lines = [
        "| layer | head | entropy (nats) | mean distance | first-token mass | last position attends to |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for layer, summary in summaries.items():
        for head, top in enumerate(tops[layer]):
            attended = ", ".join(f"`{label}`@{pos} {weight:.2f}" for label, pos, weight in top)
            lines.append(
                f"| {layer} | {head} | {summary['entropy'][head]:.2f} | {summary['distance'][head]:.1f} | "
                f"{summary['first_token'][head]:.2f} | {attended} |"
            )
    return "\n".join(lines)


def visualize(run_dir: pathlib.Path, text: str, out_dir: pathlib.Path, *, step=None, top: int = 3) -> str:
    """Write the maps, the statistics plot and table of ``text`` for the run; returns the table."""
    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not a run folder (no config.yaml); train one with experiments/train.py"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, or no permission
        raise ValueError(f"output folder {str(out_dir)!r} (--out) cannot be made: {err.strerror}") from None
    config, model, step = load_run(run_dir, step)
    task = build_task(config)
    tokens = encode_text(task, text, model_max_len(config.model, task.spec))  # [T]
    maps.set_capture(model, maps.CAPTURE_KINDS)
    logits, captured = maps.run_captured(model, tokens[None])  # logits [1, T, V]
    labels = [char_label(c) for c in text]

    attention = f"{config.attention.display_name} {config.attention.options or ''}".strip()
    summaries, tops = {}, {}
    for index, values in enumerate(captured.values()):
        layer = f"layer {index}"
        weights = np.asarray(values["attention_weights"])[0]  # [N, T, S]
        kv_labels = (
            labels if weights.shape[-1] == len(labels) else [f"p{i}" for i in range(weights.shape[-1])]
        )
        viz.plot_attention_heads(
            weights,
            labels,
            kv_labels,
            title=f"{config.name}: {attention}, {layer}, step {step}",
            path=out_dir / f"layer{index}.png",
        )
        stats = jax.tree.map(lambda x: np.asarray(x)[0], values["attention_statistics"])  # [N, T] each
        summaries[layer] = maps.summarize_heads(stats)
        tops[layer] = top_attended(weights[:, -1], kv_labels, top)
    viz.plot_head_statistics(
        summaries, title=f"{config.name}: {attention}, step {step}", path=out_dir / "statistics.png"
    )
    table = statistics_table(summaries, tops)
    probs = np.asarray(jax.nn.softmax(logits[0, -1]))  # [V]
    likely = np.argsort(-probs)[:5]
    guesses = ", ".join(f"`{char_label(task.decode([i]))}` {probs[i]:.2f}" for i in likely)
    report = "\n".join(
        [
            f"# Attention of {config.name} ({attention}), checkpoint step {step}",
            "",
            f'Text ({len(text)} characters): "{text}"',
            "",
            f"Most likely next characters: {guesses}",
            "",
            "Statistics are means over the query positions; the last column is the last position's top "
            f"{top} attended characters (`char`@position weight).",
            "",
            table,
            "",
        ]
    )
    (out_dir / "statistics.md").write_text(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder written by experiments/train.py or compare.py")
    parser.add_argument("--text", default=DEFAULT_TEXT, help=f"the input (default: {DEFAULT_TEXT!r})")
    parser.add_argument("--out", help="output folder (default: <run folder>/attention_maps)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--top", type=int, default=3, help="attended characters listed per head")
    args = parser.parse_args(argv)
    run_dir = pathlib.Path(args.run_dir)
    out_dir = pathlib.Path(args.out) if args.out else run_dir / "attention_maps"
    try:
        report = visualize(run_dir, args.text, out_dir, step=args.step, top=args.top)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
