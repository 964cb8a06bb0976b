"""Sweep the flash kernel's tile sizes on a GPU and write the table the kernel reads.

    PYTHONPATH=src python3 benchmarks/autotune_flash.py   # rewrites src/jattn/kernels/block_sizes.json
    PYTHONPATH=src python3 benchmarks/autotune_flash.py --output /tmp/t.json

For each dtype and head dim (16 heads, 16384 tokens at N = 4096, causal) it times the table's
current entry, then, for every tile shape, the forward under each launch setting (4 or 8 warps, 2
or 3 stages) and kv step (32, 64 or the whole tile), then forward+backward under each backward
candidate with that tile's best forward: 4 warps (2 stages) or 8 (2 or 3 stages), and steps of 32,
64 or the whole tile. The fastest forward+backward is kept, so the current entry stays unless a
candidate beats it. Four warps spill on sm_90 (``benchmarks/triton_static.py --sweep``), but spills
did not rank the kernels on an H200: its fastest head-dim-128 entry spilled 728 B a thread and beat
one spilling 524 B by 1.6x. A forward kv step of 64 on 128x128 tiles compiles as the 128x64 tile's
forward does (96 KiB of shared memory at head dim 128), the fastest forward there, while the
backward keeps the 128x128 schedule. Each time is the median of 5 runs of 10 back-to-back calls
(``gpu_bench.time_call``), as the GPU check times its cells. Candidates that fail to compile (too
much shared memory) are skipped. The entries go to the table of the GPU's architecture
(``flash.device_target``: sm90, sm80 or sm86). ``--dtypes`` and ``--head-dims`` narrow the sweep
(86 candidates a pair); entries not swept, other architectures' and the TPU's, are kept as they
are. Compiling is most of the time: one at a time, 76 candidates took 245 s on an H200 (3.1 s
each), so each batch (a tile's forward candidates, then its backward ones) is compiled on
``gpu_bench.COMPILE_THREADS`` threads before it is timed.
Every candidate's time (or why it failed) goes to stderr, and the table is written whenever a
candidate beats all before it (its source says the sweep has not finished) and again when the
pair is done, so a run cut short keeps the fastest candidate it timed. ``--budget-s`` tunes no new
pair once that many seconds have passed. The exit status is 1 if a requested pair got no entry.
``JATTN_AUTOTUNE_TINY=1``: a two-tile sweep at tiny sizes in interpret mode on CPU (smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import sys
import time

import jax

import block_table
import gpu_bench
from jattn import masks
from jattn.kernels import flash

TINY = os.environ.get("JATTN_AUTOTUNE_TINY") == "1"
KERNEL_DTYPES = ("bfloat16", "float16", "float32")
DTYPES = ("float32",) if TINY else KERNEL_DTYPES
HEAD_DIMS = (16,) if TINY else (64, 128, 256)
LENGTH, TOKENS, HEADS = (32, 32, 1) if TINY else (4096, 16384, 16)
# 64x32 lost at both head dims on the H200; the current entry is always timed, whatever its tile.
TILES = [(16, 16), (32, 16)] if TINY else [(128, 128), (128, 64), (64, 64)]
LAUNCH = [(4, 2)] if TINY else list(itertools.product((4, 8), (2, 3)))  # forward (warps, stages)
BACKWARD_LAUNCH = [(4, 2)] if TINY else [(4, 2), (8, 2), (8, 3)]
STEPS = (16,) if TINY else (32, 64)  # besides the whole tile


def steps_within(tile: int) -> list[int]:
    """The whole tile and each of ``STEPS`` smaller than it."""
    return sorted({tile, *(step for step in STEPS if step < tile)})


def forward_candidates(block_q: int, block_kv: int) -> list[flash.BlockSizes]:
    """The tile under each forward launch setting and kv step."""
    return [
        flash.BlockSizes(block_q, block_kv, w, s, forward_kv_step=kv)
        for (w, s), kv in itertools.product(LAUNCH, steps_within(block_kv))
    ]


def backward_candidates(forward: flash.BlockSizes) -> list[flash.BlockSizes]:
    """The tile's best forward with each backward launch setting and step (queries per dk/dv
    step, keys per dq step)."""
    q_steps, kv_steps = steps_within(forward.block_q), steps_within(forward.block_kv)
    return [
        dataclasses.replace(
            forward, backward_num_warps=w, backward_num_stages=s, backward_q_step=q, backward_kv_step=kv
        )
        for (w, s), q, kv in itertools.product(BACKWARD_LAUNCH, q_steps, kv_steps)
    ]


@functools.cache
def candidate_inputs(dtype: str, head_dim: int):
    """q, k, v and an output gradient of the swept shape."""
    key = jax.random.key(head_dim)
    shape = (TOKENS // LENGTH, LENGTH, HEADS, head_dim)
    return tuple(jax.random.normal(k, shape, dtype) for k in jax.random.split(key, 4))


def compile_candidate(sizes: flash.BlockSizes, inputs, gradient: bool):
    """The causal forward (or forward+backward) step with these sizes, compiled for ``inputs``."""
    step = gpu_bench.jitted_step(gpu_bench.flash_with_sizes(masks.causal(), sizes), gradient)
    return gpu_bench.lower_and_compile(step, inputs)


def seconds_per_call(step, inputs) -> float:
    """Median time of a compiled candidate."""
    repeats, calls = (1, 1) if TINY else (5, 10)
    return gpu_bench.time_call(step, inputs, repeats, calls)


def fastest(candidates, dtype: str, head_dim: int, gradient: bool, on_timed=None):
    """(best BlockSizes, its seconds) among those that compile and run, or (None, inf). All are
    compiled first, in parallel (``gpu_bench.compile_all``), then timed one by one, each passed to
    ``on_timed(sizes, seconds)`` as it is timed."""
    inputs = candidate_inputs(dtype, head_dim)
    compile_one = functools.partial(compile_candidate, inputs=inputs, gradient=gradient)
    steps = gpu_bench.compile_all({sizes: functools.partial(compile_one, sizes) for sizes in candidates})
    timings = {}
    pass_name = "fwd+bwd" if gradient else "fwd"
    for sizes, step in steps.items():
        label = f"  {dtype} h={head_dim} {pass_name} {sizes}"
        try:
            timings[sizes] = seconds_per_call(step.result(), inputs)
        except Exception as error:  # noqa: BLE001 - a candidate that does not compile is skipped
            print(f"{label}: skipped, {type(error).__name__}: {str(error)[:300]}", file=sys.stderr)
            continue
        print(f"{label}: {timings[sizes] * 1e3:.3f} ms", file=sys.stderr)
        if on_timed is not None:
            on_timed(sizes, timings[sizes])
    if not timings:
        return None, float("inf")
    best = min(timings, key=timings.get)
    return best, timings[best]


def current_entry(dtype: str, head_dim: int) -> flash.BlockSizes:
    """The attached GPU's table entry for this pair, on tiles no longer than the swept length."""
    entry = flash.lookup_block_sizes("triton", dtype, head_dim)
    return entry.with_tiles(min(entry.block_q, LENGTH), min(entry.block_kv, LENGTH))


def tune(dtype: str, head_dim: int, on_better=None) -> flash.BlockSizes | None:
    """The fastest tile and launch settings for causal forward+backward, the current entry included.
    ``on_better(sizes)`` is called, as soon as it is timed, with each candidate other than the
    current entry that is faster than all timed before it, so that a sweep cut short keeps it."""
    current = current_entry(dtype, head_dim)
    best: list = [None, float("inf")]  # the fastest forward+backward so far and its seconds

    def consider(sizes: flash.BlockSizes, seconds: float) -> None:
        if seconds < best[1]:
            best[:] = sizes, seconds
            if sizes != current and on_better is not None:
                on_better(sizes)

    fastest([current], dtype, head_dim, gradient=True, on_timed=consider)
    for bq, bkv in TILES:
        tile_forward, _ = fastest(forward_candidates(bq, bkv), dtype, head_dim, gradient=False)
        if tile_forward is not None:
            fastest(backward_candidates(tile_forward), dtype, head_dim, gradient=True, on_timed=consider)
    sizes, seconds = best
    if sizes is not None:
        print(f"{dtype} head_dim={head_dim}: {sizes} ({seconds * 1e3:.2f} ms fwd+bwd)")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=block_table.TABLE, help="where to write the table")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=KERNEL_DTYPES)
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument(
        "--budget-s", type=float, default=float("inf"), help="tune no new pair after this many seconds"
    )
    args = parser.parse_args()
    if not TINY and jax.default_backend() != "gpu":
        print("the sweep needs a GPU; JATTN_AUTOTUNE_TINY=1 runs the CPU smoke test", file=sys.stderr)
        return 2
    start = time.perf_counter()
    device, day = jax.devices()[0].device_kind, time.strftime("%Y-%m-%d")
    source = f"tuned by benchmarks/autotune_flash.py on {device}, jax {jax.__version__}, {day}"
    print(f"autotune_flash: {source}, compiling on {gpu_bench.COMPILE_THREADS} threads", file=sys.stderr)
    entries: dict = {}  # {dtype: {head_dim: BlockSizes fields}}, the pairs written so far
    sources: dict = {}  # {dtype: {head_dim: how each was chosen}}

    def write(dtype: str, head_dim: int, sizes: flash.BlockSizes, how: str) -> None:
        entries.setdefault(dtype, {})[str(head_dim)] = dataclasses.asdict(sizes)
        sources.setdefault(dtype, {})[str(head_dim)] = how
        block_table.write_entries("triton", flash.device_target("triton"), entries, sources, args.output)

    missing = []
    for dtype, head_dim in itertools.product(args.dtypes, args.head_dims):
        if time.perf_counter() - start > args.budget_s:
            print(f"{dtype} head_dim={head_dim}: not tuned, the {args.budget_s:.0f} s budget is spent")
            missing.append(f"{dtype}/{head_dim}")
            continue
        unfinished = f"{source}, the fastest so far of a sweep that did not finish"
        best = tune(dtype, head_dim, functools.partial(write, dtype, head_dim, how=unfinished))
        if best is None:
            print(f"{dtype} head_dim={head_dim}: no candidate ran (see stderr)")
            missing.append(f"{dtype}/{head_dim}")
            continue
        write(dtype, head_dim, best, source)
        print(f"wrote {args.output} ({time.perf_counter() - start:.0f} s)")
    if missing:
        print(f"no entry written for {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
