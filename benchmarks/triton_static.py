"""What Triton makes of the flash kernels for an NVIDIA GPU, on a machine without one.

    pip install triton==3.6.0                             # the compiler only: no GPU, no driver
    PYTHONPATH=src python benchmarks/triton_static.py     # jattn and Pallas mha, FlashAttention setup
    PYTHONPATH=src python benchmarks/triton_static.py --arch 89 --table sm90   # H100 tiles on an RTX 4090
    PYTHONPATH=src python benchmarks/triton_static.py --sweep   # launch settings of jattn's kernels
    PYTHONPATH=src python benchmarks/triton_static.py --choose --arch 86 --write   # sm86's table entries

The kernels are lowered to Triton IR by JAX (``jax.export`` for CUDA, as in the tests), put through
Triton's first optimisation stage (canonicalize, combine, CSE, loop unrolling: XLA runs it on a GPU,
and ``triton.compile`` skips it for IR it is given), then compiled by the ``triton`` package for
``--arch`` (sm_90 by default; 80 for an A100, 86/89 for the 99 KiB parts) and assembled by its
``ptxas``. For each kernel it prints what decides whether it can
be fast, all read from the compiler's output:

* ``smem``: shared memory per program (``SHARED_KIB``: 227 KiB on an H100; more does not launch);
* ``pipelined``: the K/V loads are asynchronous copies (``cp.async``) issued ahead of their use;
* ``async mma``: matmuls issued as asynchronous wgmma (sm_90 only), overlapping the softmax;
* ``sync mma``: matmuls left on the older synchronous ``mma.sync`` path (on sm_90, those with
  fewer than 64 rows per program: wgmma wants a warpgroup's 64);
* ``regs`` and ``spill``: registers per thread (at most 255) and bytes spilled to local memory.

These are static facts, not timings: they say which configurations cannot be fast (no pipelining,
spills, too much shared memory), and only a GPU run says which of the rest is fastest. ``--choose``
applies docs/flash.md's rule to them and ``--write`` puts its entries in ``block_sizes.json``.
JAX bundles its own Triton, so the GPU may compile slightly differently from the ``triton`` package
used here. The capture uses a private JAX hook (``jax._src.pallas.triton``), written against
jax 0.10.2; if it moves, the script says so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

import block_table
import gpu_bench
from jattn import masks
from jattn.attention import make_problem
from jattn.kernels import aot, flash

ARCHS = (80, 86, 89, 90)  # A100; RTX 30xx, A10; RTX 40xx, L4, L40; H100


def table_target(arch: int) -> str:
    """The table a GPU of ``sm_{arch}`` reads."""
    return flash.triton_target(divmod(arch, 10))


# Shared memory one program may use (KiB, with the opt-in), as the library's tables record it.
SHARED_KIB = {arch: flash.TRITON_TARGETS[table_target(arch)] for arch in ARCHS}


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Static facts of one compiled kernel."""

    shared_bytes: int
    pipelined: bool
    async_mma: int
    sync_mma: int
    registers: int
    spill_bytes: int
    ptx_instructions: int  # in the kernel's PTX, a static size (not a count of what runs)
    arch: int = 90

    @property
    def launches(self) -> bool:
        return self.shared_bytes <= SHARED_KIB[self.arch] * 1024

    @property
    def wgmma_only(self) -> bool:
        """Every matmul an asynchronous wgmma (what Hopper's tensor cores run at full rate)."""
        return self.async_mma > 0 and self.sync_mma == 0


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
    aot.export_for(fn, *shapes, platform="cuda")


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
    """Triton IR of JAX's Pallas ``mha`` forward and backward with the tiles ``gpu_bench.py`` times
    it with (bfloat16, 16 heads)."""
    from jax.experimental.pallas.ops.gpu import attention

    sizes = attention.BlockSizes(**gpu_bench.PALLAS_MHA_BLOCKS)
    x = jax.ShapeDtypeStruct((16384 // length, length, 16, head_dim), jnp.bfloat16)

    def attend(q, k, v):
        return attention.mha(q, k, v, segment_ids=None, causal=causal, block_sizes=sizes)

    with captured_triton_ir() as modules:
        lower(with_gradient(attend), x, x, x)
    return {name: ir for name, ir in modules.items() if "preprocess" not in name}


def mha_launch(head_dim: int, kernel: str) -> tuple[str, int]:
    """(tiles, num_warps) of a Pallas mha kernel at ``PALLAS_MHA_BLOCKS``, by mha's own rule."""
    blocks = gpu_bench.PALLAS_MHA_BLOCKS
    if kernel.endswith("forward"):
        return f"{blocks['block_q']}x{blocks['block_k']}", 4 if head_dim <= 64 else 8
    under = min(blocks["block_q_dkv"] * blocks["block_kv_dkv"], blocks["block_q_dq"] * blocks["block_kv_dq"])
    return f"{blocks['block_q_dkv']}x{blocks['block_kv_dkv']}", 4 if under < 128 * 128 else 8


def launch_settings(sizes: flash.BlockSizes, kernel: str) -> tuple[int, int]:
    """(num_warps, num_stages) that ``kernel`` (a jattn kernel name) is launched with."""
    if kernel.endswith("forward"):
        return sizes.num_warps, sizes.num_stages
    return sizes.backward_num_warps, sizes.backward_num_stages


def optimized_ttir(source: str, arch: int) -> str:
    """The Triton IR in file ``source`` after Triton's first stage (``make_ttir``), as XLA compiles
    it on a GPU."""
    from triton._C.libtriton import ir as triton_ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    context = triton_ir.context()
    triton_ir.load_dialects(context)
    backend.load_dialects(context)
    module = triton_ir.parse_mlir_module(source, context)
    module.context = context
    return str(backend.make_ttir(module, {}, backend.parse_options({}), arch))


def compile_for(ir: str, num_warps: int, num_stages: int, arch: int = 90) -> Compiled:
    """Compile Triton IR text for ``sm_{arch}`` with the ``triton`` package and read the facts off."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        lowered, source = os.path.join(tmp, "lowered.ttir"), os.path.join(tmp, "kernel.ttir")
        with open(lowered, "w") as f:
            f.write(ir)
        with open(source, "w") as f:
            f.write(optimized_ttir(lowered, arch))
        kernel = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        report = subprocess.run(
            [ptxas, f"-arch=sm_{arch}a" if arch == 90 else f"-arch=sm_{arch}", "-v", ptx, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return Compiled(
        shared_bytes=int(kernel.metadata.shared),
        pipelined="cp.async" in kernel.asm["ptx"],
        async_mma=len(re.findall(r"warp_group_dot.*isAsync = true", kernel.asm["ttgir"])),
        sync_mma=len(re.findall(r"= tt\.dot ", kernel.asm["ttgir"])),
        registers=int(registers.group(1)) if registers else -1,
        spill_bytes=int(spills.group(1)) if spills else 0,
        ptx_instructions=_instruction_count(kernel.asm["ptx"]),
        arch=arch,
    )


def _instruction_count(ptx: str) -> int:
    """Instructions in PTX text: statements ending in ';' other than directives and comments."""
    lines = (line.strip() for line in ptx.splitlines())
    return sum(1 for line in lines if line.endswith(";") and not line.startswith((".", "//")))


COLUMNS = (
    "kernel",
    "head dim",
    "mask",
    "tiles",
    "warps",
    "stages",
    "smem KiB",
    "pipelined",
    "async mma",
    "sync mma",
)
HEADER = "| " + " | ".join((*COLUMNS, "regs", "spill B", "PTX instr")) + " |\n|" + "---|" * (len(COLUMNS) + 3)


def row(kernel: str, head_dim: int, causal: bool, tiles: str, warps: int, stages: int, c: Compiled) -> str:
    smem = f"{c.shared_bytes / 1024:.0f}" + ("" if c.launches else " (too much)")
    mask = "causal" if causal else "none"
    pipelined = "yes" if c.pipelined else "no"
    cells = (kernel, head_dim, mask, tiles, warps, stages, smem, pipelined, c.async_mma, c.sync_mma)
    return "| " + " | ".join(map(str, (*cells, c.registers, c.spill_bytes, c.ptx_instructions))) + " |"


def compare(head_dims, length: int, arch: int, dtype: str, target: str | None) -> None:
    """jattn's tabulated settings (``target``'s table, default the one ``sm_{arch}`` reads) compiled
    for ``sm_{arch}``, against Pallas mha as ``gpu_bench.py`` times it (bfloat16 only)."""
    target = target or table_target(arch)
    print(
        f"{dtype}, {length} tokens per sequence, 16 heads; table {target}, compiled for sm_{arch} by Triton\n"
    )
    print(HEADER)
    for head_dim, causal in itertools.product(head_dims, (False, True)):
        sizes = flash.lookup_block_sizes("triton", dtype, head_dim, target)
        for name, ir in sorted(jattn_kernels(head_dim, causal, sizes, length, jnp.dtype(dtype)).items()):
            warps, stages = launch_settings(sizes, name)
            tiles = f"{sizes.block_q}x{sizes.block_kv}"
            print(row(name, head_dim, causal, tiles, warps, stages, compile_for(ir, warps, stages, arch)))
        if dtype != "bfloat16":
            continue
        for name, ir in sorted(mha_kernels(head_dim, causal, length).items()):
            tiles, warps = mha_launch(head_dim, name)  # mha's default: 2 stages
            print(row(f"pallas {name}", head_dim, causal, tiles, warps, 2, compile_for(ir, warps, 2, arch)))


def sweep(head_dims, length: int, tiles, steps, dtype: str, arch: int) -> None:
    """Every given tile, backward step and launch setting of jattn's kernels (causal)."""
    print(f"{dtype}, {length} tokens per sequence, 16 heads; compiled for sm_{arch} by Triton\n")
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
                compiled = compile_for(ir, warps, stages, arch)
                print(row(label, head_dim, True, f"{bq}x{bkv}", warps, stages, compiled))


FORWARD_TILES = ((128, 128), (128, 64), (64, 128), (64, 64), (64, 32), (32, 32), (16, 16))
BACKWARD_STEPS = ((64, 64), (32, 64), (32, 32), (16, 16))  # (dk/dv q step, dq kv step), clipped to the tile
MAX_BACKWARD_SPILL = 1024  # bytes per thread, dq + dk/dv: beyond it a tile is passed over


@dataclasses.dataclass(frozen=True)
class Limits:
    """One pass of the rule: the launch settings (num_warps, num_stages) it tries and the share of
    the architecture's shared memory it allows."""

    launches: tuple[tuple[int, int], ...]
    budget: float

    def fits(self, c: Compiled, stages: int) -> bool:
        return (c.pipelined or stages == 1) and c.shared_bytes <= self.budget * SHARED_KIB[c.arch] * 1024


PASSES = (
    Limits(((4, 2), (4, 3), (8, 2), (8, 3)), 0.9),  # pipelined, with a margin: JAX bundles its own Triton
    Limits(((4, 1), (8, 1)), 0.9),  # unpipelined, only where nothing pipelined fits
    Limits(((4, 1), (8, 1)), 1.0),  # the last resort (float32 at head dim 256 on a 99 KiB GPU)
)


@dataclasses.dataclass(frozen=True)
class Choice:
    sizes: flash.BlockSizes
    facts: dict[str, Compiled]  # kernel name -> its facts under ``sizes``


def _best_launch(ir: str, arch: int, limits: Limits) -> tuple[tuple[int, int], Compiled] | None:
    """The launch setting with the fewest spills among those that fit; ties: wgmma only, then
    more stages, then more warps."""
    fitting = [
        (launch, c)
        for launch in limits.launches
        if limits.fits(c := compile_for(ir, *launch, arch=arch), launch[1])
    ]
    if not fitting:
        return None
    return min(fitting, key=lambda lc: (lc[1].spill_bytes, not lc[1].wgmma_only, -lc[0][1], -lc[0][0]))


def _backward_on(tile, head_dim: int, dtype, arch: int, length: int, limits: Limits):
    """The backward steps and launch setting on ``tile`` with the fewest spills (dq + dk/dv), on
    sm_90 among those whose matmuls are all wgmma first, or None; ties: more stages, then more
    warps, then larger steps."""
    candidates = []
    for step in {(min(q, tile[0]), min(kv, tile[1])) for q, kv in BACKWARD_STEPS}:
        sizes = flash.BlockSizes(*tile, backward_q_step=step[0], backward_kv_step=step[1])
        kernels = jattn_kernels(head_dim, True, sizes, length, dtype)
        for launch in limits.launches:
            facts = {
                n: compile_for(kernels[n], *launch, arch=arch) for n in ("jattn_flash_dq", "jattn_flash_dkv")
            }
            if all(limits.fits(c, launch[1]) for c in facts.values()):
                spill = sum(c.spill_bytes for c in facts.values())
                not_wgmma = arch == 90 and not all(c.wgmma_only for c in facts.values())
                rank = (not_wgmma, spill, -launch[1], -launch[0], -step[0] * step[1])
                candidates.append((rank, step, launch, facts))
    return min(candidates, key=lambda c: c[0]) if candidates else None


def choose(head_dim: int, dtype, arch: int, length: int = 4096) -> Choice:
    """A table entry by the rule of docs/flash.md, from compile facts alone:

    1. forward: the tile (and launch setting) whose forward kernel spills least, on sm_90 those
       whose matmuls are all async wgmma first; ties go to the larger tile;
    2. backward, on that tile: the steps and launch setting whose dq and dk/dv spill least (on
       sm_90, those with wgmma only first); a tile whose backward fits no setting, or spills more
       than 1 KiB per thread, is passed over;
    3. every kernel pipelined and within 90% of the architecture's shared memory; only where no
       tile qualifies, unpipelined launches (one stage), and after those the whole shared memory.
    """
    for limits in PASSES:
        if (choice := _choose_within(limits, head_dim, dtype, arch, length)) is not None:
            return choice
    raise RuntimeError(f"no tile fits sm_{arch} for {jnp.dtype(dtype).name}, head dim {head_dim}")


def _choose_within(limits: Limits, head_dim: int, dtype, arch: int, length: int) -> Choice | None:
    forwards = []
    for tile in FORWARD_TILES:
        kernels = jattn_kernels(head_dim, True, flash.BlockSizes(*tile), length, dtype)
        if (best := _best_launch(kernels["jattn_flash_forward"], arch, limits)) is not None:
            launch, c = best
            forwards.append(
                ((arch == 90 and not c.wgmma_only, c.spill_bytes, -tile[0] * tile[1]), tile, launch, c)
            )
    for _, tile, launch, forward in sorted(forwards, key=lambda f: f[0]):
        backward = _backward_on(tile, head_dim, dtype, arch, length, limits)
        if backward is not None and backward[0][1] <= MAX_BACKWARD_SPILL:
            _, step, bwd_launch, facts = backward
            sizes = flash.BlockSizes(*tile, *launch, *bwd_launch, *step)
            return Choice(sizes, {"jattn_flash_forward": forward, **facts})
    return None


def table_entry(sizes: flash.BlockSizes) -> dict[str, int]:
    """``sizes`` as a ``block_sizes.json`` entry (the steps only where they are not the tiles)."""
    entry = dataclasses.asdict(sizes)
    for step, tile in flash.STEPS:
        if entry[step] == entry[tile]:
            del entry[step]
    return entry


def choose_and_report(head_dims, dtypes, arch: int, length: int, write: bool) -> None:
    print(
        f"chosen for sm_{arch} ({SHARED_KIB[arch]} KiB), {length} tokens, causal, by docs/flash.md's rule\n"
    )
    print(HEADER)
    chosen = {}
    for dtype, head_dim in itertools.product(dtypes, head_dims):
        choice = choose(head_dim, jnp.dtype(dtype), arch, length)
        chosen.setdefault(dtype, {})[str(head_dim)] = table_entry(choice.sizes)
        sizes = choice.sizes
        tiles = f"{sizes.block_q}x{sizes.block_kv}"
        for name, c in sorted(choice.facts.items()):
            warps, stages = launch_settings(sizes, name)
            label = f"{dtype} {name}" + (
                ""
                if name.endswith("forward")
                else f" (steps {sizes.backward_q_step}/{sizes.backward_kv_step})"
            )
            print(row(label, head_dim, True, tiles, warps, stages, c), flush=True)
    print(json.dumps(chosen))
    if write:
        import triton

        source = f"chosen by benchmarks/triton_static.py --choose --arch {arch} (triton {triton.__version__})"
        block_table.write_entries(
            "triton", table_target(arch), chosen, block_table.one_source(chosen, source)
        )


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
    parser.add_argument(
        "--arch", type=int, default=90, choices=sorted(SHARED_KIB), help="compile for sm_ARCH"
    )
    parser.add_argument(
        "--table", choices=sorted(flash.TRITON_TARGETS), help="the table to compile (default: --arch's)"
    )
    parser.add_argument("--choose", action="store_true", help="choose table entries for --arch by the rule")
    parser.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float16", "float32"], help="with --choose"
    )
    parser.add_argument("--write", action="store_true", help="with --choose: write them to block_sizes.json")
    args = parser.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        print("needs the Triton compiler: pip install triton==3.6.0 (no GPU needed)", file=sys.stderr)
        return 2
    if args.choose:
        choose_and_report(args.head_dims, args.dtypes, args.arch, args.length, args.write)
    elif args.sweep:
        tiles = [tuple(map(int, tile.split("x"))) for tile in args.tiles]
        steps = [None] if args.steps is None else [tuple(map(int, step.split(","))) for step in args.steps]
        sweep(args.head_dims, args.length, tiles, steps, args.dtype, args.arch)
    else:
        compare(args.head_dims, args.length, args.arch, args.dtype, args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
