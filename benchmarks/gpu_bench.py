"""The flash kernel on a GPU: correctness against the float64 oracle, then throughput against peers.

Run through ``bash benchmarks/gpu_check.sh`` (at most 5.5 minutes on an H100), which runs the two
parts as two processes (``--part correctness``, then ``--part throughput``), so that a kernel that
brings its process down in part 1 still leaves part 2 its run. Part 1 checks
``jattn.flash_attention`` against ``jattn.reference`` in bfloat16 and float32, forward and
gradients, causal and a sparse (BigBird) mask, at head dims 64 and 128. Float32 is checked with
``jax.default_matmul_precision("highest")`` (IEEE float32 matmuls) against the 1e-4 bar, and once at
JAX's default precision, which on NVIDIA GPUs is TF32 for every JAX matmul, the kernel's included.
Part 2 first checks flash against cuDNN at the longest timed shape (N = 16384, head dim 128,
bfloat16, causal and not), forward and gradients with a random output gradient, within 1e-2: the
oracle runs at 300 tokens, this at the size the tables time. Every step is compiled once and shared
by the agreement check, the memory table and the TFLOP/s table. Each part compiles its steps on
``COMPILE_THREADS`` threads before it times any (``compile_all``): on an H200 on 2026-11-28,
compiled one at a time, the correctness part took 174 s and the throughput part ran out of its
budget before the XLA cells and the window diagnosis. Then, ordered so that what the bars
need comes first when time runs short: a sliding window of 1024 against dense causal at N = 16384,
the forward+backward temporary memory from XLA's compiled memory analysis (flash and the O(N)
peers), then TFLOP/s for jattn flash, JAX's Pallas kernel
(``jax.experimental.pallas.ops.gpu.attention.mha``), cuDNN and XLA (``jax.nn.dot_product_attention``)
in the FlashAttention setup (16384 tokens per batch, 16 heads, bfloat16), head dim 128 and the longest
sequences first, the ratios against Pallas and cuDNN with each bar of issue 3 marked, and last a
diagnosis of where the sliding window's time goes (no bar).

FLOPs as in the FlashAttention papers: forward = 4·B·heads·N²·D, halved when causal; forward+backward =
3.5 × forward. A forward+backward step returns the output and the gradients for an output
gradient drawn at random, as a training step uses both (returning only the gradients would let XLA
drop the forward's P·V from the dense peer). Time: median of repeats of back-to-back calls after
warm-up, ``block_until_ready``.

``JATTN_GPU_CHECK_TINY=1``: the same script at tiny sizes in interpret mode on CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from jattn import masks
from jattn.attention import make_problem
from jattn.kernels import flash, gpu
from jattn.reference import attention_reference, attention_vjp_reference

TINY = os.environ.get("JATTN_GPU_CHECK_TINY") == "1"
TIME_BUDGET_S = float(os.environ.get("JATTN_GPU_CHECK_BUDGET_S", "270"))  # cells after this are skipped
# Seconds since the epoch when gpu_check.sh started, so that both parts count against one budget.
_START = float(os.environ.get("JATTN_GPU_CHECK_START", time.time()))


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes of one run (the GPU run or the tiny CPU smoke test)."""

    tokens: int
    heads: int
    head_dims: tuple[int, ...]
    lengths: tuple[int, ...]
    window: int
    window_len: int
    repeats: int
    calls: int
    check_len: int
    check_head_dims: tuple[int, ...]
    bigbird_block: int
    bar_len: int  # the ratio bars hold from this length on


GPU = Setup(16384, 16, (64, 128), (1024, 4096, 16384), 1024, 16384, 5, 10, 300, (64, 128), 64, 4096)
CPU_TINY = Setup(64, 2, (16,), (32, 64), 16, 64, 1, 1, 40, (16,), 16, 64)
WINDOW_BAR = 6.0  # sliding window 1024 at least this much faster than dense causal
MEMORY_BAR_MIB = 256.0  # forward+backward temporaries of flash at N = 16384
AGREEMENT_BAR = 1e-2  # flash against cuDNN at N = 16384, both bfloat16


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


# ---------------------------------------------------------------------------------------------
# Part 1: correctness on the device
# ---------------------------------------------------------------------------------------------


def as_float64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def relative_error(got, expected) -> float:
    return float(np.abs(as_float64(got) - expected).max() / max(np.abs(expected).max(), 1e-30))


def _within(errors: list[float], bar: float) -> bool:
    """Every error below ``bar``; a NaN error fails (``NaN < bar`` is False, where ``max`` would drop it)."""
    return all(error < bar for error in errors)


def _failure(error: Exception) -> str:
    """A table cell for a call that failed; the traceback goes to stderr (one GPU run is all a
    session may get, so a failure must say enough to fix it without a second run). Compiler
    errors put the decisive line after pages of IR, so a long one keeps its start and its end."""
    text = "".join(traceback.format_exception(error))
    if len(text) > 6000:
        text = f"{text[:3000]}\n[... {len(text) - 6000} characters ...]\n{text[-3000:]}"
    print(text, file=sys.stderr)
    return f"n/a ({type(error).__name__})"


CHECKS = (  # (row label, dtype, matmul precision, bar)
    ("bfloat16", "bfloat16", None, 1e-2),
    ("float32", "float32", "highest", 1e-4),
    ("float32, default precision (TF32 on GPU)", "float32", None, 1e-2),
)


@dataclasses.dataclass(frozen=True)
class OracleCase:
    """One row of an oracle table: ``attend`` (flash unless given) on GQA inputs, 4 query heads
    over 2, ``check_len`` queries and ``extra_keys`` more keys, forward and gradients."""

    row: str  # the row's leading cells
    dtype: str
    head_dim: int
    mask: masks.Mask | None
    bar: float
    precision: str | None = None  # jax.default_matmul_precision while tracing; None: JAX's default
    attend: Callable = jattn.flash_attention
    extra_keys: int = 0
    counts: bool = True  # False: printed, but not part of the check's verdict


def _case_inputs(setup: Setup, rng, case: OracleCase):
    """q, k, v and an output gradient of the case, drawn from ``rng``."""
    q_len, kv_len = setup.check_len, setup.check_len + case.extra_keys
    return tuple(
        jnp.asarray(rng.normal(size=(2, length, heads, case.head_dim)), case.dtype)
        for length, heads in ((q_len, 4), (kv_len, 2), (kv_len, 2), (q_len, 4))
    )


def _lower_case(case: OracleCase, inputs):
    """The case's forward+backward step lowered under its matmul precision (a thread-local setting,
    so this may run on a compiling thread)."""
    step = jitted_step(functools.partial(case.attend, mask=case.mask), backward=True)
    with jax.default_matmul_precision(case.precision):
        return step.lower(*inputs)


def _compile_case(case: OracleCase, inputs):
    return _lower_case(case, inputs).compile()


def _oracle_errors(case: OracleCase, step, inputs) -> list[float]:
    """Relative errors of (out, dq, dk, dv) of the compiled ``step`` against the float64 oracle."""
    out, grads = step(*inputs)
    q64, k64, v64, do64 = (as_float64(x) for x in inputs)
    dense = None if case.mask is None else case.mask.dense(q64.shape[1], k64.shape[1])
    expected = attention_vjp_reference(q64, k64, v64, do64, mask=dense)
    errors = [relative_error(out, attention_reference(q64, k64, v64, mask=dense))]
    return errors + [relative_error(g, expected[n]) for g, n in zip(grads, "qkv", strict=True)]


def check_against_oracle(setup: Setup, rng, cases: list[OracleCase]) -> bool:
    """Print one row per case (all compiled first, in parallel: ``compile_all``); True if every
    row that ``counts`` is within its bar."""
    inputs = [_case_inputs(setup, rng, case) for case in cases]
    steps = compile_all(
        {n: functools.partial(_compile_case, case, inputs[n]) for n, case in enumerate(cases)}
    )
    all_ok = True
    for n, case in enumerate(cases):
        errors_of = lambda n=n, case=case: _oracle_errors(case, steps[n].result(), inputs[n])  # noqa: E731
        ok = _check_row(case.row, case.bar, errors_of)
        all_ok &= ok or not case.counts
    return all_ok


def _check_row(row: str, bar: float, errors_of) -> bool:
    """Print one row of relative errors (``errors_of()``, or why it failed) and whether they are
    within ``bar``; a failure is reported and the other rows still run."""
    try:
        errors = errors_of()
    except Exception as error:  # noqa: BLE001
        print(f"{row} {_failure(error)} | | | | {bar:.0e} | NO |")
        return False
    ok = _within(errors, bar)
    cells = " | ".join(f"{e:.1e}" for e in errors)
    print(f"{row} {cells} | {bar:.0e} | {'yes' if ok else 'NO'} |")
    return ok


def check_correctness(setup: Setup) -> bool:
    """Flash vs the float64 oracle; the bar is 1e-2 (bfloat16, TF32) and 1e-4 (IEEE float32)."""
    rng = np.random.default_rng(0)
    named_masks = {"causal": masks.causal(), "bigbird": masks.bigbird(setup.bigbird_block, num_random=1)}
    cases = [
        OracleCase(f"| {label} | {head_dim} | {name} |", dtype, head_dim, mask, bar, precision)
        for head_dim in setup.check_head_dims
        for label, dtype, precision, bar in CHECKS
        for name, mask in named_masks.items()
        # the default-precision row is informative: one mask is enough
        if not (precision is None and dtype == "float32" and name != "causal")
    ]
    print("## Correctness against the float64 oracle (relative max error)\n")
    print(
        "| dtype | head dim | mask | out | dq | dk | dv | bar | ok |\n|---|---|---|---|---|---|---|---|---|"
    )
    all_ok = check_against_oracle(setup, rng, cases)
    print()
    if "jax_cudnn" not in implementations():
        print("(no cuDNN on this machine: the check of what implementation=None sends it is skipped)\n")
        return all_ok
    return check_cudnn(setup, rng) and all_ok


def check_cudnn(setup: Setup, rng, implementation: str = "cudnn") -> bool:
    """``jattn.attention(implementation="cudnn")`` vs the oracle on what ``implementation=None``
    sends to cuDNN on NVIDIA GPUs, no mask and causal with T <= S (bfloat16, bar 1e-2), and, marked
    "not sent" and outside the verdict, on a causal sliding window: cuDNN ran one 1.7-1.9x as fast
    as flash on an H200, and None may send windows to it once these rows pass on a GPU. The tests
    run it with another ``implementation`` on CPU."""
    attend = functools.partial(jattn.attention, implementation=implementation)
    window = setup.check_len // 4
    local = masks.sliding_window(window)
    cases = [
        OracleCase(
            f"| {head_dim} | {name} | T + {extra_keys} |",
            "bfloat16",
            head_dim,
            mask,
            AGREEMENT_BAR,
            attend=attend,
            extra_keys=extra_keys,
            counts=sent,
        )
        for head_dim in setup.check_head_dims
        for name, mask, sent in (
            ("none", None, True),
            ("causal", masks.causal(), True),
            (f"window {window} (not sent)", local, False),
        )
        for extra_keys in (0, 100)
    ]
    print(f"## {implementation} through jattn.attention against the float64 oracle (S = T or T + 100)\n")
    print("| head dim | mask | keys | out | dq | dk | dv | bar | ok |\n|---|---|---|---|---|---|---|---|---|")
    all_ok = check_against_oracle(setup, rng, cases)
    print()
    return all_ok


# ---------------------------------------------------------------------------------------------
# Part 2: throughput
# ---------------------------------------------------------------------------------------------


# The tiles Pallas mha is timed with (its warps are its own defaults: 4 at head dim <= 64, else 8,
# forward; 4 backward, as these backward tiles are under 128x128); triton_static.py compiles the same.
PALLAS_MHA_BLOCKS = {
    "block_q": 128,
    "block_k": 64,
    "block_q_dkv": 64,
    "block_kv_dkv": 64,
    "block_q_dq": 64,
    "block_kv_dq": 64,
}


def _pallas_mha():
    """JAX's built-in Pallas Triton kernel, or None where it is missing (deprecated in 0.11)."""
    if _interpret():
        return None
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention
    except Exception as error:  # noqa: BLE001 - any import failure means "peer not available"
        print(f"(pallas mha unavailable: {type(error).__name__}: {error})", file=sys.stderr)
        return None
    sizes = pallas_attention.BlockSizes(**PALLAS_MHA_BLOCKS)
    return lambda q, k, v, causal: pallas_attention.mha(
        q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal, block_sizes=sizes
    )


def implementations() -> dict:
    """name -> attend(q, k, v, causal) for every peer available on this machine, in the order they
    are measured: jattn flash (the one whose numbers are new) first, then the peers the bars compare
    it with, and XLA (no bar) last."""
    impls = {
        "jattn_flash": lambda q, k, v, causal: jattn.flash_attention(
            q, k, v, mask=masks.causal() if causal else None
        )
    }
    mha = _pallas_mha()
    if mha is not None:
        impls["pallas_triton"] = mha
    if jax.default_backend() == "gpu":
        impls["jax_cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        )
    impls["jax_xla"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="xla"
    )
    return impls


def flops(batch: int, heads: int, length: int, head_dim: int, causal: bool, backward: bool) -> float:
    forward = 4.0 * batch * heads * length * length * head_dim / (2 if causal else 1)
    return forward * (3.5 if backward else 1.0)


def jitted_step(attend, backward: bool):
    """``(q, k, v, d_out) -> out`` or, with ``backward``, ``-> (out, (dq, dk, dv))`` for the output
    gradient ``d_out`` (unused by the forward step, so that every step takes the same inputs)."""
    if not backward:
        return jax.jit(lambda q, k, v, d_out: attend(q, k, v))

    def forward_backward(q, k, v, d_out):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(d_out)

    return jax.jit(forward_backward)


# the cores this process may use (a container's share, not the host's), at most 16 compiles at once
COMPILE_THREADS = int(os.environ.get("JATTN_COMPILE_THREADS", min(16, len(os.sched_getaffinity(0)))))


def compile_all(jobs: dict) -> dict[Any, Future]:
    """Run ``{key: job}`` (each job lowers and compiles one step) on ``COMPILE_THREADS`` threads;
    ``{key: future}``, whose ``result()`` is the compiled step or raises the job's error.

    Compiling dominates these scripts: a flash candidate took 3.1 s on an H200, of which the
    Python lowering (which holds the GIL) is about 0.2 s and XLA's Triton and PTX compilation
    (which does not) the rest. Everything is compiled before anything is timed, so no timing
    shares the machine with a compile. A job that fails on a thread runs again in the calling
    thread, so that what a failure reports is the compiler's verdict (too much shared memory), not
    an effect of compiling in parallel. ``JATTN_COMPILE_THREADS=1`` compiles in the calling thread.
    """
    if COMPILE_THREADS <= 1:
        return {key: _run_now(job) for key, job in jobs.items()}
    with ThreadPoolExecutor(COMPILE_THREADS) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
    return {key: _run_now(jobs[key]) if future.exception() else future for key, future in futures.items()}


def _run_now(job) -> Future:
    future: Future = Future()
    try:
        future.set_result(job())
    except Exception as error:  # noqa: BLE001 - kept for the caller, as a pool's future keeps it
        future.set_exception(error)
    return future


def flash_with_sizes(mask, sizes: flash.BlockSizes):
    """``attend(q, k, v)`` by the flash kernel on these tile settings, whatever the table says (the
    autotuner's candidates, the window diagnosis's variants)."""
    platform = jax.default_backend()

    def attend(q, k, v):
        problem = make_problem(q, k, v, mask=mask)
        return flash.flash_problem(problem, platform=platform, interpret=platform == "cpu", sizes=sizes)

    return attend


@functools.cache
def _inputs(setup: Setup, length: int, head_dim: int):
    """q, k, v and an output gradient, [tokens / length, length, heads, head_dim] bfloat16."""
    key = jax.random.key(length + head_dim)
    shape = (setup.tokens // length, length, setup.heads, head_dim)
    return tuple(jax.random.normal(k, shape, jnp.bfloat16) for k in jax.random.split(key, 4))


def lower_and_compile(step, inputs):
    return step.lower(*inputs).compile()


def compile_passes(attends: dict, inputs) -> dict[tuple, Future]:
    """``{(key, backward): future}`` of the forward and forward+backward steps of each
    ``attends[key]`` on ``inputs``, compiled together (``compile_all``)."""
    return compile_all(
        {
            (key, backward): functools.partial(lower_and_compile, jitted_step(attend, backward), inputs)
            for key, attend in attends.items()
            for backward, _ in PASSES
        }
    )


# (setup, name, causal, backward, length, head_dim) -> the future of the compiled step
_STEPS: dict[tuple, Future] = {}


def precompile_steps(setup: Setup, cells) -> None:
    """Compile, in parallel (``compile_all``), the steps of the cells ``(name, causal, backward,
    length, head_dim)`` not compiled yet: the agreement check, the sliding-window comparison, the
    memory table and the throughput table share them (a jitted function called after
    ``.lower().compile()`` would compile again)."""
    missing = [cell for cell in cells if (setup, *cell) not in _STEPS]
    if not missing:
        return
    impls = implementations()
    jobs = {}
    for cell in missing:
        name, causal, backward, length, head_dim = cell
        step = jitted_step(functools.partial(impls[name], causal=causal), backward)
        inputs = _inputs(setup, length, head_dim)  # drawn here, not in the compiling threads
        jobs[(setup, *cell)] = functools.partial(lower_and_compile, step, inputs)
    _STEPS.update(compile_all(jobs))


def compiled_step(setup: Setup, name: str, causal: bool, backward: bool, length: int, head_dim: int):
    """One implementation's step compiled once for one shape (raises what its compile raised)."""
    cell = (name, causal, backward, length, head_dim)
    precompile_steps(setup, [cell])
    return _STEPS[(setup, *cell)].result()


def agreement_at_scale(setup: Setup) -> bool:
    """Flash against cuDNN (XLA without a GPU) at the longest timed shape, causal and not, forward
    and gradients: the oracle check runs at ``check_len`` tokens, this one at the size the tables
    time."""
    length, head_dim = setup.window_len, max(setup.head_dims)
    peer = "jax_cudnn" if "jax_cudnn" in implementations() else "jax_xla"
    inputs = _inputs(setup, length, head_dim)
    title = f"N={length}, head_dim {head_dim}, bfloat16"
    print(f"## Flash against {peer} at {title} (relative max difference)\n")
    print("| pass | causal | out | dq | dk | dv | bar | ok |\n|---|---|---|---|---|---|---|---|")
    all_ok = True
    for causal in (True, False):
        for backward, pass_name in PASSES:
            row = f"| {pass_name} | {'yes' if causal else 'no'} |"
            try:
                ours, theirs = (
                    jax.tree.leaves(compiled_step(setup, name, causal, backward, length, head_dim)(*inputs))
                    for name in ("jattn_flash", peer)
                )
            except Exception as error:  # noqa: BLE001
                all_ok = False
                print(f"{row} {_failure(error)} | | | | {AGREEMENT_BAR:.0e} | NO |")
                continue
            errors = [relative_error(a, as_float64(b)) for a, b in zip(ours, theirs, strict=True)]
            ok = _within(errors, AGREEMENT_BAR)
            all_ok &= ok
            cells = " | ".join([f"{e:.1e}" for e in errors] + [""] * (4 - len(errors)))  # fwd: out only
            print(f"{row} {cells} | {AGREEMENT_BAR:.0e} | {'yes' if ok else 'NO'} |")
    print()
    return all_ok


def time_call(fn, args, repeats: int, calls: int) -> float:
    """Median seconds per call over ``repeats`` runs of ``calls`` back-to-back calls, after two
    warm-up calls (``autotune_flash.py`` times its candidates with this too)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            result = fn(*args)
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def _over_budget() -> bool:
    return time.time() - _START > TIME_BUDGET_S


PASSES = ((False, "fwd"), (True, "fwd_bwd"))


def throughput_cells(setup: Setup):
    """``(name, head_dim, backward, pass_name, causal, length)`` of every throughput cell, the cells
    the bars need first: flash before its peers, head dim 128 before 64, and the longest sequences
    first (the ratio bars hold from ``bar_len`` on)."""
    for name in implementations():
        for head_dim in sorted(setup.head_dims, reverse=True):
            for backward, pass_name in PASSES:
                for causal in (False, True):
                    for length in sorted(setup.lengths, reverse=True):
                        yield name, head_dim, backward, pass_name, causal, length


def precompile_throughput(setup: Setup, names) -> None:
    """Compile at once every throughput step of the implementations ``names`` (they include the
    agreement check's and the memory table's)."""
    cells = [cell for cell in throughput_cells(setup) if cell[0] in names]
    precompile_steps(setup, [(name, causal, backward, n, h) for name, h, backward, _, causal, n in cells])


def measure_throughput(setup: Setup) -> dict:
    """Seconds per call (or a failure note) for every (implementation, head dim, pass, causal, N),
    in the order of ``throughput_cells``."""
    results = {}
    compiled: set[str] = set()
    for name, head_dim, backward, pass_name, causal, length in throughput_cells(setup):
        cell = (name, head_dim, pass_name, causal, length)
        if _over_budget():
            results[cell] = "skipped (time budget)"
            continue
        if name not in compiled:  # XLA's steps, which no bar needs, once they are reached
            precompile_throughput(setup, [name])
            compiled.add(name)
        try:
            step = compiled_step(setup, name, causal, backward, length, head_dim)
            results[cell] = time_call(step, _inputs(setup, length, head_dim), setup.repeats, setup.calls)
        except Exception as error:  # noqa: BLE001 - a peer that cannot run a cell says why
            results[cell] = _failure(error)
        # The tables print at the end: if the run is cut short, these lines remain.
        print(f"measured {_cell_summary(setup, cell, results[cell])}", file=sys.stderr)
    return results


def _cell_summary(setup: Setup, cell: tuple, seconds) -> str:
    """One measured cell as a line a person can read and paste: its setting, ms and TFLOP/s."""
    name, head_dim, pass_name, causal, length = cell
    where = (
        f"{name} head_dim={head_dim} {pass_name} causal={'yes' if causal else 'no'} {_length_label(length)}"
    )
    if isinstance(seconds, str):
        return f"{where}: {seconds}"
    return f"{where}: {seconds * 1e3:.3f} ms, {_tflops(setup, cell, seconds):.1f} TFLOP/s"


def _tflops(setup: Setup, cell: tuple, seconds: float) -> float:
    _, head_dim, pass_name, causal, length = cell
    work = flops(setup.tokens // length, setup.heads, length, head_dim, causal, pass_name == "fwd_bwd")
    return work / seconds / 1e12


def _length_label(length: int) -> str:
    return f"N={length // 1024}k" if length >= 1024 else f"N={length}"


def print_throughput(setup: Setup, results: dict) -> None:
    names = list(dict.fromkeys(cell[0] for cell in results))
    header = " | ".join(_length_label(n) for n in setup.lengths)
    for head_dim in setup.head_dims:
        title = f"head_dim {head_dim}, {setup.heads} heads, bfloat16, {setup.tokens} tokens per batch"
        print(f"## TFLOP/s, {title}\n")
        print(f"| implementation | pass | causal | {header} |\n|---|---|---|" + "---|" * len(setup.lengths))
        for name in names:
            for _, pass_name in PASSES:
                for causal in (False, True):
                    cells = []
                    for length in setup.lengths:
                        cell = (name, head_dim, pass_name, causal, length)
                        seconds = results[cell]
                        cells.append(
                            seconds if isinstance(seconds, str) else f"{_tflops(setup, cell, seconds):.1f}"
                        )
                    print(f"| {name} | {pass_name} | {'yes' if causal else 'no'} | {' | '.join(cells)} |")
        print()


def print_ratios(setup: Setup, results: dict) -> None:
    """jattn flash's speed against Pallas mha (bar: >= 1.0x from ``bar_len`` on) and cuDNN."""
    peers = [peer for peer in ("pallas_triton", "jax_cudnn") if any(cell[0] == peer for cell in results)]
    if not peers:
        print("(no peer to compare with on this machine)\n")
        return
    lengths = [n for n in setup.lengths if n >= setup.bar_len]
    print(f"## jattn flash speed / peer speed (Pallas bar: >= 1.0x for N >= {setup.bar_len})\n")
    header = " | ".join(f"{_length_label(n)} / {peer}" for peer in peers for n in lengths)
    print(f"| head dim | pass | causal | {header} |\n|---|---|---|" + "---|" * (len(peers) * len(lengths)))
    for head_dim in setup.head_dims:
        for _, pass_name in PASSES:
            for causal in (False, True):
                cells = []
                for peer in peers:
                    for length in lengths:
                        ours = results[("jattn_flash", head_dim, pass_name, causal, length)]
                        theirs = results[(peer, head_dim, pass_name, causal, length)]
                        if isinstance(ours, str) or isinstance(theirs, str):
                            cells.append("n/a")
                            continue
                        ratio = theirs / ours
                        mark = (
                            (" (bar met)" if ratio >= 1.0 else " (BAR MISSED)")
                            if peer == "pallas_triton"
                            else ""
                        )
                        cells.append(f"{ratio:.2f}x{mark}")
                print(f"| {head_dim} | {pass_name} | {'yes' if causal else 'no'} | {' | '.join(cells)} |")
    print()


def sliding_window_vs_causal(setup: Setup) -> None:
    """Flash with a causal sliding window against flash dense causal (the bar), and cuDNN's own
    causal window beside them where there is a GPU: ``implementation=None`` sends windows to flash
    until a run shows cuDNN's faster."""
    length, head_dim = setup.window_len, max(setup.head_dims)
    inputs = _inputs(setup, length, head_dim)
    mask = masks.sliding_window(setup.window)
    peer = "jax_cudnn" in implementations()
    print(f"## Sliding window {setup.window} vs dense causal, flash, N={length}, head_dim {head_dim}\n")
    print(
        f"| pass | causal ms | window ms | speedup (bar: >= {WINDOW_BAR:.0f}x) | cuDNN window ms |\n"
        "|---|---|---|---|---|"
    )
    attends = {"flash": functools.partial(jattn.flash_attention, mask=mask)}
    if peer:
        attends["cudnn"] = functools.partial(jattn.attention, mask=mask, implementation="cudnn")
    window_steps = compile_passes(attends, inputs)
    for backward, pass_name in PASSES:
        try:
            steps = [
                compiled_step(setup, "jattn_flash", True, backward, length, head_dim),
                window_steps[("flash", backward)].result(),
            ]
            times = [time_call(step, inputs, setup.repeats, setup.calls) for step in steps]
        except Exception as error:  # noqa: BLE001
            print(f"| {pass_name} | {_failure(error)} | | | |")
            continue
        speedup = times[0] / times[1]
        verdict = "met" if speedup >= WINDOW_BAR else "MISSED"
        cudnn_cell = "n/a"
        if peer:
            try:
                step = window_steps[("cudnn", backward)].result()
                seconds = time_call(step, inputs, setup.repeats, setup.calls)
                cudnn_cell = f"{seconds * 1e3:.2f}"
            except Exception as error:  # noqa: BLE001
                cudnn_cell = _failure(error)
        print(
            f"| {pass_name} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} | {speedup:.1f}x ({verdict}) "
            f"| {cudnn_cell} |"
        )
    print()


def temp_memory(setup: Setup) -> None:
    """XLA's temporary memory of the causal forward+backward step at N = ``window_len``, for flash
    and the O(N) peers (XLA's dense step would cost a compile of its N×N scores before any TFLOP/s
    cell; ``../shared/anchors`` has it at 40960 MiB)."""
    length, head_dim = setup.window_len, max(setup.head_dims)
    print(f"## Forward+backward temporary memory, N={length}, head_dim {head_dim}, causal\n")
    print(f"| implementation | temp MiB (flash bar: <= {MEMORY_BAR_MIB:.0f}) |\n|---|---|")
    for name in implementations():
        if name == "jax_xla":
            continue
        try:
            analysis = compiled_step(setup, name, True, True, length, head_dim).memory_analysis()
            mib = analysis.temp_size_in_bytes / 2**20 if analysis is not None else None
            cell = "n/a" if mib is None else f"{mib:.0f}"
            if mib is not None and name == "jattn_flash":
                cell += " (met)" if mib <= MEMORY_BAR_MIB else " (MISSED)"
        except Exception as error:  # noqa: BLE001
            cell = _failure(error)
        print(f"| {name} | {cell} |")
    print()


def window_variants(setup: Setup, inputs) -> list[tuple[str, masks.Mask, flash.BlockSizes]]:
    """(label, mask, tile settings) of the window diagnosis: dense causal and the window on the
    table's tiles, the window on block-aligned edges, and the window on other tile settings."""
    q = inputs[0]
    window = masks.sliding_window(setup.window)
    lowering = flash.lowering_for(jax.default_backend())
    table = flash.choose_block_sizes(lowering, make_problem(q, q, q, mask=window))
    block = max(table.block_q, table.block_kv)
    aligned = masks.causal() & masks.BlockWindow(block, setup.window // block)
    variants = [
        ("dense causal", masks.causal(), table),
        ("sliding window", window, table),
        (f"causal ∧ BlockWindow({block}, {setup.window // block})", aligned, table),
    ]
    # the forward's other shape: whole tiles where the table steps through them, else half steps
    other_step = table.block_kv if table.forward_kv_step < table.block_kv else table.block_kv // 2
    if other_step >= gpu.MIN_BLOCK:
        step = dataclasses.replace(table, forward_kv_step=other_step)
        variants.append((f"sliding window, forward kv step {other_step}", window, step))
    half_q, half_kv = table.block_q // 2, table.block_kv // 2
    if min(half_q, half_kv) >= gpu.MIN_BLOCK:
        half_tiles = table.with_tiles(half_q, half_kv)
        variants.append((f"sliding window, {half_q}x{half_kv} tiles", window, half_tiles))
    # A padding mask of the full length changes no tile, but the kernels cannot tell that it
    # leaves no row unattended, so they zero the unattended rows of masked tiles as before 2026-11-28.
    full_length = masks.padding(np.full((q.shape[0],), q.shape[1]))
    for label, mask in (("dense causal", masks.causal()), ("sliding window", window)):
        variants.append((f"{label} ∧ padding(N): rows zeroed", mask & full_length, table))
    return variants


def window_diagnosis(setup: Setup) -> None:
    """Where the sliding window's time goes (no bar; it picks the next change to the kernel). The
    window lists 7.4x fewer tiles than dense causal at N = 16384 but ran only 5.0x faster (H200):
    either its masked tiles cost more (it has two masked tiles a row, causal one), or what a
    program pays once (loading q, filling the pipeline, the epilogue) weighs more over 9 tiles than
    over 64. The block-aligned window lists the same tiles with half as many masked; the forward kv
    step changes the shared memory a program takes (at half a tile two may share a multiprocessor
    and hide each other's fixed costs); half tiles halve what each masked tile wastes; the last two
    rows put back the zeroing of unattended rows, which these masks no longer need (the
    "zeroes" column says which rows zero: the block-aligned twin does, as the kernels cannot tell
    that an intersection of masks attends every row, so it compares with the padded window). "Tile cost"
    is time per listed query-key pair of tiles (so tiles of any size compare) relative to dense
    causal's."""
    length, head_dim = setup.window_len, max(setup.head_dims)
    print(f"## Where the window's time goes, flash, N={length}, head_dim {head_dim}\n")
    if _over_budget():
        print("(skipped: time budget)\n")
        return
    inputs = _inputs(setup, length, head_dim)
    try:
        variants = window_variants(setup, inputs)
        layouts = [mask.blocks(length, length, sizes.block_q, sizes.block_kv) for _, mask, sizes in variants]
    except Exception as error:  # noqa: BLE001 - the diagnosis must not cost the run its last lines
        print(f"(not run: {_failure(error)})\n")
        return
    print(
        "| variant | tiles | masked | zeroes | fwd ms | fwd speedup | fwd tile cost | fwd_bwd ms "
        "| fwd_bwd speedup | fwd_bwd tile cost |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    steps = compile_passes(
        {index: flash_with_sizes(mask, sizes) for index, (_, mask, sizes) in enumerate(variants)}, inputs
    )
    dense: dict[str, tuple[float, int]] = {}  # pass -> (seconds, listed pairs) of dense causal
    for index, ((label, mask, sizes), layout) in enumerate(zip(variants, layouts, strict=True)):
        tiles, masked = int((layout != masks.EMPTY).sum()), int((layout == masks.PARTIAL).sum())
        zeroes = "no" if mask._attends_every_row(length, length) else "yes"
        pairs = tiles * sizes.block_q * sizes.block_kv
        cells = []
        for backward, pass_name in PASSES:
            if _over_budget():
                cells += ["skipped (time budget)", "", ""]
                continue
            try:
                seconds = time_call(steps[(index, backward)].result(), inputs, setup.repeats, setup.calls)
            except Exception as error:  # noqa: BLE001
                cells += [_failure(error), "", ""]
                continue
            if index == 0:
                dense[pass_name] = (seconds, pairs)
            if pass_name not in dense:
                cells += [f"{seconds * 1e3:.3f}", "n/a", "n/a"]
                continue
            dense_seconds, dense_pairs = dense[pass_name]
            tile_cost = (seconds / pairs) / (dense_seconds / dense_pairs)
            cells += [f"{seconds * 1e3:.3f}", f"{dense_seconds / seconds:.2f}x", f"{tile_cost:.2f}"]
        print(f"| {label} | {tiles} | {masked} | {zeroes} | {' | '.join(cells)} |")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("correctness", "throughput", "all"), default="all")
    part = parser.parse_args().part
    setup = CPU_TINY if TINY else GPU
    if part != "throughput":
        device, day = jax.devices()[0].device_kind, time.strftime("%Y-%m-%d")
        print(f"# jattn flash check: {device}, jax {jax.__version__}, {day}")
        print(f"tile table: {flash.device_target('triton')} (block_sizes.json)\n")
    if not TINY and jax.default_backend() != "gpu":
        print("no GPU: set JATTN_GPU_CHECK_TINY=1 for the CPU smoke test", file=sys.stderr)
        return 2
    correct = True
    if part != "throughput":
        correct &= check_correctness(setup)
    if part != "correctness":
        precompile_throughput(setup, [name for name in implementations() if name != "jax_xla"])
        correct &= agreement_at_scale(setup)
        sliding_window_vs_causal(setup)
        temp_memory(setup)
        results = measure_throughput(setup)
        print_throughput(setup, results)
        print_ratios(setup, results)
        window_diagnosis(setup)
    verdict = "passed" if correct else "FAILED"
    print(f"({part} part done {time.time() - _START:.0f} s after the start; correctness {verdict})\n")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
