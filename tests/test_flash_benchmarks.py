"""The GPU check and the autotuner run end to end in their tiny CPU modes (interpret mode)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
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
        "tile table: sm90",  # no GPU attached: the default target
        "## Correctness",
        "## Flash against jax_xla at N=64",
        "## TFLOP/s",
        "## Sliding window",
        "## Forward+backward temporary memory",
        "## Where the window's time goes",
    ):
        assert heading in out
    assert "| NO |" not in out and "correctness passed" in out
    assert "| jattn_flash | fwd_bwd | yes |" in out and "| jax_xla | fwd | no |" in out


def _fake_python(tmp_path: Path, correctness: str) -> str:
    """A ``PYTHON`` for gpu_check.sh that runs ``correctness`` (shell) for the correctness part and
    prints which part ran otherwise, so the script's own logic is tested without a kernel."""
    fake = tmp_path / "python"
    fake.write_text(
        '#!/usr/bin/env bash\n[ "$2 $3" = "--part correctness" ] && { ' + correctness + "; }\necho ran $3\n"
    )
    fake.chmod(0o755)
    return str(fake)


def _run_gpu_check(env: dict) -> subprocess.CompletedProcess:
    command = ["bash", "benchmarks/gpu_check.sh"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


def test_gpu_check_runs_the_throughput_part_after_a_crashed_correctness_part(tmp_path):
    """A kernel that brings part 1's process down (a segfault, a sticky illegal address) still
    leaves part 2 its run; the exit status says that part 1 failed."""
    env = {**os.environ, "PYTHON": _fake_python(tmp_path, "kill -SEGV $$")}
    result = _run_gpu_check(env)
    assert result.stdout == "ran throughput\n"
    assert result.returncode == 1 and "the correctness part exited with status 139" in result.stderr


def test_gpu_check_runs_a_part_that_died_again_on_one_compile_thread(tmp_path):
    """Should the compiling threads bring a part down (a segfault), it runs once more compiling one
    step at a time, and the check's status is that run's."""
    crash_on_threads = '[ "$JATTN_COMPILE_THREADS" = 1 ] || kill -SEGV $$'
    env = {**os.environ, "PYTHON": _fake_python(tmp_path, crash_on_threads)}
    env.pop("JATTN_COMPILE_THREADS", None)
    result = _run_gpu_check(env)
    assert result.stdout == "ran correctness\nran throughput\n" and result.returncode == 0
    assert "the correctness part died (status 139); again on one compile thread" in result.stderr


def test_gpu_check_parts_share_one_deadline(tmp_path):
    env = {**os.environ, "PYTHON": _fake_python(tmp_path, "sleep 3"), "JATTN_GPU_CHECK_TIMEOUT_S": "1"}
    result = _run_gpu_check(env)
    assert result.stdout == "" and result.returncode == 1
    assert "status 124" in result.stderr and "no time left for the throughput part" in result.stderr


def test_gpu_check_marks_each_ratio_bar(monkeypatch, capsys):
    """The ratio table states the Pallas bar per cell (>= 1.0x from ``bar_len`` on) and the distance
    to cuDNN, and a cell that could not run reads n/a, so the one GPU run needs no arithmetic."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    setup = dataclasses.replace(bench.CPU_TINY, head_dims=(16,), lengths=(32, 64), bar_len=64)
    seconds = {"jattn_flash": 1.0, "pallas_triton": 1.25, "jax_cudnn": 0.5}
    results = {
        (name, 16, pass_name, causal, length): time if length == 64 else 9.0
        for name, time in seconds.items()
        for _, pass_name in bench.PASSES
        for causal in (False, True)
        for length in (32, 64)
    }
    results[("pallas_triton", 16, "fwd_bwd", True, 64)] = 0.8
    results[("jax_cudnn", 16, "fwd", False, 64)] = "n/a (RuntimeError)"
    bench.print_ratios(setup, results)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 16 |")]
    assert rows[0] == "| 16 | fwd | no | 1.25x (bar met) | n/a |"
    assert rows[-1] == "| 16 | fwd_bwd | yes | 0.80x (BAR MISSED) | 0.50x |"


def test_gpu_check_tests_what_implementation_none_sends_to_cudnn(monkeypatch, capsys):
    """The cuDNN rows (no mask, causal and a causal window, S = T and T + 100, GQA) run here
    through "xla": each reaches the oracle and passes, and a wrong answer fails its row."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    assert bench.check_cudnn(bench.CPU_TINY, np.random.default_rng(0), implementation="xla")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 16 |")]
    assert [row.split(" | ")[1:3] for row in rows] == [
        ["none", "T + 0"],
        ["none", "T + 100"],
        ["causal", "T + 0"],
        ["causal", "T + 100"],
        ["window 10 (not sent)", "T + 0"],  # a quarter of the 40 queries
        ["window 10 (not sent)", "T + 100"],
    ]
    assert all(row.endswith("| yes |") for row in rows)
    monkeypatch.setattr(bench.jattn, "attention", lambda q, k, v, **kwargs: 1.5 * q)
    assert not bench.check_cudnn(bench.CPU_TINY, np.random.default_rng(0), implementation="xla")


def test_a_row_outside_the_verdict_is_printed_but_does_not_fail_the_check(monkeypatch, capsys):
    """cuDNN's window rows (not sent to cuDNN yet) must not fail a run whose bars all hold."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    wrong = lambda q, k, v, mask=None: 1.5 * q  # noqa: E731
    case = bench.OracleCase("| wrong |", "float32", 16, None, 1e-2, attend=wrong, counts=False)
    assert bench.check_against_oracle(bench.CPU_TINY, np.random.default_rng(0), [case])
    assert capsys.readouterr().out.rstrip().endswith("| NO |")
    counted = dataclasses.replace(case, counts=True)
    assert not bench.check_against_oracle(bench.CPU_TINY, np.random.default_rng(0), [counted])


def test_gpu_check_fails_a_nan_gradient(monkeypatch, capsys):
    """A NaN error must fail its row: Python's max() drops a NaN that is not first."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    monkeypatch.setattr(bench, "_compile_case", lambda case, inputs: None)
    monkeypatch.setattr(bench, "_oracle_errors", lambda *args: [1e-7, float("nan"), 1e-7, 1e-7])
    assert not bench.check_correctness(bench.CPU_TINY)
    rows = [line for line in capsys.readouterr().out.splitlines() if "| nan |" in line]
    assert rows and all(row.endswith("| NO |") for row in rows)


def test_gpu_check_logs_each_cell_with_its_throughput(monkeypatch):
    """stderr has every measured cell in ms and TFLOP/s, so a run cut short still gives numbers."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    cell = ("jattn_flash", 16, "fwd", True, 32)  # 64 tokens, 2 heads: 2 * 4*2*32*32*16 / 2 FLOPs
    line = bench._cell_summary(bench.CPU_TINY, cell, 1e-9)
    assert line == "jattn_flash head_dim=16 fwd causal=yes N=32: 0.000 ms, 131.1 TFLOP/s"
    assert bench._cell_summary(bench.CPU_TINY, cell, "skipped (time budget)").endswith(
        ": skipped (time budget)"
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_compile_all_keeps_each_jobs_result_or_error(monkeypatch, threads):
    """One candidate that does not compile (too much shared memory) must not lose the others."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    monkeypatch.setattr(bench, "COMPILE_THREADS", threads)

    def fail():
        raise RuntimeError("Shared memory size limit exceeded")

    futures = bench.compile_all({"a": lambda: 1, "b": fail, "c": lambda: 3})
    assert list(futures) == ["a", "b", "c"]
    assert futures["a"].result() == 1 and futures["c"].result() == 3
    with pytest.raises(RuntimeError, match="Shared memory"):
        futures["b"].result()


def test_compile_all_runs_a_job_that_failed_on_a_thread_again_in_the_calling_one(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    monkeypatch.setattr(bench, "COMPILE_THREADS", 2)

    def only_in_the_main_thread():
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("a thread-safety bug")
        return "compiled"

    futures = bench.compile_all({"a": only_in_the_main_thread, "b": lambda: 2})
    assert futures["a"].result() == "compiled" and futures["b"].result() == 2


def test_the_float32_rows_lower_under_their_precision_on_a_compiling_thread(monkeypatch):
    """The 1e-4 bar holds for IEEE float32 matmuls: the row's precision must reach its lowering,
    which runs on one of ``compile_all``'s threads."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    monkeypatch.setattr(bench, "COMPILE_THREADS", 2)
    attend = functools.partial(bench.jattn.attention, implementation="xla")
    highest = bench.OracleCase("|", "float32", 16, None, 1e-4, precision="highest", attend=attend)
    default = dataclasses.replace(highest, precision=None)
    inputs = bench._case_inputs(bench.CPU_TINY, np.random.default_rng(0), highest)
    lowered = bench.compile_all(
        {case: functools.partial(bench._lower_case, case, inputs) for case in (highest, default)}
    )
    assert "HIGHEST" in lowered[highest].result().as_text()
    assert "HIGHEST" not in lowered[default].result().as_text()


def test_throughput_steps_compile_once_each(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    compiled = []

    def fake_compile(step, inputs):
        compiled.append(step)
        return step

    monkeypatch.setattr(bench, "lower_and_compile", fake_compile)
    monkeypatch.setattr(bench, "_STEPS", {})
    bench.precompile_throughput(bench.CPU_TINY, ["jattn_flash"])  # XLA's steps wait: no bar needs them
    assert (
        len(compiled) == len(bench._STEPS) == 1 * 2 * 2 * 2
    )  # one head dim, two passes, causal or not, two N
    bench.compiled_step(bench.CPU_TINY, "jattn_flash", True, True, 64, 16)
    bench.precompile_throughput(bench.CPU_TINY, ["jattn_flash", "jax_xla"])
    assert len(compiled) == 16


def test_window_diagnosis_compares_the_window_with_its_block_aligned_twin(monkeypatch):
    """At the GPU run's sizes (N = 16384, window 1024, the sm_90 table's tiles) the block-aligned
    window lists the sliding window's tiles with half its masked ones, so their difference is the
    cost of masked tiles; the other variants keep the window and change only the tile settings."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    monkeypatch.setattr(flash, "device_target", lambda lowering: "sm90")
    q = jnp.zeros((1, 16384, 16, 128), jnp.bfloat16)
    variants = bench.window_variants(bench.GPU, (q,))
    counts = []  # (label, listed tiles, masked tiles)
    for label, mask, sizes in variants:
        layout = mask.blocks(16384, 16384, sizes.block_q, sizes.block_kv)
        counts.append((label, int((layout != 0).sum()), int((layout == 1).sum())))
    table = variants[0][2]
    assert (table.block_q, table.block_kv) == (128, 128)
    assert counts == [
        ("dense causal", 8256, 128),
        ("sliding window", 1116, 248),
        ("causal ∧ BlockWindow(128, 8)", 1116, 128),
        ("sliding window, forward kv step 128", 1116, 248),  # the table's steps are 64
        ("sliding window, 64x64 tiles", 4216, 496),
        ("dense causal ∧ padding(N): rows zeroed", 8256, 128),
        ("sliding window ∧ padding(N): rows zeroed", 1116, 248),
    ]
    assert table.forward_kv_step == 64 and variants[3][2] == dataclasses.replace(table, forward_kv_step=128)
    assert variants[4][2] == table.with_tiles(64, 64)
    # the kernels zero unattended rows for the padded variants and the block-aligned intersection
    zeroing = [not mask._attends_every_row(16384, 16384) for _, mask, _ in variants]
    assert zeroing == [False, False, True, False, False, True, True]


def test_window_diagnosis_prints_speedups_and_tile_costs_against_dense_causal(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("gpu_bench")
    window = bench.masks.sliding_window(16)
    variants = [
        ("dense causal", bench.masks.causal(), flash.BlockSizes(16, 16)),
        ("sliding window", window, flash.BlockSizes(16, 16)),
        ("broken", window, flash.BlockSizes(16, 16)),
    ]
    monkeypatch.setattr(bench, "window_variants", lambda setup, inputs: variants)
    times = iter([8.0, 16.0, 2.0, 5.0])  # dense fwd, fwd_bwd; window fwd, fwd_bwd; then a failure

    def fake_time(step, inputs, repeats, calls):
        try:
            return next(times)
        except StopIteration:
            raise RuntimeError("compile failed") from None

    monkeypatch.setattr(bench, "time_call", fake_time)
    monkeypatch.setattr(bench, "lower_and_compile", lambda step, inputs: step)
    bench.window_diagnosis(bench.CPU_TINY)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    # 64 tokens on 16x16 tiles: causal lists 10 tiles (4 masked), the window of 16 lists 7 (7)
    assert rows[0] == "| dense causal | 10 | 4 | no | 8000.000 | 1.00x | 1.00 | 16000.000 | 1.00x | 1.00 |"
    assert rows[1] == "| sliding window | 7 | 7 | no | 2000.000 | 4.00x | 0.36 | 5000.000 | 3.20x | 0.45 |"
    assert rows[2].startswith("| broken | 7 | 7 | no | n/a (RuntimeError) |")


def _autotune(monkeypatch, tiny: bool = True):
    monkeypatch.setenv("JATTN_AUTOTUNE_TINY", "1" if tiny else "0")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.delitem(sys.modules, "autotune_flash", raising=False)
    return importlib.import_module("autotune_flash")


def test_autotune_backward_candidates_try_four_warps_and_every_smaller_step(monkeypatch):
    """On the H200 the fastest backward steps were neither the whole tile nor the smallest (head
    dim 128: 32 queries and 64 keys on 128x128 tiles), so the sweep tries each step below the tile,
    forward kv steps too; it tries 4 warps for the backward, as Pallas mha's fast backward runs on 4."""
    autotune = _autotune(monkeypatch, tiny=False)
    candidates = autotune.backward_candidates(flash.BlockSizes(128, 64, 4, 3))
    assert {(c.backward_q_step, c.backward_kv_step) for c in candidates} == {
        (q, kv) for q in (32, 64, 128) for kv in (32, 64)
    }
    assert {(c.backward_num_warps, c.backward_num_stages) for c in candidates} == {(4, 2), (8, 2), (8, 3)}
    assert all((c.block_q, c.block_kv, c.num_warps, c.num_stages) == (128, 64, 4, 3) for c in candidates)
    assert len(candidates) == 18
    forwards = autotune.forward_candidates(128, 128)
    assert {c.forward_kv_step for c in forwards} == {32, 64, 128} and len(forwards) == 12


def test_autotune_that_tunes_nothing_fails_and_says_why(monkeypatch, tmp_path, capsys):
    autotune = _autotune(monkeypatch)

    def fail(*args, **kwargs):
        raise RuntimeError("out of shared memory: 240 KiB asked")

    monkeypatch.setattr(autotune, "compile_candidate", fail)
    output = tmp_path / "block_sizes.json"
    monkeypatch.setattr(sys, "argv", ["autotune_flash.py", "--output", str(output)])
    assert autotune.main() == 1
    err = capsys.readouterr().err
    assert "out of shared memory: 240 KiB asked" in err and "no entry written for float32/16" in err
    assert not output.exists()


def test_autotune_stops_tuning_when_its_budget_is_spent(monkeypatch, tmp_path, capsys):
    autotune = _autotune(monkeypatch)
    output = tmp_path / "block_sizes.json"
    monkeypatch.setattr(sys, "argv", ["autotune_flash.py", "--output", str(output), "--budget-s", "0"])
    assert autotune.main() == 1
    assert "budget is spent" in capsys.readouterr().out and not output.exists()


def test_autotune_keeps_the_current_entry_unless_a_candidate_beats_it(monkeypatch, capsys):
    autotune = _autotune(monkeypatch)
    current = autotune.current_entry("float32", 16)
    monkeypatch.setattr(autotune, "compile_candidate", lambda sizes, **kwargs: sizes)  # "compiled": its sizes
    monkeypatch.setattr(autotune, "seconds_per_call", lambda sizes, inputs: 1.0 if sizes == current else 2.0)
    assert autotune.tune("float32", 16) == current
    monkeypatch.setattr(autotune, "seconds_per_call", lambda sizes, inputs: 2.0 if sizes == current else 1.0)
    assert autotune.tune("float32", 16) != current
    assert "float32 head_dim=16" in capsys.readouterr().out


def _autotune_cut_after(monkeypatch, autotune, tmp_path, seconds_of: list[float]):
    """Run the autotuner's main on "compiled" candidates (their sizes) timed ``seconds_of`` in
    turn, cut (the session's time limit) at the next timing: (sizes timed, the table's path)."""
    timed = []

    def seconds(sizes, inputs):
        timed.append(sizes)
        if len(timed) > len(seconds_of):
            raise KeyboardInterrupt
        return seconds_of[len(timed) - 1]

    monkeypatch.setattr(autotune, "compile_candidate", lambda sizes, **kwargs: sizes)
    monkeypatch.setattr(autotune, "seconds_per_call", seconds)
    output = tmp_path / "block_sizes.json"
    monkeypatch.setattr(sys, "argv", ["autotune_flash.py", "--output", str(output)])
    with pytest.raises(KeyboardInterrupt):
        autotune.main()
    return timed, output


def test_autotune_cut_short_keeps_the_fastest_candidate_it_timed(monkeypatch, tmp_path):
    """A GPU session's time can end mid-sweep (on an H200 the run of 2026-11-28 timed 76 of 86
    candidates of a pair and wrote nothing): each candidate faster than all timed before is
    written as soon as it is timed, even in the middle of a batch, with a source that says the
    sweep did not finish; the current entry, timed first, is not rewritten."""
    autotune = _autotune(monkeypatch)
    current = autotune.current_entry("float32", 16)

    def three_launches(forward):  # a backward batch of three candidates
        return [
            dataclasses.replace(forward, backward_num_warps=w, backward_num_stages=st)
            for w, st in ((4, 2), (8, 2), (8, 3))
        ]

    monkeypatch.setattr(autotune, "backward_candidates", three_launches)
    # the current entry, the first tile's forward, then its backward batch, cut in its middle
    timed, output = _autotune_cut_after(monkeypatch, autotune, tmp_path, [2.0, 0.5, 1.5, 1.0])
    assert timed[0] == current and len(timed) == 5
    table = json.loads(output.read_text())
    entry, source = table["triton"]["sm90"]["float32"]["16"], table["sources"]["triton/sm90"]["float32"]["16"]
    assert entry == dataclasses.asdict(timed[3]) and source.endswith("a sweep that did not finish")


def test_autotune_cut_before_any_candidate_wins_leaves_the_table_alone(monkeypatch, tmp_path):
    autotune = _autotune(monkeypatch)
    _, output = _autotune_cut_after(monkeypatch, autotune, tmp_path, [1.0, 2.0])  # the current entry wins
    assert not output.exists()


def test_autotune_tiny_mode_writes_a_table_the_kernel_reads(tmp_path, monkeypatch):
    output = tmp_path / "block_sizes.json"
    result = _run(
        [sys.executable, "benchmarks/autotune_flash.py", "--output", str(output)], "JATTN_AUTOTUNE_TINY"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads(output.read_text())
    tuned = table["triton"]["sm90"]["float32"]["16"]  # on CPU: the table of the default target
    current = _autotune(monkeypatch).current_entry("float32", 16)  # the table's, as the sweep timed it
    swept = (tuned["block_q"], tuned["block_kv"]) in {(16, 16), (32, 16)}
    swept &= (tuned["backward_num_warps"], tuned["backward_num_stages"]) == (4, 2)
    swept &= tuned["backward_q_step"] in {16, tuned["block_q"]} and tuned["backward_kv_step"] == 16
    assert swept or tuned == dataclasses.asdict(current)  # a candidate won, or the current entry stayed
    assert set(table["triton"]["sm90"]) == {"bfloat16", "float16", "float32"}  # entries not swept are kept
    assert set(table["triton"]) == set(flash.TRITON_TARGETS) and "mosaic_tpu" in table
    sources = table["sources"]["triton/sm90"]
    tuned_source = sources["float32"]["16"]
    assert "autotune_flash.py" in tuned_source and "did not finish" not in tuned_source  # a finished sweep
    assert output.stat().st_mode & 0o777 == 0o644  # written through a temporary file, readable by all
    assert "autotune_flash.py" not in sources["float32"]["64"]  # an entry not swept keeps its source


def test_every_table_entry_says_how_it_was_chosen():
    """Each (lowering, target, dtype, head dim) entry has its own source: a sweep of some head
    dims must not relabel the entries it did not time."""
    table = json.loads((ROOT / "src/jattn/kernels/block_sizes.json").read_text())
    for lowering in flash.LOWERINGS:
        for target, by_dtype in table[lowering].items():
            for dtype, by_dim in by_dtype.items():
                sources = table["sources"][f"{lowering}/{target}"][dtype]
                assert set(sources) == set(by_dim), (lowering, target, dtype)
                assert all(isinstance(text, str) and text for text in sources.values())


TABULATED = [
    (target, dtype, head_dim, precision)
    for target, by_dtype in flash.block_size_table()["triton"].items()
    for dtype, by_dim in by_dtype.items()
    for head_dim in by_dim
    for precision in ((None, "highest") if dtype == "float32" else (None,))
]


@pytest.mark.slow
@pytest.mark.parametrize(("target", "dtype", "head_dim", "precision"), TABULATED)
def test_tabulated_triton_sizes_fit_their_gpu_and_pipeline(target, dtype, head_dim, precision, monkeypatch):
    """Every kernel of every Triton table entry, compiled for its architecture by the ``triton``
    package (no GPU needed), fits that GPU's shared memory and pipelines its loads where it has
    more than one stage; float32 also with IEEE matmuls (precision "highest"), on the tiles
    ``IEEE_FLOAT32_MAX_TILES`` caps. The float32 / 256 entry for sm_90 once asked its dk/dv kernel
    for 256 KiB, so it would not have launched; the sm_90 entries asked an RTX 4090 (sm_89, 99 KiB)
    for up to 160 KiB; IEEE float32 at head dim 64 on sm_90 took 208 KiB and spilled 45 KB."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    static = importlib.import_module("triton_static")
    with jax.default_matmul_precision(precision):
        sizes = flash.tabulated_block_sizes("triton", dtype, head_dim, target)
        kernels = static.jattn_kernels(head_dim, True, sizes, 4096, jnp.dtype(dtype))
    assert sorted(kernels) == ["jattn_flash_dkv", "jattn_flash_dq", "jattn_flash_forward"]
    if dtype == "float32":  # TF32 dots at the default precision, IEEE under "highest"
        assert all(("tf32" in ir) == (precision is None) for ir in kernels.values())
    arch = int(target.removeprefix("sm"))
    for name, ir in kernels.items():
        warps, stages = static.launch_settings(sizes, name)
        compiled = static.compile_for(ir, warps, stages, arch=arch)
        # One stage (no pipelining) only as the rule's last resort: float32 / 256 on 99 KiB.
        assert compiled.launches and (compiled.pipelined or stages == 1), (name, compiled)


@pytest.mark.slow
def test_the_documented_rule_gives_the_tabulated_entry(monkeypatch):
    """``triton_static.choose`` (the rule of docs/flash.md) still picks what the table holds, here
    for bfloat16 at head dim 64 on a 99 KiB GPU (sm_86): table and rule cannot drift apart."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    static = importlib.import_module("triton_static")
    choice = static.choose(64, jnp.dtype(jnp.bfloat16), arch=86)
    assert choice.sizes == flash.lookup_block_sizes("triton", jnp.bfloat16, 64, "sm86")
    assert all(compiled.launches and compiled.pipelined for compiled in choice.facts.values())
