"""The GPU check and the autotuner run end to end in their tiny CPU modes (interpret mode)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from jattn.kernels import flash

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], env_flag: str) -> subprocess.CompletedProcess:
    env = {**os.environ, env_flag: "1", "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_check_tiny_mode_prints_every_table():
    result = _run(["bash", "benchmarks/gpu_check.sh"], "JATTN_GPU_CHECK_TINY")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for heading in (
        "## Correctness",
        "## TFLOP/s",
        "## Sliding window",
        "## Forward+backward temporary memory",
    ):
        assert heading in out
    assert "| NO |" not in out and "correctness passed" in out
    assert "| jattn_flash | fwd_bwd | yes |" in out and "| jax_xla | fwd | no |" in out


def test_autotune_tiny_mode_writes_a_table_the_kernel_reads(tmp_path):
    output = tmp_path / "block_sizes.json"
    result = _run(
        [sys.executable, "benchmarks/autotune_flash.py", "--output", str(output)], "JATTN_AUTOTUNE_TINY"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads(output.read_text())
    tuned = table["triton"]["float32"]["16"]
    assert (tuned["block_q"], tuned["block_kv"]) in {(16, 16), (32, 16)}
    assert (tuned["backward_num_warps"], tuned["backward_num_stages"]) == (4, 2)
    assert tuned["backward_q_step"] in {16, tuned["block_q"]} and tuned["backward_kv_step"] == 16
    assert set(table["triton"]) >= {"bfloat16", "float16", "float32"}  # entries not swept are kept
    assert "mosaic_tpu" in table


TABULATED = [
    (dtype, head_dim) for dtype, by_dim in flash.block_size_table()["triton"].items() for head_dim in by_dim
]


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "head_dim"), TABULATED)
def test_tabulated_triton_sizes_fit_an_h100_and_pipeline(dtype, head_dim, monkeypatch):
    """Every kernel of every Triton table entry, compiled for sm_90 by the ``triton`` package (no GPU
    needed), fits the H100's shared memory and pipelines its loads. The float32 / 256 entry once
    asked its dk/dv kernel for 256 KiB, so it would not have launched."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    static = importlib.import_module("triton_static")
    sizes = flash.lookup_block_sizes("triton", dtype, head_dim)
    kernels = static.jattn_kernels(head_dim, True, None, 4096, jnp.dtype(dtype))
    assert sorted(kernels) == ["jattn_flash_dkv", "jattn_flash_dq", "jattn_flash_forward"]
    for name, ir in kernels.items():
        compiled = static.compile_for_sm90(ir, *static.launch_settings(sizes, name))
        assert compiled.launches and compiled.pipelined, (name, compiled)
