"""What Triton makes of the flash kernels for an H100, on a machine without a GPU.

    pip install triton==3.6.0                             # the compiler only: no GPU, no driver
    PYTHONPATH=src python benchmarks/triton_static.py     # jattn and Pallas mha, FlashAttention setup
    PYTHONPATH=src python benchmarks/triton_static.py --sweep   # launch settings of jattn's kernels

The kernels are lowered to Triton IR by JAX (``jax.export`` for CUDA, as in the tests), then
compiled by the ``triton`` package for sm_90 and assembled by its ``ptxas``. For each kernel it
prints what decides whether it can be fast, all read from the compiler's output:

* ``smem``: shared memory per program (an H100 has 227 KiB; more does not launch);
* ``pipelined``: the K/V loads are asynchronous copies (``cp.async``) issued ahead of their use;
* ``async mma``: matmuls issued as asynchronous wgmma, overlapping the softmax;
* ``regs`` and ``spill``: registers per thread (at most 255) and bytes spilled to local memory.

These are static facts, not timings: they say which configurations cannot be fast (no pipelining,
spills, too much shared memory), and only a GPU run says which of the rest is fastest. JAX bundles
its own Triton, so the GPU may compile slightly differently from the ``triton`` package used here.
The capture uses a private JAX hook (``jax._src.pallas.triton``), checked against jax 0.10 and 0.11.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from jattn import masks
from jattn.attention import make_problem
from jattn.kernels import flash

SM90_SHARED_BYTES = 227 * 1024
_TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Static facts of one compiled kernel."""

    shared_bytes: int
    pipelined: bool
    async_mma: int
    registers: int
    spill_bytes: int

    @property
    def launches(self) -> bool:
        return self.shared_bytes <= SM90_SHARED_BYTES


@contextlib.contextmanager
def captured_triton_ir():
    """Collect ``{kernel name: Triton IR text}`` of every ``pallas_call`` lowered for CUDA."""
    from jax._src.pallas.triton import lowering, pallas_call_registration

    original = lowering.lower_jaxpr_to_triton_module
    modules: dict[str, str] = {}

    def capture(jaxpr, *args, **kwargs):
        result = original(jaxpr, *args, **kwargs)
        modules[jaxpr.debug_info.func_name] = result.module.operation.get_asm(enable_debug_info=False)
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield modules
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = original
    if not modules:
        raise RuntimeError(f"no Triton IR captured: the private lowering hook moved in jax {jax.__version__}")


def lower(fn, *shapes) -> None:
    disabled = [jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)]
    jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*shapes)


def with_gradient(attend):
    """``(q, k, v) -> (dq, dk, dv)`` of ``sum(attend(q, k, v))``: lowers forward and backward kernels."""
    return jax.grad(lambda *qkv: attend(*qkv).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def jattn_kernels(
    head_dim: int, causal: bool, sizes: flash.BlockSizes | None, length: int, dtype=jnp.bfloat16
) -> dict[str, str]:
    """Triton IR of jattn's forward, dq and dk/dv kernels (16 heads)."""
    x = jax.ShapeDtypeStruct((16384 // length, length, 16, head_dim), dtype)
    mask = masks.causal() if causal else None

    def attend(q, k, v):
        problem = make_problem(q, k, v, mask=mask)
        return flash.flash_problem(problem, platform="gpu", interpret=False, sizes=sizes)

    with captured_triton_ir() as modules:
        lower(with_gradient(attend), x, x, x)
    return modules


def mha_kernels(head_dim: int, causal: bool, length: int) -> dict[str, str]:
    """Triton IR of JAX's Pallas ``mha`` forward and backward, its defaults (bfloat16, 16 heads)."""
    from jax.experimental.pallas.ops.gpu import attention

    x = jax.ShapeDtypeStruct((16384 // length, length, 16, head_dim), jnp.bfloat16)
    with captured_triton_ir() as modules:
        lower(with_gradient(lambda q, k, v: attention.mha(q, k, v, segment_ids=None, causal=causal)), x, x, x)
    return {name: ir for name, ir in modules.items() if "preprocess" not in name}


def launch_settings(sizes: flash.BlockSizes, kernel: str) -> tuple[int, int]:
    """(num_warps, num_stages) that ``kernel`` (a jattn kernel name) is launched with."""
    if kernel.endswith("forward"):
        return sizes.num_warps, sizes.num_stages
    return sizes.backward_num_warps, sizes.backward_num_stages


def compile_for_sm90(ir: str, num_warps: int, num_stages: int) -> Compiled:
    """Compile Triton IR text for sm_90 with the ``triton`` package and read the facts off."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ttir")
        with open(source, "w") as f:
            f.write(ir)
        kernel = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
        )
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        report = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True, text=True, check=True
        ).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return Compiled(
        shared_bytes=int(kernel.metadata.shared),
        pipelined="cp.async" in kernel.asm["ptx"],
        async_mma=len(re.findall(r"warp_group_dot.*isAsync = true", kernel.asm["ttgir"])),
        registers=int(registers.group(1)) if registers else -1,
        spill_bytes=int(spills.group(1)) if spills else 0,
    )


COLUMNS = ("kernel", "head dim", "mask", "tiles", "warps", "stages", "smem KiB", "pipelined", "async mma")
HEADER = "| " + " | ".join((*COLUMNS, "regs", "spill B")) + " |\n|" + "---|" * (len(COLUMNS) + 2)


def row(kernel: str, head_dim: int, causal: bool, tiles: str, warps: int, stages: int, c: Compiled) -> str:
    smem = f"{c.shared_bytes / 1024:.0f}" + ("" if c.launches else " (too much)")
    mask = "causal" if causal else "none"
    cells = (kernel, head_dim, mask, tiles, warps, stages, smem, "yes" if c.pipelined else "no", c.async_mma)
    return "| " + " | ".join(map(str, (*cells, c.registers, c.spill_bytes))) + " |"


def compare(head_dims, length: int) -> None:
    """jattn's tabulated settings against Pallas mha's defaults."""
    print(f"bfloat16, {length} tokens per sequence, 16 heads; compiled for sm_90 by Triton\n")
    print(HEADER)
    for head_dim, causal in itertools.product(head_dims, (False, True)):
        sizes = flash.lookup_block_sizes("triton", jnp.bfloat16, head_dim)
        for name, ir in sorted(jattn_kernels(head_dim, causal, None, length).items()):
            warps, stages = launch_settings(sizes, name)
            tiles = f"{sizes.block_q}x{sizes.block_kv}"
            print(row(name, head_dim, causal, tiles, warps, stages, compile_for_sm90(ir, warps, stages)))
        warps = 4 if head_dim <= 64 else 8  # mha's defaults: 128x128 forward, 32x32 backward, 2 stages
        for name, ir in sorted(mha_kernels(head_dim, causal, length).items()):
            tiles = "128x128" if name.endswith("forward") else "32x32"
            print(row(f"pallas {name}", head_dim, causal, tiles, warps, 2, compile_for_sm90(ir, warps, 2)))


def sweep(head_dims, length: int, tiles, steps, dtype: str) -> None:
    """Every given tile, backward step and launch setting of jattn's kernels (causal)."""
    print(f"{dtype}, {length} tokens per sequence, 16 heads; compiled for sm_90 by Triton\n")
    print(HEADER)
    for head_dim, (bq, bkv), step in itertools.product(head_dims, tiles, steps):
        sizes = flash.BlockSizes(bq, bkv)
        if step is not None:
            sizes = dataclasses.replace(
                sizes, backward_q_step=min(step[0], bq), backward_kv_step=min(step[1], bkv)
            )
        kernels = jattn_kernels(head_dim, True, sizes, length, jnp.dtype(dtype))
        for name, ir in sorted(kernels.items()):
            label = (
                name
                if name.endswith("forward")
                else f"{name} (steps {sizes.backward_q_step}/{sizes.backward_kv_step})"
            )
            for warps, stages in itertools.product((4, 8), (2, 3)):
                compiled = compile_for_sm90(ir, warps, stages)
                print(row(label, head_dim, True, f"{bq}x{bkv}", warps, stages, compiled))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="sweep tiles and launch settings")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument(
        "--tiles", nargs="+", default=["128x128", "128x64", "64x128", "64x64"], help="block_q x block_kv"
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        default=None,
        help="backward steps 'q,kv' (queries per dk/dv step, keys per dq step)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        print("needs the Triton compiler: pip install triton==3.6.0 (no GPU needed)", file=sys.stderr)
        return 2
    if args.sweep:
        tiles = [tuple(map(int, tile.split("x"))) for tile in args.tiles]
        steps = [None] if args.steps is None else [tuple(map(int, step.split(","))) for step in args.steps]
        sweep(args.head_dims, args.length, tiles, steps, args.dtype)
    else:
        compare(args.head_dims, args.length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
