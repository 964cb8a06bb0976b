"""The scaling study: how time and memory of each attention variant grow with sequence length.

For every variant of a config (picked by name from ``jattn.variants``, so new variants need no code
here), every length and every pass (``forward``, ``forward_backward``), one *measurement* compiles
the step once and records:

* wall time: the median of timed calls after warm-up, each synchronised with ``block_until_ready``;
* memory: the bytes the compiled executable allocates per call (arguments + outputs + XLA's
  temporary buffers − aliased), from ``compiled.memory_analysis()``, and the device's own peak
  (``memory_stats()["peak_bytes_in_use"]``, a process-wide high-water mark) where the backend has one;
* FLOPs: XLA's cost analysis, and the analytic count (``analytic_flops``);
* tokens per second.

Guards keep a sweep going: a measurement whose compiled memory is over the memory budget is not run
(``over_memory``); one whose first call, or whose prediction from the shorter lengths, is over the time
budget is recorded as ``timeout`` and the longer lengths of that variant are skipped; a runtime
out-of-memory is ``oom``; a length the variant cannot take (outside its ``max_len``/``min_len``) or a
``NotImplementedError`` (an implementation that does not support the mask) is ``unsupported``; anything
else is an ``error``. Each row is appended to ``scaling.csv`` as soon as it is measured, so an
interrupted sweep keeps its rows and a rerun continues where it stopped (measuring again the errors and
the rows decided by a budget or ``max_length`` it has raised: ``redo_reason``).

The analysis fits ``log(y) = p · log(L) + c`` per variant over the lengths past the
overhead-dominated regime (``fit_min_length``) and finds the *crossover*: the length from which a
variant is faster (smaller, both) than the baseline (full attention) at every longer length.

Two levels: ``op``, the attention call alone (q, k, v ``[B, T, N, H]``); ``model``, one training
step (forward, backward, optimizer update) of a small transformer whose attention is the variant.

Command line: ``python experiments/scaling.py configs/scaling/cpu.yaml [key=value ...]``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np

from jattn import flops
from jattn import masks as masks_lib
from jattn.data import TaskSpec
from jattn.train import config as config_lib
from jattn.train.build import build_model, build_optimizer
from jattn.train.loop import ModelFunctions, init_state, make_eval_step, make_train_step
from jattn.train.schema import AttentionConfig, ExperimentConfig, ModelConfig, OptimizerConfig, TrainConfig
from jattn.variants import Variant, get_variant, variant_names

PASSES = ("forward", "forward_backward")
DTYPES = ("float32", "bfloat16", "float16")

# Row statuses.
OK = "ok"
TIMEOUT = "timeout"  # a call over the time budget, measured or predicted
OVER_MEMORY = "over_memory"  # the compiled step needs more than the memory budget; not run
OOM = "oom"  # the device ran out of memory at run time
UNSUPPORTED = "unsupported"  # NotImplementedError, or a length outside the variant's max_len/min_len
ERROR = "error"  # anything else, with the message in ``detail``; measured again on resume
SKIPPED = "skipped"  # above the entry's ``max_length``: not measured by choice
_BLOCKING = (TIMEOUT, OVER_MEMORY, OOM)  # a longer length of the same curve would fail the same way
_COUNT_BLOCK = 512  # tile size at which attended pairs are counted

# Columns that identify the measured setup: rows of another setup cannot be resumed into one table.
# The model level's own (_MODEL_SETUP_FIELDS) are empty in op-level rows and compared only between
# model-level rows. ``vocab_size`` was added after the first results: a CSV begun before lacks it.
_MODEL_SETUP_FIELDS = ("model", "vocab_size")
SETUP_FIELDS = (
    "batch",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "dtype",
    "causal",
    *_MODEL_SETUP_FIELDS,
    "backend",
)
_ID_FIELDS = ("level", "name", "variant", "options", "pass", "length")
_RUN_FIELDS = ("device_kind", "jax_version", "status", "detail", "repeats")
_TIME_FIELDS = ("time_s", "time_min_s", "cpu_time_s", "compile_s", "tokens_per_s")
_COST_FIELDS = (
    "memory_bytes",
    "temp_bytes",
    "device_peak_bytes",
    "xla_flops",
    "matmul_flops",
    "analytic_flops",
)
_LOAD_FIELDS = ("load_avg",)  # the machine's 1-minute load average when the row was measured
_MEASURED_FIELDS = _TIME_FIELDS + _COST_FIELDS + _LOAD_FIELDS  # numeric columns (empty where not measured)
# The settings and the machine a row was measured under: they may differ between the rows of one CSV
# (a resumed sweep with more repeats, on another machine), so the report describes them from the rows.
# Added after the first results: a CSV begun before them lacks these columns (None when read).
_SETTING_FIELDS = ("warmup", "max_repeats", "time_budget_s", "memory_budget_gb")
_MACHINE_FIELDS = ("machine", "cpu_cores")
_NUMERIC_FIELDS = _MEASURED_FIELDS + _SETTING_FIELDS + ("repeats", "cpu_cores")
ROW_FIELDS = _ID_FIELDS + SETUP_FIELDS + _RUN_FIELDS + _MEASURED_FIELDS + _SETTING_FIELDS + _MACHINE_FIELDS


# ---------------------------------------------------------------------------------------------
# Config schema
# ---------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"scaling config: {key} must be {expected}, got {got!r}")


def _is_positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@dataclasses.dataclass(frozen=True)
class VariantEntry:
    """One curve of the study: a registered variant with options, under a display name.

    Attributes:
      name: the label in tables and plots, unique within a config (e.g. ``local_256``).
      variant: a name from ``jattn.variants.variant_names()`` (e.g. ``local``).
      options: keyword options of ``get_variant`` (e.g. ``{window: 256, implementation: banded}``).
      max_length: the longest length to measure this entry at (None: all); longer lengths are
        recorded as ``skipped`` (e.g. an entry whose mask takes minutes to lay out at long lengths).
    """

    name: str
    variant: str
    options: dict = dataclasses.field(default_factory=dict)
    max_length: int | None = None

    def __post_init__(self):
        _require(
            isinstance(self.name, str) and bool(self.name), "variants[].name", "a non-empty string", self.name
        )
        known = sorted(variant_names())
        _require(
            self.variant in known,
            f"variants[{self.name}].variant",
            f"a registered variant, one of {known}",
            self.variant,
        )
        _require(
            isinstance(self.options, Mapping), f"variants[{self.name}].options", "a mapping", self.options
        )
        _require(
            self.max_length is None or _is_positive_int(self.max_length),
            f"variants[{self.name}].max_length",
            "a positive integer or null",
            self.max_length,
        )

    def build(self) -> Variant:
        """The configured variant; raises ``ConfigError`` naming an option the variant does not take
        or a bad option value, ``implementation`` included."""
        try:
            return get_variant(self.variant, **self.options)
        except (TypeError, ValueError) as err:
            raise config_lib.ConfigError(f"scaling config: variants[{self.name}]: {err}") from None

    @property
    def options_json(self) -> str:
        return json.dumps(dict(self.options), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """A scaling sweep. Lengths are self-attention lengths (T = S).

    Attributes:
      variants: the curves; ``baseline`` names the one the others are compared with.
      lengths: sequence lengths, measured in increasing order.
      passes: ``forward`` and/or ``forward_backward``.
      levels: ``op`` (the attention call) and/or ``model`` (a training step of ``model``).
      baseline: the entry name crossovers are measured against (full attention).
      batch, num_heads, num_kv_heads (default num_heads), head_dim, dtype, causal: the op's inputs.
      model: the transformer of the ``model`` level (``jattn.train`` schema; its ``max_len`` follows
        the length): an encoder classifier, or a decoder language model when ``causal``.
      vocab_size: tokens of the model level's synthetic batches.
      warmup: calls before timing (the first is also the time-budget probe), at least 1.
      repeats: timed calls (fewer when they would not fit the time budget); the median is reported.
      time_budget_s: the longest one call may take; longer (measured or predicted) is a ``timeout``.
      memory_budget_gb: the most the compiled step may allocate; more is ``over_memory``, not run.
      fit_min_length: exponents are fitted on the lengths from here on (past the overhead regime).
      out_dir: the run folder (``scaling.csv``, ``scaling.md``, PNGs, and ``config.yaml``: the
        resolved config of its latest sweep).
      resume: keep the rows already in ``out_dir/scaling.csv`` and measure only the missing ones.
      seed: inputs and parameters.
    """

    variants: tuple[VariantEntry, ...]
    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    passes: tuple[str, ...] = PASSES
    levels: tuple[str, ...] = ("op",)
    baseline: str = "full"
    batch: int = 1
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = False
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    vocab_size: int = 256
    warmup: int = 1
    repeats: int = 5
    time_budget_s: float = 30.0
    memory_budget_gb: float = 4.0
    fit_min_length: int = 1024
    out_dir: str = "experiments/results/scaling"
    resume: bool = True
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "out_dir", os.path.expanduser(self.out_dir))  # as output_dir in training
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "lengths", tuple(self.lengths))
        object.__setattr__(self, "passes", tuple(self.passes))
        object.__setattr__(self, "levels", tuple(self.levels))
        _require(len(self.variants) > 0, "variants", "a non-empty list", self.variants)
        names = [entry.name for entry in self.variants]
        _require(len(set(names)) == len(names), "variants[].name", "unique names", names)
        _require(self.baseline in names, "baseline", f"one of the variant names {names}", self.baseline)
        bad = [length for length in self.lengths if not _is_positive_int(length)]
        _require(not bad and len(self.lengths) > 0, "lengths", "a non-empty list of positive integers", bad)
        _require(len(set(self.lengths)) == len(self.lengths), "lengths", "distinct lengths", self.lengths)
        bad = [p for p in self.passes if p not in PASSES]
        _require(not bad and len(self.passes) > 0, "passes", f"a non-empty subset of {PASSES}", self.passes)
        known_levels = tuple(_LEVEL_BUILDERS)
        bad = [lv for lv in self.levels if lv not in known_levels]
        _require(
            not bad and len(self.levels) > 0, "levels", f"a non-empty subset of {known_levels}", self.levels
        )
        for key in ("batch", "num_heads", "head_dim", "vocab_size", "warmup", "repeats", "fit_min_length"):
            _require(_is_positive_int(getattr(self, key)), key, "a positive integer", getattr(self, key))
        kv_heads = self.kv_heads
        _require(
            _is_positive_int(kv_heads) and self.num_heads % kv_heads == 0,
            "num_kv_heads",
            f"a positive divisor of num_heads={self.num_heads}",
            self.num_kv_heads,
        )
        _require(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        for key in ("time_budget_s", "memory_budget_gb"):
            value = getattr(self, key)
            _require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                key,
                "a positive number",
                value,
            )

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_gb * 2**30)

    def setup(self, level: str) -> dict[str, str]:
        """The SETUP_FIELDS of this config's rows of ``level``, as they are written to the CSV (the
        model and its vocabulary only in model-level rows)."""
        is_model = level == "model"
        return {
            "batch": str(self.batch),
            "num_heads": str(self.num_heads),
            "num_kv_heads": str(self.kv_heads),
            "head_dim": str(self.head_dim),
            "dtype": self.dtype,
            "causal": str(self.causal),
            "model": json.dumps(config_lib.to_dict(self.model), sort_keys=True) if is_model else "",
            "vocab_size": str(self.vocab_size) if is_model else "",
            "backend": jax.default_backend(),
        }

    def settings(self) -> dict[str, float]:
        """The _SETTING_FIELDS of this config's rows: how they are measured."""
        return {
            "warmup": self.warmup,
            "max_repeats": self.repeats,
            "time_budget_s": self.time_budget_s,
            "memory_budget_gb": self.memory_budget_gb,
        }


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ScalingConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate it (``jattn.train.config``:
    unknown keys, wrong types and bad values are ``ConfigError``s naming the key)."""
    return config_lib.load_config(ScalingConfig, path, overrides)


def build_variants(config: ScalingConfig) -> dict[str, Variant]:
    """Every entry's variant by entry name; raises ``ConfigError`` before any measurement if one is
    misconfigured."""
    return {entry.name: entry.build() for entry in config.variants}


# ---------------------------------------------------------------------------------------------
# Analytic counts
# ---------------------------------------------------------------------------------------------


def attended_pairs(mask: masks_lib.Mask | None, q_len: int, kv_len: int) -> int | None:
    """How many (query, key) pairs ``mask`` allows, or None if it depends on data.

    Counted tile by tile from the block layout: FULL tiles by their area, PARTIAL ones from the
    mask's predicate, so a long sliding window costs O(T·w) to count, not O(T·S).
    """
    if mask is None:
        return q_len * kv_len
    if not mask.position_only:
        return None
    mask = mask.for_lengths(q_len, kv_len)
    layout = mask.blocks(q_len, kv_len, _COUNT_BLOCK, _COUNT_BLOCK)  # [nq, nk]
    total = 0
    for qi, kj in zip(*np.nonzero(layout != masks_lib.EMPTY), strict=True):
        q_idx = np.arange(qi * _COUNT_BLOCK, min((qi + 1) * _COUNT_BLOCK, q_len))
        kv_idx = np.arange(kj * _COUNT_BLOCK, min((kj + 1) * _COUNT_BLOCK, kv_len))
        if layout[qi, kj] == masks_lib.FULL:
            total += q_idx.size * kv_idx.size
        else:
            total += int(np.count_nonzero(mask.tile(q_idx, kv_idx)))
    return total


def exact_attention_flops(
    pairs: int, *, batch: int, num_heads: int, head_dim: int, value_head_dim: int
) -> float:
    """Forward FLOPs of exact attention over ``pairs`` attended (query, key) pairs per head.

    Two matmuls per pair: q·k (2·H) and p·v (2·Hv); softmax and masking are not counted.
    """
    return 2.0 * batch * num_heads * pairs * (head_dim + value_head_dim)


def pass_flops(forward: float, pass_name: str) -> float:
    """A pass's FLOPs from the forward count: the backward pass is two forward's worth of matmuls
    (dq, dk from the score gradient; dv and the score gradient from the output gradient), without
    any recomputation."""
    return forward if pass_name == "forward" else 3.0 * forward


def analytic_flops(variant: Variant, config: ScalingConfig, length: int, pass_name: str) -> float | None:
    """The analytic FLOP count of one op-level measurement, or None when there is none.

    Exact variants: attended pairs of the variant's mask (``Variant.mask``) times the matmul cost.
    Approximate variants have no mask to count; XLA's count (``xla_flops``) is their figure.
    """
    if not variant.exact or variant.mask is None:
        return None
    pairs = attended_pairs(variant.mask(config.causal), length, length)
    if pairs is None:
        return None
    forward = exact_attention_flops(
        pairs,
        batch=config.batch,
        num_heads=config.num_heads,
        head_dim=config.head_dim,
        value_head_dim=config.head_dim,
    )
    return pass_flops(forward, pass_name)


# ---------------------------------------------------------------------------------------------
# The measured steps: a pure function and its arguments per level
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """What one measurement runs: ``fn(*args)``, jit-compiled once.

    Attributes:
      fn: the step (forward, or forward+backward) as a pure function.
      args: its arguments (arrays and pytrees).
      tokens: query tokens processed per call (for tokens/s).
      analytic_flops: the analytic count, or None.
    """

    fn: Callable[..., Any]
    args: tuple
    tokens: int
    analytic_flops: float | None


def _op_step(variant: Variant, config: ScalingConfig, length: int, pass_name: str) -> Step:
    """The attention call alone on random q, k, v ``[B, T, N|K, H]``."""
    dtype = jnp.dtype(config.dtype)
    keys = jax.random.split(jax.random.key(config.seed), 6)
    q = jax.random.normal(
        keys[0], (config.batch, length, config.num_heads, config.head_dim), dtype
    )  # [B, T, N, H]
    k = jax.random.normal(
        keys[1], (config.batch, length, config.kv_heads, config.head_dim), dtype
    )  # [B, S, K, H]
    v = jax.random.normal(
        keys[2], (config.batch, length, config.kv_heads, config.head_dim), dtype
    )  # [B, S, K, H]
    params = None
    if variant.init_params is not None:  # built for this length, as a model of max_len=length would be
        params = variant.init_params(
            keys[3],
            num_heads=config.num_heads,
            num_kv_heads=config.kv_heads,
            head_dim=config.head_dim,
            max_len=length,
        )
    causal = config.causal

    def forward(q, k, v, params, key):
        return variant(q, k, v, causal=causal, params=params, key=key)  # [B, T, N, H]

    def forward_backward(q, k, v, params, key, dout):
        # The output is returned, as a layer's is used: without it XLA drops the forward's P·V
        # matmul from autodiff implementations but not from custom-VJP ones, which need it.
        out, pullback = jax.vjp(lambda *qkvp: forward(*qkvp, key), q, k, v, params)
        return out, pullback(dout)  # [B, T, N, H], (dq, dk, dv, dparams)

    flops = analytic_flops(variant, config, length, pass_name)
    if pass_name == "forward":
        return Step(forward, (q, k, v, params, keys[4]), config.batch * length, flops)
    dout = jax.random.normal(keys[5], q.shape, dtype)  # [B, T, N, H]
    return Step(forward_backward, (q, k, v, params, keys[4], dout), config.batch * length, flops)


def _model_batch(config: ScalingConfig, spec: TaskSpec, length: int) -> dict[str, jax.Array]:
    """A synthetic batch of ``config.batch`` sequences of ``length`` tokens in the task format."""
    keys = jax.random.split(jax.random.key(config.seed + 1), 2)
    tokens = jax.random.randint(keys[0], (config.batch, length), 0, spec.vocab_size)  # [B, T]
    if spec.format == "sequence":
        targets = jax.random.randint(keys[1], (config.batch, length), 0, spec.vocab_size)  # [B, T]
        return {
            "inputs": tokens,
            "targets": targets,
            "weights": jnp.ones((config.batch, length), jnp.float32),
        }
    labels = jax.random.randint(keys[1], (config.batch,), 0, spec.num_classes)  # [B]
    return {"inputs": tokens, "lengths": jnp.full((config.batch,), length, jnp.int32), "labels": labels}


def _model_step(variant: Variant, config: ScalingConfig, length: int, pass_name: str) -> Step:
    """One step of the small transformer of ``jattn.train`` with this variant as its attention:
    the loss (``forward``) or a training step, AdamW update included (``forward_backward``)."""
    spec = TaskSpec(
        format="sequence" if config.causal else "classification",
        vocab_size=config.vocab_size,
        max_len=length,
        num_classes=config.vocab_size if config.causal else 2,
    )
    experiment = ExperimentConfig(
        model=dataclasses.replace(config.model, max_len=None),
        attention=AttentionConfig(variant=variant.name, options=dict(variant.options)),
        train=TrainConfig(seed=config.seed),
    )
    functions = ModelFunctions.from_model(build_model(experiment, spec), spec)
    batch = _model_batch(config, spec, length)
    tokens = config.batch * length
    if pass_name == "forward":
        return Step(make_eval_step(functions), (functions.initial_params(), batch), tokens, None)
    optimizer = build_optimizer(OptimizerConfig(), total_steps=1)
    train_step = make_train_step(functions, optimizer, config.seed)
    return Step(train_step, (init_state(functions, optimizer), batch), tokens, None)


_LEVEL_BUILDERS: dict[str, Callable[[Variant, ScalingConfig, int, str], Step]] = {
    "op": _op_step,
    "model": _model_step,
}


# ---------------------------------------------------------------------------------------------
# Measuring one point
# ---------------------------------------------------------------------------------------------


def compiled_memory_bytes(compiled) -> tuple[int | None, int | None]:
    """(bytes a call allocates, of which XLA temporaries) from the compiled memory analysis.

    Arguments + outputs + temporaries − aliased: the temporaries are one arena allocated per call,
    so this is what a call holds at its peak on every backend (XLA's own ``peak_memory_in_bytes``
    leaves the temporaries out on CPU). (None, None) where the backend has no memory analysis.
    """
    stats = compiled.memory_analysis()
    if stats is None:
        return None, None
    temp = int(stats.temp_size_in_bytes)
    total = int(stats.argument_size_in_bytes) + int(stats.output_size_in_bytes) + temp
    return total - int(stats.alias_size_in_bytes), temp


def compiled_flops(compiled) -> float | None:
    """XLA's cost-analysis FLOPs of the compiled step (None where the backend gives none)."""
    costs = compiled.cost_analysis()
    if isinstance(costs, Sequence):  # older jax: one dict per computation
        costs = costs[0] if costs else None
    if not costs or "flops" not in costs:
        return None
    return float(costs["flops"])


def jaxpr_flops(closed_jaxpr) -> int | None:
    """``jattn.flops`` matmul FLOPs of a traced step (``jax.jit(fn).trace(...).jaxpr``): loop bodies
    times their trip counts, unlike XLA's count; None where a loop has no static trip count
    (``chunked``, the Pallas kernels)."""
    try:
        return flops.jaxpr_matmul_flops(closed_jaxpr.jaxpr)
    except ValueError:
        return None


def device_peak_bytes() -> int | None:
    """The device's high-water mark of allocated bytes, where the backend reports one (GPU, TPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


@dataclasses.dataclass(frozen=True)
class Timing:
    """Timed calls of one measurement.

    Attributes:
      times: wall seconds of each timed call (for a timeout: the single over-budget call).
      cpu_times: CPU seconds this process spent in each of those calls (all threads): unlike wall
        time, it does not grow when other processes compete for the cores.
      over_budget: a call took longer than the time budget.
    """

    times: tuple[float, ...]
    cpu_times: tuple[float, ...]
    over_budget: bool

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)


def time_calls(
    call: Callable[[], Any],
    *,
    warmup: int,
    repeats: int,
    budget_s: float,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
) -> Timing:
    """Time ``call`` (synchronised): ``warmup`` untimed calls, then up to ``repeats`` timed ones.

    The first warm-up call probes the cost: if it takes longer than ``budget_s`` the measurement
    stops there (``over_budget``, its time kept as a lower bound); otherwise the number of timed
    calls is cut so that warm-up and repeats together stay within about ``budget_s`` (at least one).
    """

    def timed() -> tuple[float, float]:
        start, cpu_start = clock(), cpu_clock()
        jax.block_until_ready(call())
        return clock() - start, cpu_clock() - cpu_start

    first, first_cpu = timed()
    if first > budget_s:
        return Timing((first,), (first_cpu,), over_budget=True)
    spent = first + sum(timed()[0] for _ in range(warmup - 1))
    affordable = int((budget_s - spent) // max(first, 1e-9))
    measured = [timed() for _ in range(max(1, min(repeats, affordable)))]
    return Timing(tuple(t for t, _ in measured), tuple(c for _, c in measured), over_budget=False)


def predict_time(times: Mapping[int, float], length: int) -> float | None:
    """One call's time at ``length`` extrapolated from the shorter lengths' times.

    Uses the local log-log slope of the last two lengths, clamped to [1, 3] (a slope below 1 is the
    overhead regime, not the asymptote), or slope 2 from a single length; None without data.
    """
    shorter = sorted(length_ for length_ in times if length_ < length)
    if not shorter:
        return None
    last = shorter[-1]
    slope = 2.0
    if len(shorter) >= 2:
        prev = shorter[-2]
        slope = math.log(times[last] / times[prev]) / math.log(last / prev)
        slope = min(3.0, max(1.0, slope))
    return times[last] * (length / last) ** slope


def _is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _failure_status(err: Exception) -> str:
    """OOM for a device out of memory, UNSUPPORTED for what the variant says it cannot run
    (NotImplementedError: a mask an implementation cannot take, a causal Linformer), ERROR for
    anything else: a ValueError or TypeError is a bug or a bad input, not a limit of the variant."""
    if _is_oom(err):
        return OOM
    if isinstance(err, NotImplementedError):
        return UNSUPPORTED
    return ERROR


def _short(err: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.3g} s"


def measure(step: Step, config: ScalingConfig, predicted_s: float | None = None) -> dict[str, Any]:
    """Compile and time one step under the config's budgets; the measured columns of its row.

    Never raises for a failing step: out of memory, over a budget or unsupported become the
    ``status`` and ``detail`` columns.
    """
    if predicted_s is not None and predicted_s > config.time_budget_s:
        return {
            "status": TIMEOUT,
            "detail": f"predicted {_fmt_seconds(predicted_s)} per call from the shorter lengths, over the "
            f"{_fmt_seconds(config.time_budget_s)} budget; not run",
        }
    row: dict[str, Any] = {"analytic_flops": step.analytic_flops}
    try:
        start = time.perf_counter()
        traced = jax.jit(step.fn).trace(*step.args)
        compiled = traced.lower().compile()
        row["compile_s"] = time.perf_counter() - start
        row["memory_bytes"], row["temp_bytes"] = compiled_memory_bytes(compiled)
        row["xla_flops"] = compiled_flops(compiled)
        row["matmul_flops"] = jaxpr_flops(traced.jaxpr)
        if row["memory_bytes"] is not None and row["memory_bytes"] > config.memory_budget_bytes:
            return row | {
                "status": OVER_MEMORY,
                "detail": f"compiled step needs {row['memory_bytes'] / 2**30:.2f} GiB, over the "
                f"{config.memory_budget_gb:g} GiB budget; not run",
            }
        timing = time_calls(
            lambda: compiled(*step.args),
            warmup=config.warmup,
            repeats=config.repeats,
            budget_s=config.time_budget_s,
        )
    except Exception as err:  # a failing point is a row, the sweep goes on
        return row | {"status": _failure_status(err), "detail": _short(err)}
    row |= {
        "time_s": timing.median,
        "time_min_s": min(timing.times),
        "cpu_time_s": timing.cpu_median,
        "repeats": len(timing.times),
        "tokens_per_s": step.tokens / timing.median,
        "device_peak_bytes": device_peak_bytes(),
    }
    if timing.over_budget:
        return row | {
            "status": TIMEOUT,
            "detail": f"first call took {_fmt_seconds(timing.times[0])}, over the "
            f"{_fmt_seconds(config.time_budget_s)} budget",
        }
    return row | {"status": OK, "detail": ""}


# ---------------------------------------------------------------------------------------------
# The plan: points, their rows, what remains to measure
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    """One measurement of the sweep."""

    level: str
    entry: VariantEntry
    pass_name: str
    length: int

    @property
    def track(self) -> tuple[str, str, str]:
        """The curve this point belongs to: its lengths share guards and a fit."""
        return (self.level, self.entry.name, self.pass_name)

    @property
    def above_max_length(self) -> bool:
        """Longer than its entry's ``max_length``: skipped by choice."""
        return self.entry.max_length is not None and self.length > self.entry.max_length

    def columns(self) -> dict[str, Any]:
        """The _ID_FIELDS of this point's row."""
        return {
            "level": self.level,
            "name": self.entry.name,
            "variant": self.entry.variant,
            "options": self.entry.options_json,
            "pass": self.pass_name,
            "length": self.length,
        }

    def key(self) -> tuple[str, ...]:
        return _row_key(self.columns())


def _row_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The measurement a row holds: its _ID_FIELDS (of several rows of one, the latest counts)."""
    return tuple(str(row[key]) for key in _ID_FIELDS)


def _track(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """The curve a row belongs to (``Point.track``)."""
    return (row["level"], row["name"], row["pass"])


def plan(config: ScalingConfig) -> list[Point]:
    """Every point of the sweep, length by length (each variant and pass at one length, then the
    next): drifts in a shared machine's load then hit all variants of a length alike, and an
    interrupted sweep holds every variant up to some length."""
    return [
        Point(level, entry, pass_name, length)
        for level in config.levels
        for length in sorted(config.lengths)
        for entry in config.variants
        for pass_name in config.passes
    ]


def current_rows(rows: Iterable[Mapping[str, Any]], config: ScalingConfig) -> list[Mapping[str, Any]]:
    """The rows of ``config``'s own points: its levels, passes and lengths, and under each entry name
    only the rows of that entry's variant and options.

    A CSV may also hold rows of earlier configs (the same name with another window, lengths dropped
    since): they stay there for resuming, but the guards, fits and report use only these rows, so no
    curve mixes two variants.
    """
    keys = {point.key() for point in plan(config)}
    return [row for row in rows if _row_key(row) in keys]


def _raised(recorded: float | None, current: float) -> bool:
    """The config's budget is above the one a row recorded (never where the row records none)."""
    return recorded is not None and current > recorded


def redo_reason(row: Mapping[str, Any], point: Point, config: ScalingConfig) -> str | None:
    """Why a resumed sweep measures ``point`` again although ``row`` holds it, or None.

    A row that ended in an ``error``, and one decided by a limit that ``config`` has since raised: a
    ``timeout`` (``over_memory``) recorded under a smaller ``time_budget_s`` (``memory_budget_gb``),
    a ``skipped`` row the entry's ``max_length`` now allows. The rows a shorter length's failure
    skipped carry its status and budgets, so they are measured again with it. Rows that do not record
    their budgets (a CSV begun before those columns) are kept.
    """
    status = row["status"]
    if status == ERROR:
        return "ended in an error"
    if status == SKIPPED and not point.above_max_length:
        return "skipped above a smaller max_length"
    if status == TIMEOUT and _raised(row["time_budget_s"], config.time_budget_s):
        return "over a smaller time_budget_s"
    if status == OVER_MEMORY and _raised(row["memory_budget_gb"], config.memory_budget_gb):
        return "over a smaller memory_budget_gb"
    return None


def _held(config: ScalingConfig, rows: Iterable[Mapping[str, Any]]) -> list[tuple[Point, Mapping | None]]:
    """Every point of ``config``'s plan with its latest row in ``rows`` (None: not measured yet)."""
    latest = {_row_key(row): row for row in rows}
    return [(point, latest.get(point.key())) for point in plan(config)]


def pending(config: ScalingConfig, rows: Iterable[Mapping[str, Any]]) -> list[Point]:
    """The points of ``config``'s plan that ``rows`` do not hold yet, or hold as a row to measure
    again (``redo_reason``), in plan order."""
    return [point for point, row in _held(config, rows) if row is None or redo_reason(row, point, config)]


def redone(config: ScalingConfig, rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many of the rows ``rows`` hold a resumed sweep measures again, by ``redo_reason``."""
    reasons = [redo_reason(row, point, config) for point, row in _held(config, rows) if row is not None]
    return dict(Counter(reason for reason in reasons if reason))


@dataclasses.dataclass
class _Track:
    """What the guards know about one curve so far."""

    times: dict[int, float] = dataclasses.field(default_factory=dict)
    blocked_by: tuple[str, int] | None = None  # (status, length) that the longer lengths inherit

    def record(self, length: int, status: str, time_s: float | None) -> None:
        if status == OK and time_s is not None:
            self.times[length] = time_s
        elif status in _BLOCKING and (self.blocked_by is None or length < self.blocked_by[1]):
            self.blocked_by = (status, length)


def _skipped(blocked_by: tuple[str, int]) -> dict[str, Any]:
    status, length = blocked_by
    reason = {TIMEOUT: "over the time budget", OVER_MEMORY: "over the memory budget", OOM: "out of memory"}[
        status
    ]
    return {"status": status, "detail": f"skipped: {reason} at length {length}"}


def is_reported_failure(row: Mapping[str, Any]) -> bool:
    """A measurement that did not run to the end, which the sweep prints and the report lists; not
    one skipped by choice (``max_length``) or because a shorter length failed."""
    return row["status"] not in (OK, SKIPPED) and not str(row["detail"]).startswith("skipped")


# ---------------------------------------------------------------------------------------------
# The CSV
# ---------------------------------------------------------------------------------------------


def _parse_float(text: str | None) -> float | None:
    return None if text in (None, "", "None") else float(text)


def _split_unfinished(data: bytes) -> tuple[bytes, bytes]:
    """(the complete lines, the unfinished last line without its newline): a row a sweep was
    stopped while writing."""
    end = data.rfind(b"\n") + 1
    return data[:end], data[end:]


def _parse_row(raw: Mapping[str | None, str | None]) -> dict[str, Any] | None:
    """A ``csv.DictReader`` row with its columns parsed, or None if it is malformed: a field count other
    than the header's (a row cut off, or run into the next one) or no status."""
    if None in raw or None in raw.values() or not raw.get("status"):
        return None
    row: dict[str, Any] = {key: None for key in ROW_FIELDS} | {str(key): value for key, value in raw.items()}
    try:
        row["length"] = int(row["length"])
        row.update({key: _parse_float(row[key]) for key in _NUMERIC_FIELDS})
    except ValueError:
        return None
    return row


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Every complete row of a ``scaling.csv`` in file order, and the line numbers of malformed ones."""
    if not path.exists():
        return [], []
    complete, _ = _split_unfinished(path.read_bytes())
    reader = csv.DictReader(io.StringIO(complete.decode(errors="replace"), newline=""))
    rows, malformed = [], []
    for raw in reader:
        row = _parse_row(raw)
        if row is None:
            malformed.append(reader.line_num)
        else:
            rows.append(row)
    return rows, malformed


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``scaling.csv``, numeric columns as floats (None where empty), length as int;
    a column the CSV lacks (begun by an older version) is None.

    Where the CSV holds several rows of one measurement (measured again on resume, ``redo_reason``),
    the latest counts. Left out: an unfinished last line (a sweep stopped while writing it) and
    malformed rows (``_parse_row``); ``run_sweep`` warns of both.
    """
    rows, _ = _read_csv(Path(path))
    latest = {_row_key(row): row for row in rows}
    return [row for row in rows if latest[_row_key(row)] is row]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def repair_csv(path: str | os.PathLike) -> None:
    """Cut an unfinished last line off the CSV (the next row would run into it), and warn of it and
    of malformed rows (which ``read_rows`` leaves out), naming the file."""
    path = Path(path)
    if not path.exists():
        return
    complete, unfinished = _split_unfinished(path.read_bytes())
    if unfinished:
        os.truncate(path, len(complete))
        text = unfinished.decode(errors="replace")
        _warn(
            f"{path}: cut off an unfinished last row (a sweep stopped while writing it; measured again): "
            f"{text[:120]!r}{'...' if len(text) > 120 else ''}"
        )
    _, malformed = _read_csv(path)
    if malformed:
        _warn(f"{path}: malformed rows left out (field count or status): lines {malformed}")


def _header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f))


def append_row(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one row to the CSV (with the header if the file is new) and flush it to disk."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        # A CSV begun by an older version keeps its header: columns it lacks are left out.
        fieldnames = ROW_FIELDS if new else _header(path)
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in fieldnames})
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


def _setup_differences(row: Mapping[str, Any], config: ScalingConfig) -> dict[str, tuple[Any, str]]:
    """The setup columns in which ``row`` differs from ``config``'s rows of its level: the model's
    only between model-level rows; a column the row does not record (an older CSV) is not compared."""
    setup = config.setup(row["level"])
    fields = [key for key in SETUP_FIELDS if row["level"] == "model" or key not in _MODEL_SETUP_FIELDS]
    return {
        key: (row[key], setup[key]) for key in fields if row[key] is not None and str(row[key]) != setup[key]
    }


def _check_resumable(rows: Iterable[Mapping[str, Any]], config: ScalingConfig, path: Path) -> None:
    for row in rows:
        differing = _setup_differences(row, config)
        if differing:
            described = ", ".join(
                f"{key}: {there} there, {here} here" for key, (there, here) in differing.items()
            )
            raise config_lib.ConfigError(
                f"{path} holds results of another setup ({described}); set resume=false to start over, "
                "or choose another out_dir"
            )


def _check_header(path: Path) -> None:
    """Refuse a CSV whose header lacks the columns that say which measurement a row is (a file
    that is not a sweep's): every row appended to it would lose them, and the sweep with them."""
    if not path.exists() or path.stat().st_size == 0:
        return
    missing = [key for key in (*_ID_FIELDS, "status") if key not in _header(path)]
    if missing:
        raise config_lib.ConfigError(
            f"{path} is not a scaling sweep's CSV: its header lacks {missing}; set resume=false to "
            "replace it, or choose another out_dir"
        )


def sweep_rows(config: ScalingConfig) -> list[dict[str, Any]]:
    """The rows of ``out_dir/scaling.csv`` that a sweep of ``config`` keeps: none with ``resume=false``.
    Raises ``ConfigError`` if they are of another setup."""
    if not config.resume:
        return []
    path = Path(config.out_dir) / "scaling.csv"
    _check_header(path)
    rows = read_rows(path)
    _check_resumable(rows, config, path)
    return rows


def make_out_dir(config: ScalingConfig) -> Path:
    """The run folder, created if needed; ``ConfigError`` naming ``out_dir`` if it cannot be."""
    out_dir = Path(config.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise config_lib.ConfigError(
            f"scaling config: out_dir={config.out_dir!r} cannot be created ({type(err).__name__}: {err})"
        ) from None
    return out_dir


def check_sweep(config: ScalingConfig) -> list[dict[str, Any]]:
    """What a sweep checks before it measures or changes anything: every entry's variant, the run
    folder, the setup of the CSV's rows. Returns the rows it keeps (``sweep_rows``); raises
    ``ConfigError``."""
    build_variants(config)
    make_out_dir(config)
    return sweep_rows(config)


def run_sweep(config: ScalingConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every pending point of the config (``pending``), appending rows to ``out_dir/scaling.csv``.

    Returns all rows of the CSV (earlier and new, other configs' included: ``current_rows`` selects
    this config's). Raises ``ConfigError`` before measuring anything if a variant entry is
    misconfigured, ``out_dir`` cannot be created or the CSV holds another setup.
    """
    from tqdm.auto import tqdm

    existing = check_sweep(config)
    variants = build_variants(config)
    config_lib.save_config(config, Path(config.out_dir) / "config.yaml")  # this sweep's, resolved
    csv_path = Path(config.out_dir) / "scaling.csv"
    if not config.resume:
        csv_path.unlink(missing_ok=True)
    repair_csv(csv_path)
    todo = pending(config, existing)
    for reason, count in redone(config, existing).items():
        print(f"scaling: measuring {count} row(s) of {csv_path} again: {reason}")
    again = {point.key() for point in todo}
    tracks: dict[tuple[str, str, str], _Track] = {}
    for row in sorted(current_rows(existing, config), key=lambda r: r["length"]):
        if _row_key(row) not in again:
            tracks.setdefault(_track(row), _Track()).record(row["length"], row["status"], row["time_s"])
    settings = config.settings() | machine_columns()
    bar = tqdm(todo, desc="scaling", unit="pt", disable=not progress)
    for point in bar:
        bar.set_postfix_str(f"{point.level} {point.entry.name} {point.pass_name} L={point.length}")
        track = tracks.setdefault(point.track, _Track())
        result = _measure_point(point, variants[point.entry.name], config, track)
        row = point.columns() | config.setup(point.level) | settings | result
        row["load_avg"] = os.getloadavg()[0]
        append_row(csv_path, row)
        track.record(point.length, row["status"], row.get("time_s"))
        if is_reported_failure(row):
            bar.write(
                f"{point.level} {point.entry.name} {point.pass_name} L={point.length}: "
                f"{row['status']} ({row['detail']})"
            )
    bar.close()
    return read_rows(csv_path)


def _measure_point(point: Point, variant: Variant, config: ScalingConfig, track: _Track) -> dict[str, Any]:
    if track.blocked_by is not None and track.blocked_by[1] < point.length:
        return _skipped(track.blocked_by)
    if point.above_max_length:
        return {"status": SKIPPED, "detail": f"above the entry's max_length={point.entry.max_length}"}
    if variant.max_len is not None and point.length > variant.max_len:
        return {
            "status": UNSUPPORTED,
            "detail": f"length {point.length} is above the variant's max_len={variant.max_len}",
        }
    if variant.min_len is not None and point.length < variant.min_len:
        return {
            "status": UNSUPPORTED,
            "detail": f"length {point.length} is below the variant's min_len={variant.min_len}",
        }
    try:
        step = _LEVEL_BUILDERS[point.level](variant, config, point.length, point.pass_name)
    except Exception as err:  # a failing point is a row, the sweep goes on
        return {"status": _failure_status(err), "detail": _short(err)}
    return measure(step, config, predict_time(track.times, point.length))


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fit:
    """``y ≈ exp(log_scale) · L ** exponent`` fitted by least squares on log-log axes.

    Attributes:
      exponent: the growth exponent p (1 linear, 2 quadratic).
      log_scale: the intercept c of ``log y = p log L + c``.
      lengths: the lengths the fit used.
      r2: coefficient of determination of the log-log fit.
    """

    exponent: float
    log_scale: float
    lengths: tuple[int, ...]
    r2: float

    def __call__(self, length: float) -> float:
        return math.exp(self.log_scale) * length**self.exponent


def fit_exponent(points: Mapping[int, float | None], min_length: int) -> Fit | None:
    """Fit the log-log slope over the points with ``length >= min_length``.

    If fewer than two such points exist (the long lengths failed), the two longest points are used;
    None with fewer than two positive points in all.
    """
    usable = {length: y for length, y in points.items() if y is not None and math.isfinite(y) and y > 0}
    chosen = sorted(length for length in usable if length >= min_length)
    if len(chosen) < 2:
        chosen = sorted(usable)[-2:]
    if len(chosen) < 2:
        return None
    x = np.log(np.asarray(chosen, np.float64))
    y = np.log(np.asarray([usable[length] for length in chosen], np.float64))
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    spread = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / spread if spread > 0 else 1.0
    return Fit(float(slope), float(intercept), tuple(chosen), r2)


def crossover(baseline: Mapping[int, float | None], other: Mapping[int, float | None]) -> int | None:
    """The shortest length from which ``other`` is below ``baseline`` at every longer length.

    Values: a measured figure; ``math.inf`` where the curve failed for its cost (timeout, over the
    memory budget, out of memory), so a variant that runs where the baseline failed wins there; None
    (or absent) where it did not run for another reason (unsupported, error, skipped), which is no
    win. Lengths where neither curve has a measured figure carry no information and are skipped.
    None if ``other`` does not win at the longest informative length.
    """
    informative = sorted(
        length
        for length in set(baseline) | set(other)
        if any(_is_measured(series.get(length)) for series in (baseline, other))
    )
    start = None
    for length in informative:
        base, value = baseline.get(length), other.get(length)
        wins = base is not None and _is_measured(value) and value < base
        if not wins:
            start = None
        elif start is None:
            start = length
    return start


def _is_measured(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Summary:
    """One curve's analysis.

    Attributes:
      level, name, pass_name: the curve.
      time_fit, memory_fit: log-log fits of wall time and memory (None with too few points).
      cpu_time_fit: the fit of the process's CPU time per call, which other processes competing
        for the cores do not inflate (a check on a shared machine's wall times).
      faster_from, smaller_from, wins_from: crossover lengths against the baseline in time, in
        memory, and in both (None: never, or this is the baseline).
    """

    level: str
    name: str
    pass_name: str
    time_fit: Fit | None
    memory_fit: Fit | None
    cpu_time_fit: Fit | None
    faster_from: int | None
    smaller_from: int | None
    wins_from: int | None


def _series(rows: Iterable[Mapping[str, Any]], column: str) -> dict[int, float]:
    """A curve's measured figures by length (the fits')."""
    return {row["length"]: row[column] for row in rows if row["status"] == OK and row[column] is not None}


def _versus(rows: Iterable[Mapping[str, Any]], column: str) -> dict[int, float]:
    """A curve's figures for ``crossover``: the measured ones, ``math.inf`` where it failed for its cost
    (timeout, over the memory budget, out of memory, and the longer lengths those skipped)."""
    failed = {row["length"]: math.inf for row in rows if row["status"] in _BLOCKING}
    return failed | _series(rows, column)


def summarize(rows: Sequence[Mapping[str, Any]], config: ScalingConfig) -> list[Summary]:
    """Exponents and crossovers of every curve of the config in ``rows`` (``current_rows``: other
    options under an entry's name, and other lengths, are left out)."""
    by_track: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in current_rows(rows, config):
        by_track.setdefault(_track(row), []).append(row)
    summaries = []
    for level in config.levels:
        for pass_name in config.passes:
            base_rows = by_track.get((level, config.baseline, pass_name), [])
            base_time, base_memory = _versus(base_rows, "time_s"), _versus(base_rows, "memory_bytes")
            for entry in config.variants:
                track_rows = by_track.get((level, entry.name, pass_name))
                if not track_rows:
                    continue
                times, memory = _series(track_rows, "time_s"), _series(track_rows, "memory_bytes")
                is_base = entry.name == config.baseline
                faster = None if is_base else crossover(base_time, _versus(track_rows, "time_s"))
                smaller = None if is_base else crossover(base_memory, _versus(track_rows, "memory_bytes"))
                both = None if faster is None or smaller is None else max(faster, smaller)
                summaries.append(
                    Summary(
                        level,
                        entry.name,
                        pass_name,
                        fit_exponent(times, config.fit_min_length),
                        fit_exponent(memory, config.fit_min_length),
                        fit_exponent(_series(track_rows, "cpu_time_s"), config.fit_min_length),
                        faster,
                        smaller,
                        both,
                    )
                )
    return summaries


# ---------------------------------------------------------------------------------------------
# Output: Markdown and plots
# ---------------------------------------------------------------------------------------------

_CELL_FOR_STATUS = {
    TIMEOUT: "timeout",
    OVER_MEMORY: "> budget",
    OOM: "OOM",
    UNSUPPORTED: "n/a",
    SKIPPED: "skipped",
    ERROR: "error",
}
_PASS_TITLES = {"forward": "forward", "forward_backward": "forward + backward"}


def _fmt_fit(fit: Fit | None) -> str:
    if fit is None:
        return "–"
    return f"{fit.exponent:.2f} ({fit.lengths[0]}–{fit.lengths[-1]})"


def _fmt_length(length: int | None) -> str:
    return "never" if length is None else str(length)


def _cell(row: Mapping[str, Any] | None, column: str, scale: float) -> str:
    if row is None:
        return ""
    if row["status"] != OK or row[column] is None:
        return _CELL_FOR_STATUS.get(row["status"], row["status"])
    return f"{row[column] / scale:.3g}"


def _length_table(
    rows: Sequence[Mapping[str, Any]], config: ScalingConfig, column: str, scale: float
) -> list[str]:
    lengths = sorted(config.lengths)
    index = {(row["name"], row["length"]): row for row in rows}
    lines = ["| variant | " + " | ".join(str(length) for length in lengths) + " |"]
    lines.append("|---|" + "---:|" * len(lengths))
    for entry in config.variants:
        cells = [_cell(index.get((entry.name, length)), column, scale) for length in lengths]
        lines.append(f"| {entry.name} | " + " | ".join(cells) + " |")
    return lines


def machine_description() -> str:
    """The backend, device kind, device count and CPU cores, for the header of results."""
    device = jax.devices()[0]
    return (
        f"{jax.default_backend()} backend, {jax.device_count()} × {device.device_kind}, "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}"
    )


def machine_columns() -> dict[str, Any]:
    """The columns that record the machine a row is measured on."""
    return {
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "machine": machine_description(),
        "cpu_cores": os.cpu_count(),
    }


def _row_machine(row: Mapping[str, Any]) -> str:
    """The machine a row was measured on, as recorded (less where its CSV predates ``machine``)."""
    if row["machine"]:
        return row["machine"]
    return (
        f"{row['backend']} backend, {row['device_kind']}, jax {row['jax_version']} "
        "(device count and CPU cores not recorded)"
    )


def _row_timing(row: Mapping[str, Any]) -> str:
    if row["max_repeats"] is None:
        return "warm-up calls, repeats and time budget not recorded"
    return (
        f"median of up to {row['max_repeats']:g} calls after {row['warmup']:g} warm-up call(s), "
        f"budget {row['time_budget_s']:g} s per call"
    )


def _row_memory_budget(row: Mapping[str, Any]) -> str:
    budget = row["memory_budget_gb"]
    return "budget not recorded" if budget is None else f"budget {budget:g} GiB"


def _recorded(rows: Sequence[Mapping[str, Any]], describe: Callable[[Mapping[str, Any]], str]) -> str:
    """What ``describe`` says of every row, if they agree; else each description with its row count."""
    counts: dict[str, int] = {}
    for text in map(describe, rows):
        counts[text] = counts.get(text, 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), "no rows")
    return "differs between rows: " + "; ".join(
        f"{text} ({n} row{'' if n == 1 else 's'})" for text, n in counts.items()
    )


def _timed_calls(rows: Sequence[Mapping[str, Any]]) -> str:
    """The range of the ``repeats`` column: the timed calls each median is of."""
    counts = sorted({int(row["repeats"]) for row in rows if row["repeats"] is not None})
    if not counts:
        return "none"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"


def load_note(lowest: float, highest: float, cores: int | None) -> str:
    """One sentence on the machine's load during a sweep (the sweep's own threads included);
    ``cores`` None where the rows do not record one core count."""
    if cores is None:
        return (
            f"Load average (1 min) during the sweep: {lowest:.1f} to {highest:.1f} (the rows do not "
            "record one core count to compare it with)."
        )
    note = f"Load average (1 min) during the sweep: {lowest:.1f} to {highest:.1f} on {cores} cores"
    if round(highest, 1) <= cores:  # judged as printed: 2.02 reads "2.0", the sweep's own threads
        return note + ", the sweep's own threads included: no other process competed for the cores."
    return (
        note + ". Above the core count, other processes competed for the cores: wall times are inflated "
        "and noisy, and the CPU-time exponents below are the steadier figure."
    )


def markdown_report(
    rows: Sequence[Mapping[str, Any]],
    summaries: Sequence[Summary],
    config: ScalingConfig,
    *,
    command: str = "",
) -> str:
    """``scaling.md``: setup, exponents and crossovers, then time and memory tables per length.

    The machine, time and memory settings are those recorded with ``rows`` (``read_rows``), which may
    have been measured by earlier commands than the one that writes the report.
    """
    kv = f", {config.kv_heads} key/value heads" if config.kv_heads != config.num_heads else ""
    lines = [
        "# Scaling: time and memory against sequence length",
        "",
        f"Machine: {_recorded(rows, _row_machine)}.",
        f"Setup: batch {config.batch}, {config.num_heads} heads{kv}, head dim {config.head_dim}, "
        f"{config.dtype}, {'causal' if config.causal else 'non-causal'} self-attention (T = S).",
        f"Time: {_recorded(rows, _row_timing)}; timed calls per measurement: {_timed_calls(rows)} "
        "(`repeats`). Memory: what the compiled step allocates per call (arguments + outputs + XLA "
        f"temporaries), {_recorded(rows, _row_memory_budget)}.",
    ]
    loaded = [row for row in rows if row["load_avg"] is not None]
    if loaded:
        loads = [row["load_avg"] for row in loaded]
        cores = {row["cpu_cores"] for row in loaded}
        single = None if len(cores) != 1 or None in cores else int(cores.pop())
        lines.append(load_note(min(loads), max(loads), single))
    if command:
        lines.append(f"Command: `{command}`")
    lines += [
        "",
        f"## Exponents and crossovers against `{config.baseline}`",
        "",
        f"Exponent p of `y ∝ L^p`, fitted on log-log axes over the lengths ≥ {config.fit_min_length} "
        "(the range in brackets). Crossover: the length from which the variant is faster (smaller, both) "
        f"than `{config.baseline}` at every longer measured length; a length where `{config.baseline}` "
        "failed for its cost (timeout, over the memory budget, out of memory) counts as a win, one where it "
        "did not run for another reason (unsupported, error, skipped) does not. The CPU-time exponent "
        "fits the CPU seconds this process spent per call, which other processes competing for the "
        "cores do not inflate; where it disagrees with the wall-time exponent, the machine was contended.",
        "",
        "| level | pass | variant | time exponent | memory exponent | CPU-time exponent | faster from | "
        "smaller from | faster and smaller from |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        is_base = s.name == config.baseline
        crossings = (
            ["(baseline)"] * 3
            if is_base
            else [_fmt_length(x) for x in (s.faster_from, s.smaller_from, s.wins_from)]
        )
        lines.append(
            f"| {s.level} | {_PASS_TITLES[s.pass_name]} | {s.name} | {_fmt_fit(s.time_fit)} | "
            f"{_fmt_fit(s.memory_fit)} | {_fmt_fit(s.cpu_time_fit)} | " + " | ".join(crossings) + " |"
        )
    for level in config.levels:
        for pass_name in config.passes:
            track_rows = [row for row in rows if row["level"] == level and row["pass"] == pass_name]
            title = f"{level}, {_PASS_TITLES[pass_name]}"
            lines += ["", f"## {title}: time per call (ms)", ""]
            lines += _length_table(track_rows, config, "time_s", 1e-3)
            lines += ["", f"## {title}: memory (MiB)", ""]
            lines += _length_table(track_rows, config, "memory_bytes", 2**20)
    failures = [row for row in rows if is_reported_failure(row)]
    if failures:
        lines += ["", "## Measurements that did not run to the end", ""]
        lines += [
            f"- {row['level']} {row['name']} {row['pass']} L={row['length']}: {row['status']}: "
            f"{row['detail']}"
            for row in failures
        ]
    lines += [
        "",
        "Cells: `timeout` over the time budget (measured or predicted), `> budget` over the memory "
        "budget (not run), `OOM` out of memory at run time, `n/a` unsupported length, `skipped` above the "
        "entry's `max_length`, `error` see above. "
        "All columns (FLOPs from XLA, from the jaxpr's matmuls and analytic, tokens/s, compile time) are in "
        "`scaling.csv`.",
    ]
    return "\n".join(lines) + "\n"


def plot_scaling(
    rows: Sequence[Mapping[str, Any]],
    summaries: Sequence[Summary],
    config: ScalingConfig,
    out_dir: str | os.PathLike,
) -> list[Path]:
    """``time_<level>.png`` and ``memory_<level>.png``: log-log curves, one line per variant and a
    panel per pass, with slope-1 and slope-2 guide lines; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = {(s.level, s.name, s.pass_name): s for s in summaries}
    machines = {_row_machine(row) for row in rows}
    machine = machines.pop() if len(machines) == 1 else "several machines, see scaling.md"
    written = []
    for level in config.levels:
        for column, title, label, scale, stem in (
            ("time_s", "time", "time per call (s)", 1.0, "time"),
            ("memory_bytes", "memory", "memory per call (MiB)", 2**20, "memory"),
        ):
            fig, axes = plt.subplots(
                1, len(config.passes), figsize=(6.5 * len(config.passes), 5), squeeze=False
            )
            for ax, pass_name in zip(axes[0], config.passes, strict=True):
                _plot_panel(ax, rows, fits, config, level, pass_name, column, scale)
                ax.set_title(f"{level}: {_PASS_TITLES[pass_name]}")
                ax.set_xlabel("sequence length L")
                ax.set_ylabel(label)
            fig.suptitle(f"{title} against sequence length ({machine})", fontsize=10)
            fig.tight_layout()
            path = Path(out_dir) / f"{stem}_{level}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _plot_panel(
    ax, rows, fits, config: ScalingConfig, level: str, pass_name: str, column: str, scale: float
) -> None:
    key = "time" if column == "time_s" else "memory"
    anchor = None
    for entry in config.variants:
        points = sorted(
            (row["length"], row[column] / scale)
            for row in rows
            if _track(row) == (level, entry.name, pass_name) and row["status"] == OK and row[column]
        )
        if not points:
            continue
        summary = fits.get((level, entry.name, pass_name))
        fit = None if summary is None else getattr(summary, f"{key}_fit")
        label = entry.name if fit is None else f"{entry.name} (p = {fit.exponent:.2f})"
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if entry.name == config.baseline or anchor is None:
            anchor = (xs[0], ys[0])
    if anchor is not None:
        lengths = np.asarray(sorted(config.lengths), np.float64)
        for slope, style in ((1, ":"), (2, "--")):
            ax.plot(
                lengths,
                anchor[1] * (lengths / anchor[0]) ** slope,
                style,
                color="gray",
                linewidth=1,
                label=f"slope {slope} (∝ L{'²' if slope == 2 else ''})",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def write_report(
    config: ScalingConfig, rows: Sequence[Mapping[str, Any]] | None = None, *, command: str = ""
) -> list[Path]:
    """Write ``scaling.md`` and the PNGs of ``config``'s rows (``current_rows``) next to ``scaling.csv``
    (read from there if ``rows`` is None)."""
    out_dir = Path(config.out_dir)
    rows = current_rows(read_rows(out_dir / "scaling.csv") if rows is None else rows, config)
    summaries = summarize(rows, config)
    md_path = out_dir / "scaling.md"
    md_path.write_text(markdown_report(rows, summaries, config, command=command))
    return [md_path, *plot_scaling(rows, summaries, config, out_dir)]
