"""From a validated ``ExperimentConfig`` to a task, a model and an optimizer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jattn import nn
from jattn.data import TASKS, Task, TaskSpec
from jattn.train.config import ConfigError, from_dict
from jattn.train.schema import AttentionConfig, ExperimentConfig, ModelConfig, OptimizerConfig
from jattn.variants import Variant, get_variant, variant_names


def build_task(config: ExperimentConfig) -> Task:
    """The task named by ``task.name`` with ``task.options`` (checked like the rest of the config)."""
    return from_dict(TASKS[config.task.name], config.task.options, prefix="task.options")


def build_variant(attention: AttentionConfig, key: str = "attention") -> Variant:
    """``attention.variant`` from the registry; errors name the key and list what is allowed.

    Args:
      key: where ``attention`` sits in the config, for the errors (``compare[2]`` for an entry).
    """
    known = variant_names()
    if attention.variant not in known:
        raise ConfigError(
            f"config key '{key}.variant': unknown variant {attention.variant!r}; known: {sorted(known)}"
        )
    try:
        variant = get_variant(attention.variant, **attention.options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key '{key}.options' for variant {attention.variant!r}: {err}") from None
    return variant


def model_max_len(model: ModelConfig, spec: TaskSpec) -> int:
    """The model's maximum length: ``model.max_len``, or what the task needs (+1 for a CLS token)."""
    needed = max(spec.max_len, spec.max_source_len) + (1 if spec.format == "classification" else 0)
    if model.max_len is None:
        return needed
    if model.max_len < needed:
        raise ConfigError(
            f"config key 'model.max_len': the task's sequences need {needed} positions (with the CLS "
            f"token for classification), got model.max_len={model.max_len}"
        )
    return model.max_len


def build_model(
    config: ExperimentConfig, spec: TaskSpec, *, seed: int | None = None, attention_key: str = "attention"
) -> nnx.Module:
    """The model the task's format calls for, with the configured attention variant.

    Args:
      attention_key: where ``config.attention`` came from, for the errors (see ``build_variant``).
    """
    m = config.model
    max_len = model_max_len(m, spec)
    variant = build_variant(config.attention, attention_key)
    if variant.max_len is not None and variant.max_len < max_len:
        raise ConfigError(
            f"config key '{attention_key}.options': variant {variant.name!r} takes sequences up to "
            f"{variant.max_len}, the model needs {max_len}"
        )
    if variant.min_len is not None and max_len < variant.min_len:
        raise ConfigError(
            f"config key '{attention_key}.options': variant {variant.name!r} is meant for models of "
            f"max_len >= {variant.min_len} (it would not compress), this one's is {max_len}; set a "
            "smaller projected length in its options or raise model.max_len"
        )
    common = dict(
        max_len=max_len,
        width=m.width,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        variant=variant,
        position=m.position,
        dropout_rate=m.dropout,
        num_kv_heads=m.num_kv_heads,
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
        rngs=nnx.Rngs(config.train.seed if seed is None else seed),
    )
    if spec.format == "classification":
        return nn.EncoderClassifier(spec.vocab_size, spec.num_classes, pooling=m.pooling, **common)
    if spec.format == "sequence":
        return nn.DecoderLM(spec.vocab_size, **common)
    return nn.EncoderDecoder(spec.vocab_size, spec.num_classes, **common)


def apply_model(model: nnx.Module, batch: dict, fmt: str, key: jax.Array | None) -> jax.Array:
    """The model's float32 logits on ``batch``: ``[B, C]`` (classification) or ``[B, T, V]``."""
    if fmt == "classification":
        return model(batch["inputs"], lengths=batch["lengths"], key=key)
    if fmt == "sequence":
        return model(batch["inputs"], key=key)
    return model(batch["sources"], batch["inputs"], source_lengths=batch["source_lengths"], key=key)


def check_model(config: ExperimentConfig, task: Task, attention_key: str = "attention") -> None:
    """Build the model and trace it on one training batch without computing anything.

    Besides ``build_model``'s checks, this finds an attention that cannot run the model's calls on
    this backend (an ``implementation`` that does not support them, a variant that cannot be
    causal in a decoder) before anything is written or trained.

    Raises:
      ConfigError: naming ``<attention_key>.options.implementation`` when one is set, else
        ``<attention_key>.variant``, with the attention's own reason; or naming ``model`` and
        ``<attention_key>`` for any other ``ValueError`` the model raises.
    """
    try:
        batch = task.batch("train", 0, config.train.batch_size)
    except ValueError as err:  # a task whose options pass its own checks yet cannot make a batch
        raise ConfigError(f"config key 'task.options' (task {config.task.name!r}): {err}") from None

    def logits():
        return apply_model(
            build_model(config, task.spec, attention_key=attention_key), batch, task.spec.format, None
        )

    try:
        nnx.eval_shape(logits)
    except NotImplementedError as err:
        option = "options.implementation" if config.attention.options.get("implementation") else "variant"
        raise ConfigError(f"config key '{attention_key}.{option}': {err}") from None
    except ConfigError:
        raise
    except ValueError as err:  # a model/attention combination no check above caught
        raise ConfigError(
            f"config keys 'model' and '{attention_key}' (variant {config.attention.variant!r}): the model "
            f"cannot be built or run: {err}"
        ) from None


def learning_rate_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then the configured decay."""
    warmup = opt.warmup_steps
    peak = opt.learning_rate
    decay_steps = max(total_steps - warmup, 1)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.end_fraction)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(peak, peak * opt.end_fraction, decay_steps)
    elif opt.schedule == "rsqrt":
        start = max(warmup, 1)
        # Clamped at 0: optax.join_schedules also evaluates the decay during warm-up, at negative steps.
        decay = lambda step: peak * jnp.sqrt(start / (jnp.maximum(step, 0) + start))  # noqa: E731
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def build_optimizer(opt: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the schedule, after global-norm clipping."""
    adamw = optax.adamw(
        learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay
    )
    if opt.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)


def with_attention(config: ExperimentConfig, attention: AttentionConfig) -> ExperimentConfig:
    """The same experiment with another attention (for comparisons)."""
    return dataclasses.replace(config, attention=attention, compare=(), name=attention.display_name)
