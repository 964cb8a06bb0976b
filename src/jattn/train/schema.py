"""The experiment config schema: what a ``configs/*.yaml`` file may contain.

A file holds some of these sections; everything left out takes the defaults below::

    name: quickstart
    task: {name: recall, options: {seq_len: 128, num_pairs: 8}}
    model: {width: 64, depth: 2, num_heads: 4, mlp_dim: 128, position: learned}
    attention: {variant: local, options: {window: 16}}
    optimizer: {learning_rate: 1.0e-3, warmup_steps: 50, schedule: cosine}
    train: {steps: 500, batch_size: 32, eval_every: 100}
    compare:   # experiments/compare.py: one run per entry (label defaults to the variant name)
      - {variant: full}
      - {variant: local, options: {window: 16}}
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Literal

from jattn.data import TASKS
from jattn.parallel.training import DistributedConfig, ParallelConfig


def _field(default, **limits):
    return dataclasses.field(default=default, metadata=limits)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Attributes:
    name: a task in ``jattn.data.TASKS``.
    options: that task's dataclass fields (e.g. ``seq_len``, ``num_pairs``, ``seed``).
    """

    name: Literal["listops", "recall", "copying", "text"] = "recall"
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"task.name must be one of {sorted(TASKS)}, got {self.name!r}")


# A name that becomes a run folder: one path component, not hidden (so never "." or ".."), no spaces.
_FOLDER_NAME = re.compile(r"\w[\w.+=-]*")


def check_folder_name(key: str, value: str) -> None:
    """ValueError naming ``key`` unless ``value`` can name a run folder inside the output folder."""
    if not _FOLDER_NAME.fullmatch(value):
        raise ValueError(
            f"{key} {value!r} names a run folder, so it must be letters, digits, '_', '.', '+', '=' or '-' "
            "(no spaces or slashes), starting with a letter, digit or '_'"
        )


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Attributes:
    variant: a name registered in ``jattn.variants`` (``variant_names()`` lists them).
    options: keyword options of that variant (e.g. ``window``, ``block``, ``implementation``).
    label: name of the run in comparisons (defaults to the variant name).
    """

    variant: str = "full"
    options: dict = dataclasses.field(default_factory=dict)
    label: str | None = None

    @property
    def display_name(self) -> str:
        return self.label or self.variant


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Attributes:
    width: D. depth: number of blocks. num_heads: N. num_kv_heads: K (None: N). mlp_dim: MLP width.
    max_len: longest sequence the model takes (None: the task's length).
    position: "learned", "sinusoidal", "rotary" or "none".
    pooling: "cls" or "mean" (classification tasks).
    dropout: dropout rate.
    dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
    """

    width: int = _field(64, min=1)
    depth: int = _field(2, min=1)
    num_heads: int = _field(4, min=1)
    num_kv_heads: int | None = _field(None, min=1)
    mlp_dim: int = _field(128, min=1)
    max_len: int | None = _field(None, min=1)
    position: Literal["learned", "sinusoidal", "rotary", "none"] = "learned"
    pooling: Literal["cls", "mean"] = "cls"
    dropout: float = _field(0.0, min=0.0, max=0.9)
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(
                f"model.width must be a multiple of model.num_heads, got {self.width} and {self.num_heads}"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads must be a multiple of model.num_kv_heads, got {self.num_heads} and "
                f"{self.num_kv_heads}"
            )
        head_dim = self.width // self.num_heads
        if self.position == "rotary" and head_dim % 2:
            raise ValueError(
                "model.position 'rotary' rotates pairs of features, so it needs an even head dim "
                f"(model.width / model.num_heads), got {self.width} / {self.num_heads} = {head_dim}"
            )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up, then a decay, and global-norm clipping.

    Attributes:
      learning_rate: peak rate, reached at the end of warm-up.
      schedule: after warm-up, "cosine" (to ``end_fraction``·peak), "linear" (likewise), "rsqrt"
        (peak·sqrt(warmup/step), the LRA schedule) or "constant".
      warmup_steps: linear warm-up from 0.
      end_fraction: final rate as a fraction of the peak (cosine, linear).
      weight_decay, b1, b2: AdamW's.
      clip_norm: global gradient-norm clipping threshold (None: no clipping).
    """

    learning_rate: float = _field(1e-3, min=0.0)
    schedule: Literal["cosine", "linear", "rsqrt", "constant"] = "cosine"
    warmup_steps: int = _field(100, min=0)
    end_fraction: float = _field(0.1, min=0.0, max=1.0)
    weight_decay: float = _field(0.01, min=0.0)
    b1: float = _field(0.9, min=0.0, below=1.0)  # 1.0 divides by zero in Adam's bias correction
    b2: float = _field(0.98, min=0.0, below=1.0)
    clip_norm: float | None = _field(1.0, above=0.0, hint="null for no clipping; 0 would zero every update")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Attributes:
    steps: optimizer steps. batch_size: examples per step. seed: model initialisation and dropout
      (``jax.random.key`` takes 32 bits, so larger seeds would repeat smaller ones).
    eval_every: evaluate every this many steps (and at the end). eval_batches: batches per eval.
    log_every: write training metrics every this many steps.
    checkpoint_every: save a checkpoint every this many steps (and at the end); a multiple of log_every.
    progress: show a progress bar.
    """

    steps: int = _field(1000, min=1)
    batch_size: int = _field(32, min=1)
    seed: int = _field(0, min=0, max=2**32 - 1)
    eval_every: int = _field(200, min=1)
    eval_batches: int = _field(4, min=1)
    log_every: int = _field(10, min=1)
    checkpoint_every: int = _field(500, min=1)
    progress: bool = True

    def __post_init__(self):
        if self.checkpoint_every % self.log_every:  # a resumed run's first window starts at its checkpoint
            raise ValueError(
                f"train.checkpoint_every must be a multiple of train.log_every, got {self.checkpoint_every} "
                f"and {self.log_every}, so that a resumed run logs the same windows as an uninterrupted one"
            )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: task, model, attention, optimizer, training, and variants to compare.

    Attributes:
      name: the run folder's name under ``output_dir``.
      output_dir: where run folders go.
      parallel: devices: the mesh, state placement, multi-process start-up
        (``jattn.parallel.training.ParallelConfig``; ``{}`` mesh: one device).
      compare: attention entries ``experiments/compare.py`` trains one model for each.
    """

    name: str = "run"
    output_dir: str = "runs"
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    compare: tuple[AttentionConfig, ...] = ()

    def __post_init__(self):
        check_folder_name("name", self.name)
        # ``output_dir=~/runs`` on a command line reaches Python unexpanded (the shell expands a
        # leading ~ only), and would make a folder named ~ in the working directory.
        object.__setattr__(self, "output_dir", os.path.expanduser(self.output_dir))


# Keys a resumed run may change: they do not affect the state or the batches of earlier steps.
# ``train.steps`` only as far as ``jattn.train.loop.check_resumable`` allows: not below the
# checkpoint's step, and not when the learning-rate schedule of the steps already trained depends
# on it (cosine and linear decays are spread over ``train.steps``).
RESUMABLE_CHANGES = (
    "train.steps",
    "train.progress",
    "train.eval_every",
    "train.log_every",
    "output_dir",
    # where the processes meet, not what they compute (parallel.mesh and parallel.state may not change)
    *(f"parallel.distributed.{field.name}" for field in dataclasses.fields(DistributedConfig)),
)
