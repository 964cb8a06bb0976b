"""CPU benchmark of the core implementations against jax.nn.dot_product_attention (`make bench`).

Ratios are what count here: every row is measured in the same run as its peer. Prints a Markdown
table; `--out FILE` also writes it.

    python benchmarks/cpu_bench.py [--repeats 5] [--out benchmarks/cpu_bench.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import jattn
from jattn import masks


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_and_backward(attend):
    """jit(attend) and jit(grad of sum(attend)) for q, k, v."""
    forward = jax.jit(attend)
    backward = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2)))
    return forward, backward


def temp_mib(fn, *args) -> float:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def inputs(length: int, heads: int = 8, head_dim: int = 64):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(key, (1, length, heads, head_dim), jnp.float32) for key in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    peer = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")  # noqa: E731
    ours = lambda q, k, v: jattn.attention(q, k, v, implementation="xla")  # noqa: E731
    rows = [
        "| comparison | T = S | pass | ours (ms) | peer (ms) | ours / peer | temp memory ours / peer (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]

    def compare(label, ours_fn, peer_fn, length):
        x = inputs(length)
        for pass_name, ours_pass, peer_pass in zip(
            ("fwd", "fwd+bwd"), forward_and_backward(ours_fn), forward_and_backward(peer_fn), strict=True
        ):
            t_ours = median_seconds(ours_pass, *x, repeats=args.repeats)
            t_peer = median_seconds(peer_pass, *x, repeats=args.repeats)
            mem = f"{temp_mib(ours_pass, *x):.0f} / {temp_mib(peer_pass, *x):.0f}"
            rows.append(
                f"| {label} | {length} | {pass_name} | {1e3 * t_ours:.1f} | {1e3 * t_peer:.1f} | "
                f"{t_ours / t_peer:.2f} | {mem} |"
            )
            print(rows[-1], flush=True)

    for length in (1024, 4096):
        compare('"xla" vs jax.nn (xla)', ours, peer, length)
    causal = masks.causal()
    chunked_causal = lambda q, k, v: jattn.attention(q, k, v, mask=causal, implementation="chunked")  # noqa: E731
    xla_causal = lambda q, k, v: jattn.attention(q, k, v, mask=causal, implementation="xla")  # noqa: E731
    compare('causal "chunked" vs causal "xla"', chunked_causal, xla_causal, 8192)

    header = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {jax.device_count()} JAX device(s), "
        f"jax {jax.__version__}; B=1, N=8, H=64, float32; median of {args.repeats} after 2 warm-ups."
    )
    table = "\n".join([header, "", *rows])
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
