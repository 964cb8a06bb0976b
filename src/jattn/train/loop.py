"""The training loop: jitted pure steps, evaluation, metrics, checkpoints with exact resume.

``train(config, run_dir)`` runs (or resumes) one experiment in ``run_dir``:

    run_dir/config.yaml        the fully resolved config
    run_dir/metrics.jsonl      one JSON object per line: {"step", "split", "loss", "accuracy", ...}
                               (strict JSON: a value that is not finite is written as null)
    run_dir/checkpoints/<step> Orbax checkpoints of {"step", "params", "opt_state"}
    run_dir/result.json        final metrics, speed, memory, parameter count
    run_dir/summary.md         the same as a table
    run_dir/data.json          for a task read from a file (text): the hash a resume checks

``train_step(state, batch) -> (state, metrics)`` is a pure function of its arguments (the PRNG key
for dropout is ``fold_in(seed, step)``) and every batch is a pure function of (data seed, step),
so a run restarted from its last checkpoint continues exactly as if it had never stopped.

A run whose training loss or gradient norm stops being finite raises ``TrainingDiverged`` at the
next log or evaluation (no host sync per step); nothing computed from those steps is saved.

Ctrl-C or SIGTERM (a cluster's preemption) during training checkpoints the steps finished and
raises ``TrainingInterrupted``: running the same command again resumes exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from jattn.data import Task, TaskSpec
from jattn.data.base import data_fingerprint
from jattn.nn import param_count
from jattn.parallel import training as parallel
from jattn.train.build import (
    apply_model,
    build_model,
    build_optimizer,
    build_task,
    check_model,
    learning_rate_schedule,
)
from jattn.train.config import ConfigError, load_config, save_config, to_dict
from jattn.train.schema import RESUMABLE_CHANGES, ExperimentConfig

State = dict[str, Any]
"""``{"step": int32 [], "params": pure dict of arrays, "opt_state": optax state}``."""

_clock = time.perf_counter  # the speed measurements' clock (tests replace it)


class RunError(RuntimeError):
    """A run that cannot go on (diverged, unreadable checkpoint or metrics); the message says why
    and what to do."""


class TrainingDiverged(RunError):
    """The loss or gradient norm stopped being finite.

    Attributes:
      steps: the steps (counting from 1, as in ``metrics.jsonl``) found not finite, in order.
      checkpoint: the step of the run folder's last checkpoint, kept as it was (None: none).

    ``what`` names the value found not finite; ``after`` says it was measured after ``steps`` (a
    validation loss) rather than at them (the steps' own loss or gradient norm).
    """

    def __init__(
        self,
        run_dir: pathlib.Path,
        steps: list[int],
        checkpoint: int | None,
        what: str,
        *,
        after: bool = False,
    ):
        self.steps = steps
        self.checkpoint = checkpoint
        listed = ", ".join(str(s) for s in steps[:5])
        listed += f" and {len(steps) - 5} more" if len(steps) > 5 else ""
        kept = (
            f"its last checkpoint (step {checkpoint}) is kept"
            if checkpoint is not None
            else "it has no checkpoint"
        )
        where = f"after step {listed}" if after else f"at step{'s' * (len(steps) > 1)} {listed}"
        super().__init__(
            f"training diverged in run folder {str(run_dir)!r}: {what} is not finite {where}; nothing "
            f"from step {steps[0]} on was saved and {kept}. "
            "Lower optimizer.learning_rate or set optimizer.clip_norm, in a new run folder (resuming "
            "this one repeats the same steps)."
        )

    @property
    def first_step(self) -> int:
        return self.steps[0]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; the steps it finished are checkpointed, so running the same
    command again resumes it exactly. A ``KeyboardInterrupt``, not a ``RunError``, so that it stops
    ``compare.py`` too rather than moving on to the next entry.

    Attributes:
      step: the steps finished.
      checkpoint: the step the run folder resumes from (None: none, it starts over).
      exit_status: what a shell reports for the signal: 130 (SIGINT, Ctrl-C) or 143 (SIGTERM).
    """

    def __init__(self, run_dir: str | pathlib.Path, step: int, checkpoint: int | None, *, terminated: bool):
        self.step = step
        self.checkpoint = checkpoint
        self.exit_status = 128 + int(signal.SIGTERM if terminated else signal.SIGINT)
        how = "stopped by SIGTERM" if terminated else "interrupted"
        resume = (
            f"it resumes from its checkpoint of step {checkpoint} when the same command runs again"
            if checkpoint is not None
            else "it has no checkpoint, so the same command starts it over"
        )
        super().__init__(f"run folder {str(run_dir)!r} {how} after step {step}; {resume}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the training loop as Ctrl-C raises ``KeyboardInterrupt``."""


@contextlib.contextmanager
def _sigterm_raises():
    """While training, SIGTERM raises ``_Terminated`` (Python's default would end the process at
    once, losing the steps since the last checkpoint). Only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _checkpoint_on_stop(manager: ocp.CheckpointManager, state: State, last_saved: int | None) -> int | None:
    """The step a stopped run resumes from: ``state`` saved, unless it is saved already or its
    parameters are not finite (then the last checkpoint stays)."""
    step = int(state["step"])  # the state's own count: a stop can fall between a step and its bookkeeping
    if step == (0 if last_saved is None else last_saved):
        return last_saved  # nothing new since the last checkpoint (or the start)
    manager.reload()  # a stop during a save may have left this step on disk
    if step in manager.all_steps():
        _drop_old_checkpoints(manager)  # stopped after it was written, before the old ones were deleted
        return step
    if not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(state["params"])):
        return last_saved
    manager.save(step, args=ocp.args.StandardSave(state))
    return step


def _drop_old_checkpoints(manager: ocp.CheckpointManager) -> None:
    """Delete the step folders older than the newest ``KEPT_CHECKPOINTS``. Orbax deletes them after it
    has written the new checkpoint, so a stop in between leaves them on disk (one stopped in the middle
    of its deletion still lists as a step, and cannot be read), and only a later save would delete them.
    ``manager`` must list what is on disk: new, or just reloaded."""
    for old in sorted(manager.all_steps())[:-KEPT_CHECKPOINTS]:
        manager.delete(old)


def _json_safe(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """Strict JSON: a float that is not finite becomes null."""
    return json.dumps(_json_safe(value), allow_nan=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Pure functions: forward, loss, steps
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
    """A model split into its static graph and its parameters, applied as a pure function."""

    graphdef: Any
    param_template: Any
    rest: Any
    format: str

    @classmethod
    def from_model(cls, model: nnx.Module, spec: TaskSpec) -> ModelFunctions:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
        return cls(graphdef, params, rest, spec.format)

    def initial_params(self) -> dict:
        return nnx.to_pure_dict(self.param_template)

    def merge(self, params: dict) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self.param_template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.rest)

    def logits(self, params: dict, batch: dict, key: jax.Array | None):
        """``[B, C]`` (classification) or ``[B, T, V]`` float32 logits."""
        return apply_model(self.merge(params), batch, self.format, key)


def loss_sums(logits, batch: dict, fmt: str) -> dict[str, jax.Array]:
    """Summed cross-entropy, correct predictions and the number of scored predictions."""
    if fmt == "classification":
        labels = batch["labels"]  # [B]
        weights = jnp.ones(labels.shape, jnp.float32)
    else:
        labels, weights = batch["targets"], batch["weights"]  # [B, T]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(losses * weights),
        "correct": jnp.sum(correct * weights),
        "count": jnp.sum(weights),
    }


def make_train_step(fns: ModelFunctions, tx: optax.GradientTransformation, seed: int) -> Callable:
    """``train_step(state, batch) -> (state, sums)``, jitted; pure in (state, batch)."""
    base_key = jax.random.key(seed)

    def loss_fn(params, batch, key):
        sums = loss_sums(fns.logits(params, batch, key), batch, fns.format)
        return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

    @jax.jit
    def train_step(state: State, batch: dict):
        key = jax.random.fold_in(base_key, state["step"])
        grads, sums = jax.grad(loss_fn, has_aux=True)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        sums["grad_norm"] = optax.tree.norm(grads)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, sums

    return train_step


def make_eval_step(fns: ModelFunctions) -> Callable:
    """``eval_step(params, batch) -> sums``, jitted, deterministic (no dropout)."""

    @jax.jit
    def eval_step(params, batch):
        return loss_sums(fns.logits(params, batch, None), batch, fns.format)

    return eval_step


def init_state(fns: ModelFunctions, tx: optax.GradientTransformation) -> State:
    params = fns.initial_params()
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


# ---------------------------------------------------------------------------------------------
# Run folder: config, metrics, checkpoints
# ---------------------------------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: tree}


def _unresumable_changes(saved: ExperimentConfig, config: ExperimentConfig) -> str:
    """The keys outside ``RESUMABLE_CHANGES`` that differ, as ``"key: old -> new; ..."`` ("" if none)."""
    old, new = _flatten(to_dict(saved)), _flatten(to_dict(config))
    changed = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
    )
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)


def check_resumable(saved: ExperimentConfig, config: ExperimentConfig, step: int) -> None:
    """Raise ``ConfigError`` unless ``config`` continues the run ``saved`` started, from its
    checkpoint at ``step``, exactly as an uninterrupted run of ``config`` would.

    Only the keys in ``RESUMABLE_CHANGES`` may differ (every other one is named), ``train.steps``
    may not drop below ``step``, and a new ``train.steps`` must leave the learning rates of the
    ``step`` steps already taken as they were: cosine and linear decays are spread over
    ``train.steps`` (so only their warm-up can be extended), constant and rsqrt are not.
    """
    changed = _unresumable_changes(saved, config)
    if changed:
        raise ConfigError(
            f"cannot resume: the run folder was started with another config ({changed}). Only "
            f"{list(RESUMABLE_CHANGES)} may change; use a new run folder for the rest."
        )
    steps = config.train.steps
    if steps < step:
        raise ConfigError(
            f"config key 'train.steps': the run folder has a checkpoint at step {step}, past "
            f"train.steps={steps}; ask for at least {step} steps or use a new run folder"
        )
    trained = jnp.arange(step)
    before = np.asarray(learning_rate_schedule(saved.optimizer, saved.train.steps)(trained))
    after = np.asarray(learning_rate_schedule(config.optimizer, steps)(trained))
    differ = np.flatnonzero(before != after)
    if differ.size:
        s = int(differ[0])
        raise ConfigError(
            f"config key 'train.steps': {saved.train.steps} -> {steps} would change the learning rate "
            f"of steps already trained (optimizer.schedule {config.optimizer.schedule!r} spreads its "
            f"decay over train.steps; step {s} took {before[s]:.9g}, it would take {after[s]:.9g}), so "
            f"the run would match no uninterrupted one. Keep train.steps={saved.train.steps} or use a "
            "new run folder; a 'constant' or 'rsqrt' schedule can be extended."
        )


KEPT_CHECKPOINTS = 2  # the newest checkpoints a run folder keeps


def _checkpoint_manager(run_dir: pathlib.Path, *, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEPT_CHECKPOINTS,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(), options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def latest_checkpoint(run_dir: str | pathlib.Path) -> int | None:
    """The step of the run folder's latest checkpoint, or None; creates nothing."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        return None
    with _checkpoint_manager(run_dir, read_only=True) as manager:
        return manager.latest_step()


def _check_creatable(run_dir: pathlib.Path) -> None:
    """Raise ``ConfigError`` unless ``run_dir`` is, or can be made, a folder this process writes to."""
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    what = f"run folder {str(run_dir)!r} (output_dir/name, or --run-dir / --out)"
    if not existing.is_dir():
        raise ConfigError(f"{what} cannot be made: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} cannot be written: {str(existing)!r} is not writable")


def check_run_folder(config: ExperimentConfig, run_dir: str | pathlib.Path, task: Task) -> int | None:
    """Raise ``ConfigError`` unless ``config`` (with ``task``, built from it) may run in ``run_dir``;
    return the step of its latest checkpoint (None: none). Writes nothing (``experiments/compare.py``
    checks every entry first).

    A run folder with a checkpoint resumes only as ``check_resumable`` allows against its
    ``config.yaml`` (so checkpoints without one are refused: nothing says what they belong to), and
    only on the data it started with (``data.json``: a text file edited since, or Python's
    ``pydoc_data`` of another release, would train the remaining steps on other text).
    One without a checkpoint has trained nothing to keep (the run failed or was stopped before its
    first checkpoint), so a new config replaces the old one, unless the run finished
    (``result.json``) and its checkpoints were deleted since: its results are kept from another
    config's.
    """
    run_dir = pathlib.Path(run_dir)
    _check_creatable(run_dir)
    step = latest_checkpoint(run_dir)
    saved_path = run_dir / "config.yaml"
    if step is None:
        if (run_dir / "result.json").is_file() and saved_path.is_file():
            changed = _unresumable_changes(_saved_config(saved_path), config)
            if changed:
                raise ConfigError(
                    f"run folder {str(run_dir)!r} holds the results of a finished run (result.json) of "
                    f"another config ({changed}); use a new run folder, or delete this one to replace it"
                )
        return None
    if not saved_path.is_file():
        raise ConfigError(
            f"run folder {str(run_dir)!r} has checkpoints (the latest of step {step}) but no config.yaml, "
            "so nothing says which config they belong to; put its config.yaml back or use a new run folder"
        )
    check_resumable(_saved_config(saved_path), config, step)
    _check_same_data(run_dir, task)
    return step


DATA_FILE = "data.json"


def _check_same_data(run_dir: pathlib.Path, task: Task) -> None:
    path = run_dir / DATA_FILE
    if not path.is_file():  # a task generated from its seed, or a folder begun before data.json
        return
    started_on = json.loads(path.read_text()).get("fingerprint")
    now = data_fingerprint(task)
    if started_on != now:
        raise ConfigError(
            f"run folder {str(run_dir)!r} started on other data than task.options give now ({started_on} "
            f"then, {now} now): a resume would train its remaining steps on other data. Restore the data "
            "(a text file edited since, or another Python's pydoc_data) or use a new run folder"
        )


def _save_data_fingerprint(run_dir: pathlib.Path, task: Task) -> None:
    fingerprint = data_fingerprint(task)
    if fingerprint is not None:
        (run_dir / DATA_FILE).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")


def _saved_config(path: pathlib.Path) -> ExperimentConfig:
    """A run folder's ``config.yaml``, its errors naming the file."""
    try:
        return load_config(ExperimentConfig, path)
    except ConfigError as err:
        raise ConfigError(f"the run folder's saved config {str(path)!r}: {err}") from None


def _path_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def _layouts(tree: Any) -> dict[str, tuple]:
    """``{"params.embed.kernel": (shape, dtype name)}`` of a state or of checkpoint metadata."""
    return {
        ".".join(_path_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _layout_mismatch(manager: ocp.CheckpointManager, abstract: State, step: int) -> str | None:
    """How the checkpoint's arrays differ from ``abstract``'s, or None (also when unreadable)."""
    try:
        stored = _layouts(manager.item_metadata(step).tree)
    except Exception:  # noqa: BLE001 - no readable metadata: the checkpoint is damaged, not another layout
        return None
    wanted = _layouts(abstract)
    differ = [
        f"{k}: stored {stored.get(k, 'nothing')}, this config {wanted.get(k, 'nothing')}"
        for k in sorted(stored.keys() | wanted.keys())
        if stored.get(k) != wanted.get(k)
    ]
    if not differ:
        return None
    return "; ".join(differ[:3]) + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")


def _restore(manager: ocp.CheckpointManager, state: State, step: int, run_dir: pathlib.Path) -> State:
    """The checkpoint of ``step``, laid out like ``state``.

    Raises:
      ConfigError: the checkpoint holds other arrays than ``state`` (another model or optimizer).
      RunError: the checkpoint cannot be read (damaged); says which folder to delete to resume
        from the one before.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # noqa: BLE001 - Orbax and TensorStore raise plain Exceptions too
        folder = str(run_dir / "checkpoints" / str(step))
        mismatch = _layout_mismatch(manager, abstract, step)
        if mismatch is not None:
            raise ConfigError(
                f"the checkpoint {folder!r} does not fit this config's model and optimizer ({mismatch}); "
                "was its config.yaml edited? Use a new run folder."
            ) from None
        earlier = [s for s in manager.all_steps() if s < step]
        what_next = (
            f"delete that folder to resume from the checkpoint of step {max(earlier)}"
            if earlier
            else "delete the run folder's checkpoints folder to train from the start, or use a new run folder"
        )
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise RunError(
            f"cannot read the checkpoint {folder!r} ({type(err).__name__}: {reason}); it may be damaged "
            f"(a save or copy that did not finish, a full disk): {what_next}"
        ) from err


class MetricsLog:
    """``metrics.jsonl``: appends lines; on resume, drops lines past the restored step."""

    def __init__(self, path: pathlib.Path, resume_step: int):
        self.path = path
        self.kept = [line for line in self.read(path) if line["step"] <= resume_step]
        path.write_text("".join(dumps(line) + "\n" for line in self.kept))

    @staticmethod
    def read(path: pathlib.Path) -> list[dict]:
        """The records of ``path``; a last line cut short (a run killed while writing it, so past
        its last checkpoint) is skipped, any other line that is not JSON raises ``RunError``."""
        if not path.exists():
            return []
        text = path.read_text().splitlines()
        lines = [(number, line) for number, line in enumerate(text, 1) if line.strip()]
        records = []
        for i, (number, line) in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if i == len(lines) - 1:
                    break
                raise RunError(
                    f"{str(path)!r} line {number} is not valid JSON ({err}); only a cut-off last line is "
                    "skipped. Fix or delete that line."
                ) from None
        return records

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(dumps(record) + "\n")


def _summarize(sums: list[dict]) -> dict[str, float]:
    total = {k: float(sum(np.asarray(s[k]) for s in sums)) for k in ("loss_sum", "correct", "count")}
    count = max(total["count"], 1.0)
    return {"loss": total["loss_sum"] / count, "accuracy": total["correct"] / count}


def evaluate(eval_step: Callable, params, task, batch_size: int, num_batches: int, split: str = "val"):
    """Mean loss and accuracy over the first ``num_batches`` batches of ``split``."""
    return _summarize([eval_step(params, task.batch(split, i, batch_size)) for i in range(num_batches)])


def _memory_bytes(compiled) -> int | None:
    """Peak bytes of one train step: XLA's compiled estimate, or the device's own peak if it has one."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.temp_size_in_bytes
        + analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a finished run reports (also in ``result.json``).

    ``steps_per_s`` and ``tokens_per_s`` time the training steps: they leave out the first step
    after a (re)start (start-up), and evaluating, logging and saving checkpoints; they are None
    when no other step ran (older runs wrote NaN: ``from_json`` reads it as None).
    """

    name: str
    variant: str
    steps: int
    params: int
    final_eval: dict
    final_train: dict
    steps_per_s: float | None
    tokens_per_s: float | None
    peak_memory_bytes: int | None
    masks_padding: bool

    @classmethod
    def from_json(cls, text: str) -> RunResult:
        """A ``result.json``; a speed that is not a number (older runs wrote NaN) reads as None."""
        fields = json.loads(text)
        for key in ("steps_per_s", "tokens_per_s"):
            if fields.get(key) is not None and not np.isfinite(fields[key]):
                fields[key] = None
        return cls(**fields)


def format_number(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or "n/a" when it is missing (None); a NaN shows as "nan"."""
    return "n/a" if value is None else format(value, spec)


def write_summary(result: RunResult, config: ExperimentConfig, path: pathlib.Path) -> None:
    memory = "n/a" if result.peak_memory_bytes is None else f"{result.peak_memory_bytes / 2**20:.1f} MiB"
    train_loss = result.final_train.get("loss")
    lines = [
        f"# {result.name}",
        "",
        f"Task `{config.task.name}` {config.task.options}; attention `{result.variant}` "
        f"{config.attention.options}; backend {jax.default_backend()}, jax {jax.__version__}.",
        "",
        "| steps | params | eval loss | eval accuracy | train loss | steps/s | tokens/s | peak memory |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result.steps} | {result.params:,} | {result.final_eval['loss']:.4f} | "
        f"{result.final_eval['accuracy']:.4f} | {format_number(train_loss, '.4f')} | "
        f"{format_number(result.steps_per_s, '.2f')} | {format_number(result.tokens_per_s, ',.0f')} | "
        f"{memory} |",
        "",
    ]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _finished_result(run_dir: pathlib.Path, step: int) -> RunResult | None:
    """The stored result of the run folder's run if it finished at ``step``, else None."""
    path = run_dir / "result.json"
    if not path.exists():
        return None
    result = RunResult.from_json(path.read_text())
    return result if result.steps == step else None


def _logged_train_metrics(records: list[dict], step: int) -> dict:
    """Loss and accuracy of the training metrics logged at ``step``, or {} if none were."""
    logged = [r for r in records if r["split"] == "train" and r["step"] == step]
    return {k: logged[-1][k] for k in ("loss", "accuracy")} if logged else {}


def _nonfinite_steps(window: list[dict], first_step: int) -> list[int]:
    """The steps of ``window`` (the first one is ``first_step``) whose loss or gradient norm is not
    finite; reads the window's sums on the host (only where the loop logs or evaluates)."""
    return [
        first_step + i
        for i, sums in enumerate(window)
        if not (np.isfinite(np.asarray(sums["loss_sum"])) and np.isfinite(np.asarray(sums["grad_norm"])))
    ]


def _tokens_per_batch(batch: dict) -> int:
    return int(batch["inputs"].size + (batch["sources"].size if "sources" in batch else 0))


def train(
    config: ExperimentConfig,
    run_dir: str | pathlib.Path,
    *,
    on_step: Sequence[Callable[[int, State, dict], None]] = (),
) -> RunResult:
    """Train (or resume) ``config`` in ``run_dir``; see the module docstring for what it writes.

    With ``parallel.mesh``, the state and batches live on that mesh (``jattn.parallel.training``)
    and the run executes under ``jax.set_mesh``; metrics and checkpoints are those of one device.

    Args:
      on_step: callbacks ``fn(step, state, sums)`` after each step (``step`` counts finished steps).
    """
    run_dir = pathlib.Path(run_dir).expanduser()
    try:
        placement = parallel.setup(
            config.parallel,
            batch_size=config.train.batch_size,
            variant=config.attention.variant,
            options=config.attention.options,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    with placement.activate(), _sigterm_raises():
        try:
            return _train(config, run_dir, placement, on_step)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt as stop:  # while building, restoring or compiling: no step ran
            checkpoint = latest_checkpoint(run_dir)
            terminated = isinstance(stop, _Terminated)
            raise TrainingInterrupted(run_dir, checkpoint or 0, checkpoint, terminated=terminated) from None


def _train(
    config: ExperimentConfig,
    run_dir: pathlib.Path,
    placement: parallel.Placement,
    on_step: Sequence[Callable[[int, State, dict], None]],
) -> RunResult:
    task = build_task(config)
    check_model(config, task)
    model = build_model(config, task.spec)
    tc = config.train
    fns = ModelFunctions.from_model(model, task.spec)
    tx = build_optimizer(config.optimizer, tc.steps)
    state = placement.place_state(init_state(fns, tx))
    latest = check_run_folder(config, run_dir, task)
    with _checkpoint_manager(run_dir) as manager:
        _drop_old_checkpoints(manager)  # ones an earlier process was stopped before deleting
        if latest is not None:
            state = _restore(manager, state, latest, run_dir)
        save_config(config, run_dir / "config.yaml")  # after the restore: a refused one keeps the old
        _save_data_fingerprint(run_dir, task)
        last_saved = latest
        start = int(state["step"])
        finished = _finished_result(run_dir, start) if start == tc.steps else None
        if finished is not None:  # nothing left to train: report the finished run
            return finished
        log = MetricsLog(run_dir / "metrics.jsonl", start)
        eval_on_mesh = make_eval_step(fns)
        eval_step = lambda params, batch: eval_on_mesh(params, placement.shard(batch))  # noqa: E731
        first_batch = placement.shard(task.batch("train", start, tc.batch_size))
        compiled = make_train_step(fns, tx, tc.seed).lower(state, first_batch).compile()  # type: ignore[attr-defined]
        memory = _memory_bytes(compiled)
        tokens_per_batch = _tokens_per_batch(first_batch)

        schedule = jax.jit(learning_rate_schedule(config.optimizer, tc.steps))  # compiled once, not per op
        window: list[dict] = []
        untimed = 1  # the first step after a (re)start includes start-up: it stays out of the speeds
        train_time, timed_steps = 0.0, 0
        final_train: dict = {}
        final_eval: dict = {}
        if start == tc.steps:  # finished, but stopped before its result was written: report it
            final_train = _logged_train_metrics(log.kept, start)
            final_eval = evaluate(eval_step, state["params"], task, tc.batch_size, tc.eval_batches)
        bar = tqdm(
            total=tc.steps, initial=start, disable=not tc.progress, desc=config.name, dynamic_ncols=True
        )
        window_start = 0.0  # set once the first step has run

        def check_finite(done: int) -> None:
            """Raise ``TrainingDiverged`` if a step of the window (it ends at ``done``) diverged."""
            bad = _nonfinite_steps(window, done - len(window) + 1)
            if bad:
                bar.close()
                raise TrainingDiverged(run_dir, bad, last_saved, "the training loss or gradient norm")

        try:
            for step in range(start, tc.steps):
                batch = (
                    first_batch
                    if step == start
                    else placement.shard(task.batch("train", step, tc.batch_size))
                )
                state, sums = compiled(state, batch)
                if step == start:
                    jax.block_until_ready(sums)
                    window_start = _clock()
                window.append(sums)
                done = step + 1
                for callback in on_step:
                    callback(done, state, sums)
                if done % tc.log_every == 0 or done == tc.steps:
                    check_finite(done)  # before anything of these steps is written or saved
                    final_train = _summarize(window)
                    elapsed = _clock() - window_start
                    timed = len(window) - untimed
                    untimed = 0
                    train_time += elapsed
                    timed_steps += timed
                    rate = tokens_per_batch * timed / max(elapsed, 1e-9) if timed else None
                    # The update of step ``done`` (counting from 1) used the rate at count ``done - 1``.
                    lr = float(schedule(done - 1))
                    record = {"step": done, "split": "train", **final_train, "window": len(window)}
                    log.write({**record, "tokens_per_s": rate, "lr": lr})
                    bar.set_postfix(
                        loss=f"{final_train['loss']:.3f}",
                        acc=f"{final_train['accuracy']:.3f}",
                        tok_s=format_number(rate, ",.0f"),
                    )
                    window = []
                if done % tc.eval_every == 0 or done == tc.steps:
                    check_finite(done)  # waits for the window's steps, so they stay in its time
                    paused = _clock()
                    final_eval = evaluate(eval_step, state["params"], task, tc.batch_size, tc.eval_batches)
                    if not np.isfinite(final_eval["loss"]):
                        bar.close()
                        raise TrainingDiverged(run_dir, [done], last_saved, "the validation loss", after=True)
                    log.write({"step": done, "split": "val", **final_eval})
                    window_start += _clock() - paused  # evaluation is not training time
                if done % tc.checkpoint_every == 0 or done == tc.steps:
                    manager.save(done, args=ocp.args.StandardSave(state))
                    last_saved = done
                bar.update(1)
                if not window:
                    window_start = _clock()
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM through _sigterm_raises
            bar.close()
            checkpoint = _checkpoint_on_stop(manager, state, last_saved)
            terminated = isinstance(stop, _Terminated)
            raise TrainingInterrupted(
                run_dir, int(state["step"]), checkpoint, terminated=terminated
            ) from None
        bar.close()

    result = RunResult(
        name=config.name,
        variant=config.attention.display_name,
        steps=tc.steps,
        params=param_count(model),
        final_eval=final_eval,
        final_train=final_train,
        steps_per_s=timed_steps / train_time if timed_steps else None,
        tokens_per_s=tokens_per_batch * timed_steps / train_time if timed_steps else None,
        peak_memory_bytes=memory,
        masks_padding=bool(getattr(model, "masks_padding", True)),
    )
    (run_dir / "result.json").write_text(dumps(dataclasses.asdict(result), indent=2))
    write_summary(result, config, run_dir / "summary.md")
    return result


def load_run(
    run_dir: str | pathlib.Path, step: int | None = None
) -> tuple[ExperimentConfig, nnx.Module, int]:
    """A run folder's config and model with the parameters of checkpoint ``step`` (None: latest).

    Returns ``(config, model, step)``; the model is ready for ``model(tokens)``.
    """
    run_dir = pathlib.Path(run_dir)
    config = load_config(ExperimentConfig, run_dir / "config.yaml")
    task = build_task(config)
    model = build_model(config, task.spec)
    fns = ModelFunctions.from_model(model, task.spec)
    tx = build_optimizer(config.optimizer, config.train.steps)
    with _checkpoint_manager(run_dir) as manager:
        available = sorted(manager.all_steps())
        if not available:
            raise FileNotFoundError(f"run folder {str(run_dir)!r} has no checkpoint yet")
        step = available[-1] if step is None else step
        if step not in available:
            raise FileNotFoundError(
                f"run folder {str(run_dir)!r} has no checkpoint at step {step}; it has checkpoints at "
                f"steps {available}"
            )
        state = _restore(manager, init_state(fns, tx), step, run_dir)
    return config, fns.merge(state["params"]), step
