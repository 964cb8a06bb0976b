"""The training loop: jitted pure steps, evaluation, metrics, checkpoints with exact resume.

``train(config, run_dir)`` runs (or resumes) one experiment in ``run_dir``:

    run_dir/config.yaml        the fully resolved config
    run_dir/metrics.jsonl      one JSON object per line: {"step", "split", "loss", "accuracy", ...}
    run_dir/checkpoints/<step> Orbax checkpoints of {"step", "params", "opt_state"}
    run_dir/result.json        final metrics, speed, memory, parameter count
    run_dir/summary.md         the same as a table

``train_step(state, batch) -> (state, metrics)`` is a pure function of its arguments (the PRNG key
for dropout is ``fold_in(seed, step)``) and every batch is a pure function of (data seed, step),
so a run restarted from its last checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
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

from jattn.data import TaskSpec
from jattn.nn import param_count
from jattn.parallel import training as parallel
from jattn.train.build import build_model, build_optimizer, build_task, learning_rate_schedule
from jattn.train.config import ConfigError, load_config, save_config, to_dict
from jattn.train.schema import RESUMABLE_CHANGES, ExperimentConfig

State = dict[str, Any]
"""``{"step": int32 [], "params": pure dict of arrays, "opt_state": optax state}``."""


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
        model = self.merge(params)
        if self.format == "classification":
            return model(batch["inputs"], lengths=batch["lengths"], key=key)
        if self.format == "sequence":
            return model(batch["inputs"], key=key)
        return model(batch["sources"], batch["inputs"], source_lengths=batch["source_lengths"], key=key)


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


def check_resumable(saved: ExperimentConfig, config: ExperimentConfig) -> None:
    """Raise ``ConfigError`` naming every key whose change would make a resume inexact."""
    old, new = _flatten(to_dict(saved)), _flatten(to_dict(config))
    changed = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
    )
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(
            f"cannot resume: the run folder was started with another config ({details}). Only "
            f"{list(RESUMABLE_CHANGES)} may change; use a new run folder for the rest."
        )


def _checkpoint_manager(run_dir: pathlib.Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)


def _restore(manager: ocp.CheckpointManager, state: State, step: int) -> State:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


class MetricsLog:
    """``metrics.jsonl``: appends lines; on resume, drops lines past the restored step."""

    def __init__(self, path: pathlib.Path, resume_step: int):
        self.path = path
        kept = [line for line in self.read(path) if line["step"] <= resume_step]
        path.write_text("".join(json.dumps(line) + "\n" for line in kept))

    @staticmethod
    def read(path: pathlib.Path) -> list[dict]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


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
    """What a finished run reports (also in ``result.json``)."""

    name: str
    variant: str
    steps: int
    params: int
    final_eval: dict
    final_train: dict
    steps_per_s: float
    tokens_per_s: float
    peak_memory_bytes: int | None
    masks_padding: bool


def write_summary(result: RunResult, config: ExperimentConfig, path: pathlib.Path) -> None:
    memory = "n/a" if result.peak_memory_bytes is None else f"{result.peak_memory_bytes / 2**20:.1f} MiB"
    lines = [
        f"# {result.name}",
        "",
        f"Task `{config.task.name}` {config.task.options}; attention `{result.variant}` "
        f"{config.attention.options}; backend {jax.default_backend()}, jax {jax.__version__}.",
        "",
        "| steps | params | eval loss | eval accuracy | train loss | steps/s | tokens/s | peak memory |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result.steps} | {result.params:,} | {result.final_eval['loss']:.4f} | "
        f"{result.final_eval['accuracy']:.4f} | {result.final_train.get('loss', float('nan')):.4f} | "
        f"{result.steps_per_s:.2f} | {result.tokens_per_s:,.0f} | {memory} |",
        "",
    ]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _prepare_run_dir(config: ExperimentConfig, run_dir: pathlib.Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path = run_dir / "config.yaml"
    if saved_path.exists():
        check_resumable(load_config(ExperimentConfig, saved_path), config)
    save_config(config, saved_path)


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
    try:
        placement = parallel.setup(
            config.parallel,
            batch_size=config.train.batch_size,
            variant=config.attention.variant,
            options=config.attention.options,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    with placement.activate():
        return _train(config, pathlib.Path(run_dir), placement, on_step)


def _train(
    config: ExperimentConfig,
    run_dir: pathlib.Path,
    placement: parallel.Placement,
    on_step: Sequence[Callable[[int, State, dict], None]],
) -> RunResult:
    task = build_task(config)
    model = build_model(config, task.spec)
    _prepare_run_dir(config, run_dir)
    tc = config.train
    fns = ModelFunctions.from_model(model, task.spec)
    tx = build_optimizer(config.optimizer, tc.steps)
    state = placement.place_state(init_state(fns, tx))
    manager = _checkpoint_manager(run_dir)
    if manager.latest_step() is not None:
        state = _restore(manager, state, manager.latest_step())
    start = int(state["step"])
    finished = run_dir / "result.json"
    if start >= tc.steps and finished.exists():  # nothing left to train: report the finished run
        manager.close()
        return RunResult(**json.loads(finished.read_text()))
    log = MetricsLog(run_dir / "metrics.jsonl", start)
    eval_on_mesh = make_eval_step(fns)
    eval_step = lambda params, batch: eval_on_mesh(params, placement.shard(batch))  # noqa: E731
    first_batch = placement.shard(task.batch("train", start, tc.batch_size))
    compiled = make_train_step(fns, tx, tc.seed).lower(state, first_batch).compile()  # type: ignore[attr-defined]
    memory = _memory_bytes(compiled)

    schedule = learning_rate_schedule(config.optimizer, tc.steps)
    window: list[dict] = []
    first_window = True  # includes start-up, so it stays out of the speed figures
    train_time, timed_steps, tokens = 0.0, 0, 0
    final_train: dict = {}
    final_eval: dict = {}
    if start >= tc.steps:  # already finished: report the stored state
        final_eval = evaluate(eval_step, state["params"], task, tc.batch_size, tc.eval_batches)
    bar = tqdm(total=tc.steps, initial=start, disable=not tc.progress, desc=config.name, dynamic_ncols=True)
    window_start = time.perf_counter()
    for step in range(start, tc.steps):
        batch = first_batch if step == start else placement.shard(task.batch("train", step, tc.batch_size))
        state, sums = compiled(state, batch)
        window.append(sums)
        done = step + 1
        for callback in on_step:
            callback(done, state, sums)
        if done % tc.log_every == 0 or done == tc.steps:
            final_train = _summarize(window)
            elapsed = time.perf_counter() - window_start
            window_tokens = _tokens_per_batch(batch) * len(window)
            if not first_window:
                train_time += elapsed
                timed_steps += len(window)
                tokens += window_tokens
            first_window = False
            rate = window_tokens / max(elapsed, 1e-9)
            log.write(
                {
                    "step": done,
                    "split": "train",
                    **final_train,
                    "tokens_per_s": rate,
                    "lr": float(schedule(done)),
                }
            )
            bar.set_postfix(
                loss=f"{final_train['loss']:.3f}", acc=f"{final_train['accuracy']:.3f}", tok_s=f"{rate:,.0f}"
            )
            window = []
        if done % tc.eval_every == 0 or done == tc.steps:
            final_eval = evaluate(eval_step, state["params"], task, tc.batch_size, tc.eval_batches)
            log.write({"step": done, "split": "val", **final_eval})
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            manager.save(done, args=ocp.args.StandardSave(state))
        bar.update(1)
        if not window:
            window_start = time.perf_counter()
    bar.close()
    manager.close()

    result = RunResult(
        name=config.name,
        variant=config.attention.display_name,
        steps=tc.steps,
        params=param_count(model),
        final_eval=final_eval,
        final_train=final_train,
        steps_per_s=timed_steps / train_time if train_time else float("nan"),
        tokens_per_s=tokens / train_time if train_time else float("nan"),
        peak_memory_bytes=memory,
        masks_padding=bool(getattr(model, "masks_padding", True)),
    )
    (run_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
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
    manager = _checkpoint_manager(run_dir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"run folder {str(run_dir)!r} has no checkpoint yet")
    state = _restore(manager, init_state(fns, tx), step)
    manager.close()
    return config, fns.merge(state["params"]), step
