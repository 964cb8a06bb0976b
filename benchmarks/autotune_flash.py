"""Sweep the flash kernel's tile sizes on a GPU and write the table the kernel reads.

    PYTHONPATH=src python3 benchmarks/autotune_flash.py   # rewrites src/jattn/kernels/block_sizes.json
    PYTHONPATH=src python3 benchmarks/autotune_flash.py --output /tmp/t.json

For each dtype and head dim it times causal forward+backward (16 heads, 16384 tokens at N = 4096,
bfloat16/float16/float32) for every candidate ``BlockSizes`` and keeps the fastest; candidates
that fail to compile (too much shared memory) are skipped. The TPU entries are kept as they are.
``JATTN_AUTOTUNE_TINY=1``: a two-candidate sweep at tiny sizes in interpret mode on CPU (smoke test).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from importlib import resources

import jax
import jax.numpy as jnp

from jattn import masks
from jattn.attention import make_problem
from jattn.kernels import flash

TINY = os.environ.get("JATTN_AUTOTUNE_TINY") == "1"
DTYPES = ("float32",) if TINY else ("bfloat16", "float16", "float32")
HEAD_DIMS = (16,) if TINY else (64, 128, 256)
LENGTH, TOKENS, HEADS = (32, 32, 1) if TINY else (4096, 16384, 16)


def candidates():
    """BlockSizes to try (powers of two; Triton launch settings)."""
    if TINY:
        return [flash.BlockSizes(16, 16), flash.BlockSizes(32, 16)]
    tiles = [(128, 128), (128, 64), (64, 64), (64, 32), (32, 32)]
    return [flash.BlockSizes(bq, bkv, w, s) for (bq, bkv), w, s in itertools.product(tiles, (4, 8), (2, 3))]


def seconds_per_step(sizes: flash.BlockSizes, dtype: str, head_dim: int) -> float:
    key = jax.random.key(head_dim)
    shape = (TOKENS // LENGTH, LENGTH, HEADS, head_dim)
    q, k, v = (jax.random.normal(k, shape, dtype) for k in jax.random.split(key, 3))
    platform = jax.default_backend()

    def loss(q, k, v):
        problem = make_problem(q, k, v, mask=masks.causal())
        out = flash.flash_problem(problem, platform=platform, interpret=platform == "cpu", sizes=sizes)
        return out.astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    samples = []
    for _ in range(1 if TINY else 5):
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def sweep() -> dict:
    """{dtype: {head_dim: fastest BlockSizes as a dict}} for the Triton lowering."""
    table: dict = {}
    for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
        timings = {}
        for sizes in candidates():
            try:
                timings[sizes] = seconds_per_step(sizes, dtype, head_dim)
            except Exception as error:  # noqa: BLE001 - a candidate that does not compile is skipped
                print(f"  {dtype} h={head_dim} {sizes}: {type(error).__name__}", file=sys.stderr)
        best = min(timings, key=timings.get)
        print(f"{dtype} head_dim={head_dim}: {best} ({timings[best] * 1e3:.2f} ms fwd+bwd)")
        table.setdefault(dtype, {})[str(head_dim)] = {
            "block_q": best.block_q,
            "block_kv": best.block_kv,
            "num_warps": best.num_warps,
            "num_stages": best.num_stages,
        }
    return table


def main() -> int:
    default = resources.files("jattn.kernels").joinpath("block_sizes.json")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(default), help="where to write the table")
    args = parser.parse_args()
    if not TINY and jax.default_backend() != "gpu":
        print("the sweep needs a GPU; JATTN_AUTOTUNE_TINY=1 runs the CPU smoke test", file=sys.stderr)
        return 2
    existing = json.loads(default.read_text())
    for dtype, by_dim in sweep().items():  # merge: dtypes and head dims not swept keep their entries
        existing["triton"].setdefault(dtype, {}).update(by_dim)
    existing["comment"] = (
        f"Tuned by benchmarks/autotune_flash.py on {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d')}."
    )
    with open(args.output, "w") as f:
        json.dump(existing, f, indent=2)
        f.write("\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
