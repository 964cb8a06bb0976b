"""Ring attention against single-device chunked attention: time and per-device memory vs length.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/ring.py [--lengths 2048 4096 8192]

On a D-device mesh (CPU host devices here), for each length L, causal mask, forward+backward:
* ring: ``jattn.parallel.ring_attention`` with the sequence split over D devices (zig-zag);
* chunked: ``jattn.attention(implementation="chunked")`` on one device at length L.
Memory is XLA's compiled temporary bytes per device; time is the median of a few calls. Host
devices share the same CPU cores, so CPU times show overhead, not speed-up; the memory column is
the point (ring at L ~ chunked at L / D).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jattn import attention, masks  # noqa: E402
from jattn.parallel import make_mesh, ring_attention, sharding  # noqa: E402


def _measure(fn, args, repeats: int) -> tuple[float, int]:
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    mesh = make_mesh({"seq": -1})
    devices = mesh.shape["seq"]
    causal = masks.causal()

    def grads(attend):
        return jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))

    ring = grads(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, axis_name="seq", mask=causal))
    chunked = grads(lambda q, k, v: attention(q, k, v, mask=causal, implementation="chunked"))
    print(
        f"{jax.device_count()} {jax.default_backend()} devices, jax {jax.__version__}; causal, fwd+bwd, "
        f"N={args.heads}, H={args.head_dim}, float32"
    )
    print(
        "| L | ring on D devices: ms | chunked, 1 device: ms | ring temp/device MiB | chunked temp at L MiB "
        "| chunked temp at L/D MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    key = jax.random.key(0)
    for length in args.lengths:
        shape = (1, length, args.heads, args.head_dim)
        q, k, v = (jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(3))
        sharded = [jax.device_put(x, sharding(mesh, None, "seq")) for x in (q, k, v)]
        ring_time, ring_temp = _measure(ring, sharded, args.repeats)
        chunked_time, chunked_temp = _measure(chunked, (q, k, v), args.repeats)
        shard = [x[:, : length // devices] for x in (q, k, v)]
        shard_temp = jax.jit(chunked).lower(*shard).compile().memory_analysis().temp_size_in_bytes
        mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
        print(
            f"| {length} | {ring_time * 1e3:.0f} | {chunked_time * 1e3:.0f} | {mib(ring_temp)} | "
            f"{mib(chunked_temp)} | {mib(shard_temp)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
