"""The GPU check and the autotuner run end to end in their tiny CPU modes (interpret mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert set(table["triton"]) >= {"bfloat16", "float16", "float32"}  # entries not swept are kept
    assert "mosaic_tpu" in table
