"""How the cost of each attention grows with sequence length: compiled FLOPs, temporary memory, wall time.

For N = 1024 … 32768 (B=1, 4 heads, head_dim 64, float32, non-causal), each variant's forward+backward
(gradients of q, k, v) is compiled once; ``jattn.flops`` counts the matmul FLOPs of its traced
jaxpr (loop bodies times their trip counts: XLA's cost analysis counts a loop body once, which would hide the
growth of every implementation that streams over blocks), XLA's memory analysis gives the temporary bytes,
and the compiled program is run for the median wall time. A log-log fit over N gives the
growth exponent: about 2 for full attention, about 1 for the sparse and linear-cost variants.

    # the RESULTS.md table (about 8 min):
    .venv/bin/python benchmarks/complexity.py --max-wall-len 8192 --max-quadratic-wall-len 4096
    .venv/bin/python benchmarks/complexity.py --lengths 1024 2048 --max-wall-len 0   # a quick look

Wall time is measured only up to ``--max-wall-len`` (and for the quadratic variants up to
``--max-quadratic-wall-len``): on a shared 2-core CPU larger runs take minutes each. "chunked" loops over
each query block's non-empty key blocks with a traced trip count, which a jaxpr does not hold, so its FLOPs
are left out (its work is the mask's non-empty tiles: see ``analytic_flops`` in the scaling study).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from jattn import masks, scaling

BATCH, HEADS, HEAD_DIM = 1, 4, 64
WINDOW, BIGBIRD_BLOCK, NUM_FEATURES, PROJECTED_LEN = 256, 64, 256, 256
QUADRATIC = {"full (xla)", "chunked"}


def bigbird(length: int) -> masks.Mask:
    """BigBird with blocks of 64 (3 window blocks, 1 global block), 2 random blocks drawn for this length."""
    return masks.bigbird(BIGBIRD_BLOCK, 3, 1, 2)


def exact(implementation: str, make_mask: Callable[[int], masks.Mask | None]):
    def build(length):
        mask = make_mask(length)
        return lambda q, k, v: jattn.attention(q, k, v, mask=mask, implementation=implementation)

    return build


def linformer(length):
    keys = jax.random.split(jax.random.key(1))
    proj_k, proj_v = (jax.random.normal(key, (length, PROJECTED_LEN)) / PROJECTED_LEN**0.5 for key in keys)
    return lambda q, k, v: jattn.linformer_attention(q, k, v, proj_k, proj_v)


VARIANTS: dict[str, Callable[[int], Callable]] = {
    "full (xla)": exact("xla", lambda length: None),
    "chunked": exact("chunked", lambda length: None),
    f"banded (window ±{WINDOW})": exact("banded", lambda length: masks.sliding_window(WINDOW, WINDOW)),
    f"block_sparse (BigBird, block {BIGBIRD_BLOCK})": exact("block_sparse", bigbird),
    "linear (elu+1)": lambda length: lambda q, k, v: jattn.linear_attention(q, k, v),
    f"performer ({NUM_FEATURES} features)": lambda length: (
        lambda q, k, v: jattn.performer_attention(q, k, v, key=jax.random.key(0), num_features=NUM_FEATURES)
    ),
    f"linformer (k={PROJECTED_LEN})": linformer,
}


def fwd_bwd(attend: Callable):
    """The output and the gradients of Σ attend(q, k, v) · d_out with respect to q, k and v (the
    output returned, as a layer's is used: XLA would otherwise drop the forward's P·V matmul)."""

    def grads(q, k, v, d_out):
        out, pullback = jax.vjp(attend, q, k, v)
        return out, pullback(d_out)

    return jax.jit(grads)


def measure(name: str, length: int, wall: bool, repeats: int) -> dict:
    shape = (BATCH, length, HEADS, HEAD_DIM)  # [B, T, N, H]
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    traced = fwd_bwd(VARIANTS[name](length)).trace(spec, spec, spec, spec)
    compiled = traced.lower().compile()
    row = {"temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
    matmul_flops = scaling.jaxpr_flops(traced.jaxpr)  # None for "chunked": its loops have no trip count
    if matmul_flops is not None:
        row["flops"] = float(matmul_flops)
    if wall:
        args = [jax.random.normal(key, shape, jnp.float32) for key in jax.random.split(jax.random.key(0), 4)]
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        row["seconds"] = statistics.median(times)
    return row


def slope(lengths: list[int], values: list[float]) -> float:
    """Exponent of a power-law fit ``value ∝ N^slope``."""
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def markdown(results: dict[str, dict[int, dict]], lengths: list[int]) -> str:
    def cell(row, key, unit):
        if row is None or key not in row:
            return "–"
        return f"{row[key] / unit:.3g}"

    lines = []
    for title, key, unit in (
        ("GFLOPs (matmuls, counted from the jaxpr with loop trip counts; fwd+bwd)", "flops", 1e9),
        ("temporary memory, MiB (XLA memory analysis, fwd+bwd)", "temp_bytes", 2**20),
        ("wall time, ms (median, fwd+bwd)", "seconds", 1e-3),
    ):
        lines += [f"**{title}**", "", "| variant | " + " | ".join(f"N={n}" for n in lengths) + " | slope |"]
        lines.append("|---" * (len(lengths) + 2) + "|")
        for name, rows in results.items():
            measured = [n for n in lengths if key in rows.get(n, {})]
            fit = "–"
            if len(measured) >= 2:
                fit = f"{slope(measured, [rows[n][key] for n in measured]):.2f}"
            cells = " | ".join(cell(rows.get(n), key, unit) for n in lengths)
            lines.append(f"| {name} | {cells} | {fit} |")
        lines.append("")
    return "\n".join(lines)


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-wall-len", type=int, default=16384, help="time runs up to this length")
    parser.add_argument("--max-quadratic-wall-len", type=int, default=4096, help="same, for full and chunked")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name, value in (("--repeats", args.repeats), *(("--lengths", n) for n in args.lengths)):
        if value <= 0:
            parser.error(f"{name} must be positive, got {value}")
    results: dict[str, dict[int, dict]] = {}
    for name in args.variants:
        results[name] = {}
        wall_cap = (
            min(args.max_wall_len, args.max_quadratic_wall_len) if name in QUADRATIC else args.max_wall_len
        )
        for length in args.lengths:
            results[name][length] = measure(name, length, length <= wall_cap, args.repeats)
            print(f"{name:40s} N={length:6d} {results[name][length]}", flush=True)
    print()
    device = jax.devices()[0].device_kind
    print(f"jax {jax.__version__}, {device}, B={BATCH}, heads={HEADS}, head_dim={HEAD_DIM}, float32")
    print()
    print(markdown(results, args.lengths))


if __name__ == "__main__":
    main()
