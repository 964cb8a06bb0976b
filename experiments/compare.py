"""Train one model per attention variant listed under ``compare:`` and compare them.

    python experiments/compare.py configs/<file>.yaml [key.sub=value ...] [--out DIR]

Every variant sees the same task, data, model size, optimizer and seed. Writes, in
``<output_dir>/<name>`` (or ``--out``): one run folder per variant, ``results.md`` (final accuracy
and loss, steps/s, peak memory, parameters), ``learning_curves.png``, ``final_<metric>.png`` and
``time_per_step.png``; prints the table at the end. Re-running resumes unfinished runs.

Every entry is checked first (variant, model, label, and that an existing run folder can resume
with this config). An entry whose training diverges is reported (an ``error:`` line, a "diverged"
row in the table) and the others still train; the exit status is then 1 (2: a config error,
nothing trained).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
from typing import NamedTuple

import jax

from jattn.parallel.training import check_sequence_axis
from jattn.train import (
    ConfigError,
    ExperimentConfig,
    RunError,
    TrainingDiverged,
    TrainingInterrupted,
    build_task,
    load_config,
    train,
    with_attention,
)
from jattn.train.build import check_model
from jattn.train.loop import MetricsLog, RunResult, check_run_folder, format_number
from jattn.train.plots import plot_bars, plot_learning_curves
from jattn.train.schema import check_folder_name


class Diverged(NamedTuple):
    """An entry whose training diverged (``TrainingDiverged``), for the results table."""

    variant: str
    error: TrainingDiverged


def ms_per_step(result: RunResult) -> float | None:
    """Milliseconds per train step, or None when the run timed none (None or NaN steps/s)."""
    speed = result.steps_per_s
    return None if speed is None or not speed > 0 else 1000 / speed


def results_table(results: list[RunResult | Diverged], *, padded: bool) -> str:
    """Markdown table; ``padded`` adds whether each variant masks padding (padded batches only).

    A figure a run could not measure (speed with no timed step) reads "n/a"; a diverged entry's row
    says at which step it diverged.
    """
    header = (
        "| variant | eval accuracy | eval loss | train loss | steps/s | ms/step | peak memory (MiB) "
        "| params |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    lines = [header + (" padding masked |" if padded else ""), rule + (":---:|" if padded else "")]
    for r in results:
        if isinstance(r, Diverged):
            dashes = " - |" * (7 if padded else 6)
            lines.append(f"| {r.variant} | diverged at step {r.error.first_step} |{dashes}")
            continue
        memory = "n/a" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.1f}"
        row = (
            f"| {r.variant} | {r.final_eval['accuracy']:.4f} | {r.final_eval['loss']:.4f} | "
            f"{format_number(r.final_train.get('loss'), '.4f')} | {format_number(r.steps_per_s, '.2f')} | "
            f"{format_number(ms_per_step(r), '.1f')} | {memory} | {r.params:,} |"
        )
        lines.append(row + (f" {'yes' if r.masks_padding else 'no'} |" if padded else ""))
    return "\n".join(lines)


# What ``compare`` writes next to the entries' run folders, which an entry's label may not name.
RESULTS, LEARNING_CURVES, FINAL_ACCURACY, TIME_PER_STEP = (
    "results.md",
    "learning_curves.png",
    "final_accuracy.png",
    "time_per_step.png",
)


def check_entries(config: ExperimentConfig, out_dir: pathlib.Path | None = None) -> None:
    """Every ``compare`` entry's label, variant and model, and (with ``out_dir``) that its existing
    run folder can resume with this config, checked before anything is written or trained.

    Raises:
      ConfigError: naming the entry (``compare[2].variant``) and what is wrong with it.
    """
    if not config.compare:
        raise ConfigError("config key 'compare': list at least one attention entry to compare")
    for i, entry in enumerate(config.compare):
        key = f"compare[{i}].label" if entry.label is not None else f"compare[{i}].variant"
        try:
            check_folder_name(key, entry.display_name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    labels = [entry.display_name for entry in config.compare]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"config key 'compare': labels must be distinct, got {labels} (set 'label')")
    outputs = (RESULTS, LEARNING_CURVES, FINAL_ACCURACY, TIME_PER_STEP)
    for i, label in enumerate(labels):
        if label in outputs:
            raise ConfigError(
                f"config key 'compare[{i}].label': {label!r} is a file compare writes beside the run "
                f"folders ({', '.join(outputs)}); choose another label"
            )
    task = build_task(config)
    for i, entry in enumerate(config.compare):
        try:
            check_sequence_axis(config.parallel, entry.variant, entry.options, key=f"compare[{i}]")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check_model(with_attention(config, entry), task, attention_key=f"compare[{i}]")
        if out_dir is not None:
            try:
                check_run_folder(with_attention(config, entry), out_dir / entry.display_name, task)
            except ConfigError as err:
                raise ConfigError(f"compare[{i}] ({entry.display_name!r}): {err}") from None


def machine() -> str:
    device = jax.local_devices()[0]
    return (
        f"{jax.default_backend()} ({device.device_kind}, {jax.local_device_count()} device(s)), "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}"
    )


def compare(config: ExperimentConfig, out_dir: pathlib.Path, command: str) -> list[RunResult | Diverged]:
    """Train every entry (a diverged one is reported on stderr and the rest go on) and write the
    results; returns one ``RunResult`` or ``Diverged`` per entry."""
    out_dir = out_dir.expanduser()
    check_entries(config, out_dir)
    results: list[RunResult | Diverged] = []
    curves = {}
    for i, entry in enumerate(config.compare):
        run_config = with_attention(config, entry)
        run_dir = out_dir / entry.display_name
        print(f"== {entry.display_name}: {entry.variant} {entry.options}", flush=True)
        try:
            results.append(train(run_config, run_dir))
        except TrainingDiverged as err:
            print(f"error: compare[{i}] ({entry.display_name!r}): {err}", file=sys.stderr, flush=True)
            results.append(Diverged(entry.display_name, err))
        curves[entry.display_name] = MetricsLog.read(run_dir / "metrics.jsonl")
    finished = [r for r in results if isinstance(r, RunResult)]

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
        "other step ran."
        + (
            " A diverged entry stopped at the first step whose loss or gradient norm "
            "was not finite; its learning curve shows the steps before."
            if len(finished) < len(results)
            else ""
        ),
        "",
        table,
        "",
        f"![learning curves]({LEARNING_CURVES}) ![final accuracy]({FINAL_ACCURACY}) "
        f"![time per step]({TIME_PER_STEP})",
        "",
    ]
    (out_dir / RESULTS).write_text("\n".join(header))
    plot_learning_curves(curves, "accuracy", out_dir / LEARNING_CURVES)
    plot_bars(
        {r.variant: r.final_eval["accuracy"] for r in finished},
        "final eval accuracy",
        out_dir / FINAL_ACCURACY,
    )
    plot_bars({r.variant: ms_per_step(r) for r in finished}, "ms per train step", out_dir / TIME_PER_STEP)
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
        results = compare(
            config, pathlib.Path(args.out or pathlib.Path(config.output_dir) / config.name), command
        )
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunError as err:  # a checkpoint or metrics file that cannot be read
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:  # the entries not finished resume when the command runs again
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_status
    return 1 if any(isinstance(r, Diverged) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
