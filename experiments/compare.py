"""Train one model per attention variant listed under ``compare:`` and compare them.

    python experiments/compare.py configs/<file>.yaml [key.sub=value ...] [--out DIR]

Every variant sees the same task, data, model size, optimizer and seed. Writes, in
``<output_dir>/<name>`` (or ``--out``): one run folder per variant, ``results.md`` (final accuracy
and loss, steps/s, peak memory, parameters), ``learning_curves.png``, ``final_<metric>.png`` and
``time_per_step.png``; prints the table at the end. Re-running resumes unfinished runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys

import jax

from jattn.parallel.training import check_sequence_axis
from jattn.train import ConfigError, ExperimentConfig, build_task, load_config, train, with_attention
from jattn.train.build import check_model
from jattn.train.loop import MetricsLog, RunResult, format_number
from jattn.train.plots import plot_bars, plot_learning_curves


def ms_per_step(result: RunResult) -> float | None:
    """Milliseconds per train step, or None when the run timed none (None or NaN steps/s)."""
    speed = result.steps_per_s
    return None if speed is None or not speed > 0 else 1000 / speed


def results_table(results: list[RunResult], *, padded: bool) -> str:
    """Markdown table; ``padded`` adds whether each variant masks padding (padded batches only).

    A figure a run could not measure (speed with no timed step) reads "n/a".
    """
    header = (
        "| variant | eval accuracy | eval loss | train loss | steps/s | ms/step | peak memory (MiB) "
        "| params |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    lines = [header + (" padding masked |" if padded else ""), rule + (":---:|" if padded else "")]
    for r in results:
        memory = "n/a" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.1f}"
        row = (
            f"| {r.variant} | {r.final_eval['accuracy']:.4f} | {r.final_eval['loss']:.4f} | "
            f"{format_number(r.final_train.get('loss'), '.4f')} | {format_number(r.steps_per_s, '.2f')} | "
            f"{format_number(ms_per_step(r), '.1f')} | {memory} | {r.params:,} |"
        )
        lines.append(row + (f" {'yes' if r.masks_padding else 'no'} |" if padded else ""))
    return "\n".join(lines)


def check_entries(config: ExperimentConfig) -> None:
    """Every ``compare`` entry's variant and model, checked before anything is trained.

    Raises:
      ConfigError: naming the entry (``compare[2].variant``) and what is wrong with it.
    """
    if not config.compare:
        raise ConfigError("config key 'compare': list at least one attention entry to compare")
    labels = [entry.display_name for entry in config.compare]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"config key 'compare': labels must be distinct, got {labels} (set 'label')")
    task = build_task(config)
    for i, entry in enumerate(config.compare):
        try:
            check_sequence_axis(config.parallel, entry.variant, entry.options, key=f"compare[{i}]")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check_model(with_attention(config, entry), task, attention_key=f"compare[{i}]")


def machine() -> str:
    device = jax.local_devices()[0]
    return (
        f"{jax.default_backend()} ({device.device_kind}, {jax.local_device_count()} device(s)), "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}"
    )


def compare(config: ExperimentConfig, out_dir: pathlib.Path, command: str) -> list[RunResult]:
    check_entries(config)
    results, curves = [], {}
    for entry in config.compare:
        run_config = with_attention(config, entry)
        run_dir = out_dir / entry.display_name
        print(f"== {entry.display_name}: {entry.variant} {entry.options}", flush=True)
        results.append(train(run_config, run_dir))
        curves[entry.display_name] = MetricsLog.read(run_dir / "metrics.jsonl")

    table = results_table(results, padded=config.task.name == "listops")
    t = config.train
    header = [
        f"# {config.name}: attention variants compared",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Task `{config.task.name}` {config.task.options}; model {json.dumps(config.model.__dict__)}; "
        f"{t.steps} steps of batch {t.batch_size}, seed {t.seed}; evaluation on {t.eval_batches} "
        "validation batches.",
        "",
        "Peak memory is the device's peak where it reports one, else XLA's compiled estimate for one "
        "train step. Steps/s leaves out the first step after each start or resume (start-up); n/a: no "
        "other step ran.",
        "",
        table,
        "",
        "![learning curves](learning_curves.png) ![final accuracy](final_accuracy.png) "
        "![time per step](time_per_step.png)",
        "",
    ]
    (out_dir / "results.md").write_text("\n".join(header))
    plot_learning_curves(curves, "accuracy", out_dir / "learning_curves.png")
    plot_bars(
        {r.variant: r.final_eval["accuracy"] for r in results},
        "final eval accuracy",
        out_dir / "final_accuracy.png",
    )
    plot_bars(
        {r.variant: ms_per_step(r) for r in results}, "ms per train step", out_dir / "time_per_step.png"
    )
    print(table)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--out", help="output folder (default: <output_dir>/<name>)")
    args = parser.parse_intermixed_args(argv)
    command = " ".join(["python experiments/compare.py", args.config, *args.overrides])
    try:
        config = load_config(ExperimentConfig, args.config, args.overrides)
        compare(config, pathlib.Path(args.out or pathlib.Path(config.output_dir) / config.name), command)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
