"""Config-driven training: schema and loader, model/optimizer construction, the loop."""

from jattn.train.build import build_model, build_optimizer, build_task, build_variant, with_attention
from jattn.train.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict
from jattn.train.loop import (
    RunError,
    RunResult,
    TrainingDiverged,
    TrainingInterrupted,
    evaluate,
    load_run,
    make_eval_step,
    make_train_step,
    train,
)
from jattn.train.schema import ExperimentConfig

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "RunError",
    "RunResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "apply_overrides",
    "build_model",
    "build_optimizer",
    "build_task",
    "build_variant",
    "evaluate",
    "from_dict",
    "load_config",
    "load_run",
    "make_eval_step",
    "make_train_step",
    "save_config",
    "to_dict",
    "train",
    "with_attention",
]
