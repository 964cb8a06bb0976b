"""The flash kernel on a GPU: correctness against the float64 oracle, then throughput against peers.

Run through ``bash benchmarks/gpu_check.sh`` (at most 5 minutes on an H100). Part 1 checks
``jattn.flash_attention`` against ``jattn.reference`` in bfloat16 and float32, forward and
gradients, causal and a sparse (BigBird) mask. Part 2 prints Markdown tables of TFLOP/s for jattn
flash, ``jax.nn.dot_product_attention`` (xla, cudnn) and JAX's Pallas kernel
(``jax.experimental.pallas.ops.gpu.attention.mha``) in the FlashAttention setup (16384 tokens per
batch, 16 heads, bfloat16), a sliding window of 1024 against dense causal at N = 16384, and the
forward+backward temporary memory from XLA's compiled memory analysis.

FLOPs as in the anchors file: forward = 4·B·heads·N²·D, halved when causal; forward+backward =
3.5 × forward. Time: median of repeats of back-to-back calls after warm-up, ``block_until_ready``.

``JATTN_GPU_CHECK_TINY=1``: the same script at tiny sizes in interpret mode on CPU (a smoke test).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from jattn import masks
from jattn.kernels import flash
from jattn.reference import attention_reference, attention_vjp_reference

TINY = os.environ.get("JATTN_GPU_CHECK_TINY") == "1"
TIME_BUDGET_S = float(os.environ.get("JATTN_GPU_CHECK_BUDGET_S", "270"))  # cells after this are skipped
_START = time.perf_counter()


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
    check_head_dim: int
    bigbird_block: int


GPU = Setup(16384, 16, (64, 128), (1024, 4096, 16384), 1024, 16384, 5, 10, 300, 64, 64)
CPU_TINY = Setup(64, 2, (16,), (32, 64), 16, 64, 1, 1, 40, 16, 16)


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


# ---------------------------------------------------------------------------------------------
# Part 1: correctness on the device
# ---------------------------------------------------------------------------------------------


def relative_error(got, expected) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


def _failure(error: Exception) -> str:
    """A table cell for a call that failed; the full message goes to stderr (one GPU run is all
    a session may get, so a failure must say enough to fix it without a second run)."""
    print(f"{type(error).__name__}: {str(error)[:2000]}", file=sys.stderr)
    return f"n/a ({type(error).__name__})"


def check_correctness(setup: Setup) -> bool:
    """Flash vs the float64 oracle; the bar is 1e-2 (bfloat16) and 1e-4 (float32)."""
    rng = np.random.default_rng(0)
    length, dim = setup.check_len, setup.check_head_dim
    cases = {"causal": masks.causal(), "bigbird": masks.bigbird(setup.bigbird_block, num_random=1)}
    print("## Correctness against the float64 oracle (relative max error)\n")
    print("| dtype | mask | out | dq | dk | dv | bar | ok |\n|---|---|---|---|---|---|---|---|")
    all_ok = True
    for dtype, bar in (("bfloat16", 1e-2), ("float32", 1e-4)):
        draw = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731, B023
        q, k, v = draw(2, length, 4, dim), draw(2, length, 2, dim), draw(2, length, 2, dim)
        d_out = draw(2, length, 4, dim)
        q64, k64, v64, do64 = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v, d_out))
        for name, mask in cases.items():
            attend = functools.partial(jattn.flash_attention, mask=mask)
            try:
                out, vjp = jax.vjp(attend, q, k, v)
                grads = vjp(d_out)
            except Exception as error:  # noqa: BLE001 - report it and go on to the other cells
                all_ok = False
                print(f"| {dtype} | {name} | {_failure(error)} | | | | {bar:.0e} | NO |")
                continue
            dense = mask.dense(length, length)
            errors = [relative_error(out, attention_reference(q64, k64, v64, mask=dense))]
            expected = attention_vjp_reference(q64, k64, v64, do64, mask=dense)
            errors += [relative_error(g, expected[n]) for g, n in zip(grads, "qkv", strict=True)]
            ok = max(errors) < bar
            all_ok &= ok
            cells = " | ".join(f"{e:.1e}" for e in errors)
            print(f"| {dtype} | {name} | {cells} | {bar:.0e} | {'yes' if ok else 'NO'} |")
    print()
    return all_ok


# ---------------------------------------------------------------------------------------------
# Part 2: throughput
# ---------------------------------------------------------------------------------------------


def _pallas_mha():
    """JAX's built-in Pallas Triton kernel, or None where it is missing (deprecated in 0.11)."""
    if _interpret():
        return None
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention
    except Exception as error:  # noqa: BLE001 - any import failure means "peer not available"
        print(f"(pallas mha unavailable: {type(error).__name__}: {error})", file=sys.stderr)
        return None
    sizes = pallas_attention.BlockSizes(
        block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64
    )
    return lambda q, k, v, causal: pallas_attention.mha(
        q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal, block_sizes=sizes
    )


def implementations() -> dict:
    """name -> attend(q, k, v, causal) for every peer available on this machine."""
    impls = {
        "jattn_flash": lambda q, k, v, causal: jattn.flash_attention(
            q, k, v, mask=masks.causal() if causal else None
        ),
        "jax_xla": lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"
        ),
    }
    if jax.default_backend() == "gpu":
        impls["jax_cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        )
    mha = _pallas_mha()
    if mha is not None:
        impls["pallas_triton"] = mha
    return impls


def flops(batch: int, heads: int, length: int, head_dim: int, causal: bool, backward: bool) -> float:
    forward = 4.0 * batch * heads * length * length * head_dim / (2 if causal else 1)
    return forward * (3.5 if backward else 1.0)


def _step(attend, backward: bool):
    if not backward:
        return jax.jit(attend)

    def loss(q, k, v):
        return attend(q, k, v).astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def time_call(fn, args, setup: Setup) -> float:
    """Median seconds per call over ``setup.repeats`` runs of ``setup.calls`` calls, after warm-up."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(setup.repeats):
        start = time.perf_counter()
        for _ in range(setup.calls):
            result = fn(*args)
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / setup.calls)
    return statistics.median(samples)


def _inputs(setup: Setup, length: int, head_dim: int):
    key = jax.random.key(length + head_dim)
    shape = (setup.tokens // length, length, setup.heads, head_dim)
    return tuple(jax.random.normal(k, shape, jnp.bfloat16) for k in jax.random.split(key, 3))


def _over_budget() -> bool:
    return time.perf_counter() - _START > TIME_BUDGET_S


def throughput_tables(setup: Setup) -> None:
    impls = implementations()
    for head_dim in setup.head_dims:
        header = " | ".join(f"N={n // 1024}k" if n >= 1024 else f"N={n}" for n in setup.lengths)
        title = f"head_dim {head_dim}, {setup.heads} heads, bfloat16, {setup.tokens} tokens per batch"
        print(f"## TFLOP/s, {title}\n")
        print(f"| implementation | pass | causal | {header} |\n|---|---|---|" + "---|" * len(setup.lengths))
        for name, attend in impls.items():
            for backward in (False, True):
                for causal in (False, True):
                    cells = []
                    for length in setup.lengths:
                        if _over_budget():
                            cells.append("skipped (time budget)")
                            continue
                        q, k, v = _inputs(setup, length, head_dim)
                        fn = _step(functools.partial(attend, causal=causal), backward)
                        try:
                            seconds = time_call(fn, (q, k, v), setup)
                        except Exception as error:  # noqa: BLE001 - a peer that cannot run a cell says why
                            cells.append(_failure(error))
                            continue
                        batch = setup.tokens // length
                        work = flops(batch, setup.heads, length, head_dim, causal, backward)
                        cells.append(f"{work / seconds / 1e12:.1f}")
                    pass_name = "fwd_bwd" if backward else "fwd"
                    print(f"| {name} | {pass_name} | {'yes' if causal else 'no'} | {' | '.join(cells)} |")
        print()


def sliding_window_vs_causal(setup: Setup) -> None:
    length, head_dim = setup.window_len, setup.head_dims[-1]
    q, k, v = _inputs(setup, length, head_dim)
    print(f"## Sliding window {setup.window} vs dense causal, flash, N={length}, head_dim {head_dim}\n")
    print("| pass | causal ms | window ms | speedup |\n|---|---|---|---|")
    for backward in (False, True):
        if _over_budget():
            print(f"| {'fwd_bwd' if backward else 'fwd'} | skipped (time budget) | | |")
            continue
        pass_name = "fwd_bwd" if backward else "fwd"
        try:
            steps = [
                _step(functools.partial(jattn.flash_attention, mask=mask), backward)
                for mask in (masks.causal(), masks.sliding_window(setup.window))
            ]
            times = [time_call(step, (q, k, v), setup) for step in steps]
        except Exception as error:  # noqa: BLE001
            print(f"| {pass_name} | {_failure(error)} | | |")
            continue
        print(f"| {pass_name} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} | {times[0] / times[1]:.1f}x |")
    print()


def temp_memory(setup: Setup) -> None:
    length, head_dim = setup.window_len, setup.head_dims[-1]
    q, k, v = _inputs(setup, length, head_dim)
    print(f"## Forward+backward temporary memory, N={length}, head_dim {head_dim}, causal\n")
    print("| implementation | temp MiB |\n|---|---|")
    for name, attend in implementations().items():
        try:
            compiled = _step(functools.partial(attend, causal=True), True).lower(q, k, v).compile()
            analysis = compiled.memory_analysis()
            cell = f"{analysis.temp_size_in_bytes / 2**20:.0f}" if analysis is not None else "n/a"
        except Exception as error:  # noqa: BLE001
            cell = _failure(error)
        print(f"| {name} | {cell} |")
    print()


def main() -> int:
    setup = CPU_TINY if TINY else GPU
    device = jax.devices()[0]
    print(f"# jattn flash check: {device.device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"tile table: {flash.device_target('triton')} (block_sizes.json)\n")
    if not TINY and jax.default_backend() != "gpu":
        print("no GPU: set JATTN_GPU_CHECK_TINY=1 for the CPU smoke test", file=sys.stderr)
        return 2
    correct = check_correctness(setup)
    throughput_tables(setup)
    sliding_window_vs_causal(setup)
    temp_memory(setup)
    print(f"total {time.perf_counter() - _START:.0f} s; correctness {'passed' if correct else 'FAILED'}")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
