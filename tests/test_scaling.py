"""The scaling study: fits and crossovers on synthetic data with known answers, the guards
(time-out, memory budget, out of memory, unsupported lengths), resuming an interrupted sweep, and a
tiny end-to-end sweep with its report."""

import csv
import dataclasses
import math
import re
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jattn import masks, scaling
from jattn.train.config import ConfigError, apply_overrides
from jattn.train.schema import ModelConfig
from jattn.variants import Variant, get_variant, register_variant

TINY = dict(
    lengths=(16, 32, 64), passes=("forward",), num_heads=2, head_dim=8, warmup=1, repeats=2, fit_min_length=16
)


def entry(name, variant="full", **options):
    return scaling.VariantEntry(name, variant, options)


def config(tmp_path, variants, **overrides):
    return scaling.ScalingConfig(variants=tuple(variants), out_dir=str(tmp_path), **(TINY | overrides))


def by_point(rows):
    return {(row["name"], row["pass"], row["length"]): row for row in rows}


def csv_row(variant_entry, length, **columns):
    """A row as ``read_rows`` gives it: every column, None where not given."""
    return (
        {key: None for key in scaling.ROW_FIELDS}
        | {
            "level": "op",
            "name": variant_entry.name,
            "variant": variant_entry.variant,
            "options": variant_entry.options_json,
            "pass": "forward",
            "length": length,
            "status": scaling.OK,
            "detail": "",
            "backend": "cpu",
            "device_kind": "cpu",
            "jax_version": "0.0",
        }
        | columns
    )


# ---------------------------------------------------------------------------------------------
# Test variants that fail in known ways
# ---------------------------------------------------------------------------------------------


def _failing_variant(error_at: int, error: BaseException, max_len: int | None = None) -> Variant:
    """Full attention that raises ``error`` (at trace time) for lengths >= ``error_at``."""
    full = get_variant("full", implementation="xla")

    def fn(q, k, v, *, causal, params=None, key=None):
        if q.shape[1] >= error_at:
            raise error
        return full(q, k, v, causal=causal)

    return Variant("failing", fn, exact=False, max_len=max_len)


register_variant(
    "_test_oom",
    lambda: _failing_variant(32, jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")),
)
register_variant("_test_unsupported", lambda: _failing_variant(32, NotImplementedError("no such mask")))
register_variant("_test_bug", lambda: _failing_variant(32, TypeError("unsupported operand type(s) for +")))
register_variant("_test_max_len", lambda: _failing_variant(10**9, RuntimeError("never"), max_len=32))
register_variant("_test_interrupt", lambda: _failing_variant(64, KeyboardInterrupt()))


# ---------------------------------------------------------------------------------------------
# Analysis on synthetic data
# ---------------------------------------------------------------------------------------------

POWERS = [2**i for i in range(6, 15)]


@settings(deadline=None, max_examples=25)
@given(exponent=st.floats(0.3, 3.0), scale=st.floats(1e-6, 1e3))
def test_fit_recovers_a_power_law(exponent, scale):
    fit = scaling.fit_exponent({n: scale * n**exponent for n in POWERS}, min_length=64)
    assert fit.exponent == pytest.approx(exponent, abs=1e-9)
    assert fit(1000.0) == pytest.approx(scale * 1000.0**exponent, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)


def test_fit_skips_the_overhead_regime():
    # A constant overhead dominates the short lengths; the quadratic term the long ones.
    times = {n: 1.0 + 1e-6 * n**2 for n in POWERS}
    assert scaling.fit_exponent(times, min_length=64).exponent < 1.5
    late = scaling.fit_exponent(times, min_length=4096)
    assert late.lengths == (4096, 8192, 16384)
    assert late.exponent == pytest.approx(2.0, abs=0.05)


def test_fit_with_failed_long_lengths_uses_the_two_longest_measured():
    fit = scaling.fit_exponent({64: 1.0, 128: 2.0, 256: None, 512: None}, min_length=256)
    assert fit.lengths == (64, 128) and fit.exponent == pytest.approx(1.0)
    assert scaling.fit_exponent({64: 1.0, 128: None}, min_length=64) is None


def test_fit_leaves_out_points_that_are_not_finite():
    fit = scaling.fit_exponent({256: 1.0, 512: 4.0, 1024: float("inf"), 2048: float("nan")}, min_length=256)
    assert fit.lengths == (256, 512) and fit.exponent == pytest.approx(2.0)


@settings(deadline=None, max_examples=25)
@given(log2_cross=st.floats(6.5, 13.5))
def test_crossover_of_linear_against_quadratic(log2_cross):
    # full = L^2, variant = c·L: they cross at L = c, so the variant wins from the next power of two.
    cross = 2.0**log2_cross
    full = {n: float(n) ** 2 for n in POWERS}
    variant = {n: cross * n for n in POWERS}
    expected = min(n for n in POWERS if n > cross)
    assert scaling.crossover(full, variant) == expected


def test_crossover_needs_a_win_at_every_longer_length():
    full = {64: 1.0, 128: 2.0, 256: 4.0, 512: 8.0}
    assert scaling.crossover(full, {64: 2.0, 128: 1.0, 256: 5.0, 512: 7.0}) == 512
    assert scaling.crossover(full, {64: 0.5, 128: 1.0, 256: 2.0, 512: 4.0}) == 64
    assert scaling.crossover(full, {64: 0.5, 128: 1.0, 256: 2.0, 512: 9.0}) is None
    assert scaling.crossover({64: 1.0, 128: 2.0}, {64: 1.0, 128: 1.0}) == 128  # a tie is no win


def test_crossover_counts_a_failed_baseline_as_a_win():
    full = {64: 1.0, 128: 2.0, 256: math.inf, 512: math.inf}  # inf: failed for its cost
    assert scaling.crossover(full, {64: 3.0, 128: 4.0, 256: 5.0, 512: 6.0}) == 256
    # Where both failed there is no information: the last informative length decides.
    assert scaling.crossover(full, {64: 3.0, 128: 1.0, 256: math.inf, 512: None}) == 128
    assert scaling.crossover({64: 1.0, 128: 2.0}, {64: 3.0, 128: None}) is None


def test_crossover_does_not_count_a_baseline_that_did_not_run_as_a_win():
    # None: the baseline did not run (unsupported, error, skipped), which says nothing of its cost.
    assert scaling.crossover({64: 2.0, 128: None}, {64: 1.0, 128: 1.0}) is None
    assert scaling.crossover({64: 2.0, 128: None, 256: 8.0}, {64: 1.0, 128: 1.0, 256: 2.0}) == 256


@pytest.mark.parametrize(
    "status, detail, wins_from",
    [
        (scaling.TIMEOUT, "first call took 9 s", 32),
        (scaling.OOM, "skipped: out of memory at length 16", 32),
        (scaling.UNSUPPORTED, "NotImplementedError: no", None),
        (scaling.ERROR, "RuntimeError: bug", None),
        (scaling.SKIPPED, "above the entry's max_length=16", None),
    ],
)
def test_summarize_counts_only_a_baseline_failed_for_its_cost_as_a_win(tmp_path, status, detail, wins_from):
    full, linear = entry("full"), entry("linear", "linear")
    cfg = config(tmp_path, [full, linear], lengths=(16, 32))
    rows = [
        csv_row(full, 16, time_s=1.0, memory_bytes=10.0),
        csv_row(full, 32, status=status, detail=detail),
        csv_row(linear, 16, time_s=2.0, memory_bytes=20.0),
        csv_row(linear, 32, time_s=2.0, memory_bytes=20.0),
    ]
    (summary,) = [s for s in scaling.summarize(rows, cfg) if s.name == "linear"]
    assert summary.faster_from == summary.smaller_from == summary.wins_from == wins_from


def test_summarize_on_synthetic_rows(tmp_path):
    cfg = config(tmp_path, [entry("full"), entry("linear")], lengths=tuple(POWERS), fit_min_length=512)

    def row(name, n, time_s, memory):
        return (
            {"level": "op", "name": name, "variant": "full", "options": "{}", "pass": "forward", "length": n}
            | {"status": scaling.OK},
            time_s,
            memory,
        )

    rows = []
    for n in POWERS:
        for name, time_s, memory in (("full", 1e-8 * n**2, 4.0 * n**2), ("linear", 1e-5 * n, 64e3 * n)):
            base, t, m = row(name, n, time_s, memory)
            rows.append(base | {"time_s": t, "cpu_time_s": t, "memory_bytes": m})
    summaries = {s.name: s for s in scaling.summarize(rows, cfg) if s.pass_name == "forward"}
    assert summaries["full"].time_fit.exponent == pytest.approx(2.0)
    assert summaries["linear"].memory_fit.exponent == pytest.approx(1.0)
    assert summaries["linear"].faster_from == 1024  # 1e-8 n² > 1e-5 n for n > 1000
    assert summaries["linear"].smaller_from == 16384  # 4 n² > 64e3 n for n > 16000
    assert summaries["linear"].wins_from == 16384
    assert summaries["full"].faster_from is None


def test_rows_of_other_options_or_lengths_stay_out_of_the_analysis(tmp_path):
    # An earlier sweep into the same CSV measured "local" with window 16 and a length since dropped.
    full, old, new = entry("full"), entry("local", "local", window=16), entry("local", "local", window=32)
    cfg = config(tmp_path, [full, new], lengths=(16, 32))
    rows = [csv_row(full, n, time_s=1e-6 * n**2, memory_bytes=n**2) for n in (16, 32, 64)]
    rows += [csv_row(new, n, time_s=1e-6 * n, memory_bytes=n) for n in (16, 32)]
    rows += [
        csv_row(old, 16, time_s=1.0, memory_bytes=1.0),
        csv_row(old, 32, status=scaling.OOM, detail="the old window's failure"),
    ]
    summaries = {s.name: s for s in scaling.summarize(rows, cfg)}
    assert summaries["full"].time_fit.lengths == summaries["local"].time_fit.lengths == (16, 32)
    assert summaries["local"].time_fit.exponent == pytest.approx(1.0)
    scaling.write_report(cfg, rows)
    report = (tmp_path / "scaling.md").read_text()
    assert "| local | 0.016 | 0.032 |" in report  # window 32's times (ms), not window 16's
    assert "the old window's failure" not in report and "| 64 |" not in report
    current = scaling.current_rows(rows, cfg)
    assert {(row["name"], row["options"], row["length"]) for row in current} == {
        ("full", "{}", 16),
        ("full", "{}", 32),
        ("local", '{"window": 32}', 16),
        ("local", '{"window": 32}', 32),
    }


def test_predict_time():
    assert scaling.predict_time({}, 128) is None
    assert scaling.predict_time({64: 1.0}, 128) == pytest.approx(4.0)  # slope 2 from one point
    assert scaling.predict_time({64: 1.0, 128: 8.0}, 256) == pytest.approx(64.0)  # slope 3
    assert scaling.predict_time({64: 1.0, 128: 1.01}, 256) == pytest.approx(2.02)  # clamped to slope 1
    assert scaling.predict_time({64: 1.0, 128: 32.0}, 256) == pytest.approx(256.0)  # slope 5 clamped to 3


# ---------------------------------------------------------------------------------------------
# Measurement and guards
# ---------------------------------------------------------------------------------------------


class FakeClock:
    """Each call to the measured function advances time by ``cost`` seconds."""

    def __init__(self, cost):
        self.now, self.cost, self.calls = 0.0, cost, 0

    def clock(self):
        return self.now

    def time_calls(self, **kwargs):
        return scaling.time_calls(self.call, clock=self.clock, cpu_clock=self.clock, **kwargs)

    def call(self):
        self.now += self.cost
        self.calls += 1
        return np.zeros(())


def test_time_calls_stops_after_an_over_budget_call():
    fake = FakeClock(cost=5.0)
    timing = fake.time_calls(warmup=2, repeats=5, budget_s=1.0)
    assert timing.over_budget and timing.times == timing.cpu_times == (5.0,) and fake.calls == 1


def test_time_calls_cuts_repeats_to_the_budget():
    fake = FakeClock(cost=1.0)
    timing = fake.time_calls(warmup=2, repeats=10, budget_s=6.5)
    assert not timing.over_budget
    assert len(timing.times) == 4 and fake.calls == 6  # 2 warm-up + 4 within the budget
    fake = FakeClock(cost=1.0)
    assert len(fake.time_calls(warmup=1, repeats=3, budget_s=100).times) == 3


def test_attended_pairs_match_the_dense_mask():
    for mask in (masks.causal(), masks.sliding_window(40, 40), masks.strided(32), masks.sliding_window(7)):
        expected = int(np.count_nonzero(mask.dense(1100, 1100)))
        assert scaling.attended_pairs(mask, 1100, 1100) == expected
    assert scaling.attended_pairs(None, 100, 30) == 3000


def test_analytic_flops_agree_with_xla_for_full_attention(tmp_path):
    cfg = config(tmp_path, [entry("full", implementation="xla")])
    variant = get_variant("full", implementation="xla")
    for pass_name in scaling.PASSES:
        step = scaling._op_step(variant, cfg, 128, pass_name)
        xla = scaling.compiled_flops(jax.jit(step.fn).lower(*step.args).compile())
        assert step.analytic_flops == pytest.approx(xla, rel=0.35)


def test_forward_backward_returns_the_output_so_every_implementation_computes_it(tmp_path):
    """Without the output XLA dropped P·V from autodiff implementations but not from chunked."""
    cfg = config(tmp_path, [entry("full", implementation="xla")])
    variant = get_variant("full", implementation="xla")
    forward = scaling._op_step(variant, cfg, 64, "forward")
    out, grads = scaling._op_step(variant, cfg, 64, "forward_backward").fn(
        *forward.args[:4], None, forward.args[0]
    )
    np.testing.assert_allclose(out, forward.fn(*forward.args), atol=1e-6)
    assert len(grads) == 4


def test_a_sweep_saves_its_resolved_config(tmp_path):
    cfg = config(tmp_path, [entry("full")], lengths=(16,))
    scaling.run_sweep(cfg, progress=False)
    assert scaling.load_config(tmp_path / "config.yaml") == cfg


def test_guards_record_failures_and_skip_longer_lengths(tmp_path, capsys):
    variants = [
        entry("full", implementation="xla"),
        entry("oom", "_test_oom"),
        entry("unsupported", "_test_unsupported"),
        entry("max_len", "_test_max_len"),
        scaling.VariantEntry("capped", "full", {"implementation": "xla"}, max_length=16),
        entry("bug", "_test_bug"),
        entry("linformer", "linformer", projected_len=32),
    ]
    rows = by_point(scaling.run_sweep(config(tmp_path, variants), progress=False))
    assert len(rows) == 21
    assert [rows[("capped", "forward", n)]["status"] for n in (16, 32, 64)] == [scaling.OK] + [
        scaling.SKIPPED
    ] * 2
    assert rows[("full", "forward", 64)]["status"] == scaling.OK
    assert rows[("oom", "forward", 16)]["status"] == scaling.OK
    assert rows[("oom", "forward", 32)]["status"] == scaling.OOM
    assert "RESOURCE_EXHAUSTED" in rows[("oom", "forward", 32)]["detail"]
    assert rows[("oom", "forward", 64)]["status"] == scaling.OOM
    assert rows[("oom", "forward", 64)]["detail"] == "skipped: out of memory at length 32"
    assert [rows[("unsupported", "forward", n)]["status"] for n in (16, 32, 64)] == [
        scaling.OK,
        scaling.UNSUPPORTED,
        scaling.UNSUPPORTED,
    ]
    assert rows[("max_len", "forward", 32)]["status"] == scaling.OK
    assert "max_len=32" in rows[("max_len", "forward", 64)]["detail"]
    # A TypeError is a bug, not a limit of the variant: an error, measured at the longer lengths too.
    assert [rows[("bug", "forward", n)]["status"] for n in (16, 32, 64)] == [scaling.OK] + [scaling.ERROR] * 2
    assert "TypeError: unsupported operand" in rows[("bug", "forward", 32)]["detail"]
    # Linformer needs at least projected_len positions (its min_len): unsupported below, by the check.
    below = rows[("linformer", "forward", 16)]
    assert below["status"] == scaling.UNSUPPORTED and "below the variant's min_len=32" in below["detail"]
    assert rows[("linformer", "forward", 32)]["status"] == scaling.OK
    # The sweep prints every failure, unsupported ones included, but not the skips they cause.
    out = capsys.readouterr().out
    assert "unsupported forward L=32: unsupported (NotImplementedError: no such mask)" in out
    assert "bug forward L=64: error (TypeError" in out and "linformer forward L=16: unsupported" in out
    assert "oom forward L=32: oom" in out and "L=64: oom" not in out and "capped" not in out


def test_time_and_memory_budgets(tmp_path):
    cfg = config(tmp_path / "time", [entry("full", implementation="xla")], time_budget_s=1e-9)
    rows = by_point(scaling.run_sweep(cfg, progress=False))
    first = rows[("full", "forward", 16)]
    assert (
        first["status"] == scaling.TIMEOUT and first["time_s"] > 1e-9 and "first call took" in first["detail"]
    )
    assert rows[("full", "forward", 32)]["detail"] == "skipped: over the time budget at length 16"

    cfg = config(tmp_path / "memory", [entry("full", implementation="xla")], memory_budget_gb=40e3 / 2**30)
    rows = scaling.run_sweep(cfg, progress=False)
    assert rows[0]["status"] == scaling.OK  # 16 x 16 scores fit in 40 kB, 64 x 64 do not
    assert rows[-1]["status"] == scaling.OVER_MEMORY
    first_over = next(row for row in rows if row["status"] == scaling.OVER_MEMORY)
    assert "compiled step needs" in first_over["detail"] and first_over["time_s"] is None
    assert first_over["memory_bytes"] > 40e3 > rows[0]["memory_bytes"]


def test_a_prediction_over_the_budget_is_a_timeout_without_running(tmp_path):
    cfg = config(tmp_path, [entry("full")], time_budget_s=1.0)
    step = scaling._op_step(get_variant("full"), cfg, 16, "forward")
    row = scaling.measure(step, cfg, predicted_s=3.0)
    assert row["status"] == scaling.TIMEOUT and "predicted 3 s" in row["detail"]


def test_an_interrupted_sweep_keeps_its_rows_and_resumes(tmp_path):
    interrupting = config(tmp_path, [entry("full", implementation="xla"), entry("late", "_test_interrupt")])
    with pytest.raises(KeyboardInterrupt):
        scaling.run_sweep(interrupting, progress=False)
    kept = scaling.read_rows(tmp_path / "scaling.csv")
    assert len(kept) == 3 + 2  # full: 3 lengths; late: 16 and 32
    resumed = config(tmp_path, [entry("full", implementation="xla"), entry("late", "full")])
    # Same name, other variant: a different curve, so its rows are measured anew.
    rows = scaling.run_sweep(resumed, progress=False)
    assert len(rows) == 5 + 3
    assert rows[:5] == kept  # nothing measured twice, nothing rewritten
    again = scaling.run_sweep(resumed, progress=False)
    assert again == rows


def test_resuming_another_setup_is_refused(tmp_path):
    scaling.run_sweep(config(tmp_path, [entry("full")], lengths=(16,)), progress=False)
    with pytest.raises(ValueError, match="head_dim: 8 there, 16 here"):
        scaling.run_sweep(config(tmp_path, [entry("full")], lengths=(16,), head_dim=16), progress=False)
    fresh = config(tmp_path, [entry("full")], lengths=(16,), head_dim=16, resume=False)
    assert len(scaling.run_sweep(fresh, progress=False)) == 1


def test_an_unfinished_last_row_is_cut_off_and_measured_again(tmp_path, capsys):
    cfg = config(tmp_path, [entry("full", implementation="xla")], lengths=(16, 32))
    scaling.run_sweep(cfg, progress=False)
    path = tmp_path / "scaling.csv"
    # Killed while writing the second row: its last fields and the newline never reached the disk.
    text = path.read_text()
    path.write_text(text[: len(text) - 12])
    assert [row["length"] for row in scaling.read_rows(path)] == [16]  # not a finished row with cut digits
    assert len(scaling.pending(cfg, scaling.read_rows(path))) == 1
    rows = scaling.run_sweep(cfg, progress=False)
    err = capsys.readouterr().err
    assert f"warning: {path}: cut off an unfinished last row" in err and "op,full," in err
    assert [(row["length"], row["status"]) for row in rows] == [(16, scaling.OK), (32, scaling.OK)]
    with path.open(newline="") as f:
        assert [len(fields) for fields in csv.reader(f)] == [len(scaling.ROW_FIELDS)] * 3


def test_read_rows_leaves_out_malformed_rows(tmp_path, capsys):
    path = tmp_path / "scaling.csv"
    full = entry("full")
    for length in (16, 32, 64):
        scaling.append_row(path, csv_row(full, length, time_s=0.5))
    lines = path.read_text().splitlines()
    # Row 16 cut off and run into row 32 (what an appended row did after a kill), row 64 lost its status.
    joined = lines[1][:-5] + lines[2]
    no_status = lines[3].replace(",ok,", ",,")
    path.write_text("\n".join([lines[0], joined, no_status, lines[1], ""]))
    assert [row["length"] for row in scaling.read_rows(path)] == [16]
    scaling.repair_csv(path)
    assert f"warning: {path}: malformed rows left out (field count or status): lines [2, 3]" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "status, recorded, now, again",
    [
        (scaling.TIMEOUT, dict(time_budget_s=1.0), dict(time_budget_s=30.0), True),
        (scaling.TIMEOUT, dict(time_budget_s=30.0), dict(time_budget_s=30.0), False),
        (scaling.TIMEOUT, dict(time_budget_s=None), dict(time_budget_s=30.0), False),  # not recorded
        (scaling.OVER_MEMORY, dict(memory_budget_gb=1.0), dict(memory_budget_gb=2.0), True),
        (
            scaling.OVER_MEMORY,
            dict(memory_budget_gb=1.0, time_budget_s=1.0),
            dict(memory_budget_gb=1.0, time_budget_s=9.0),
            False,
        ),
        (scaling.SKIPPED, {}, dict(max_length=None), True),
        (scaling.SKIPPED, {}, dict(max_length=16), False),
        (scaling.ERROR, {}, {}, True),
        (scaling.OOM, {}, {}, False),
        (scaling.UNSUPPORTED, {}, {}, False),
        (scaling.OK, dict(time_budget_s=1.0), dict(time_budget_s=30.0), False),
    ],
)
def test_rows_decided_by_a_raised_limit_or_an_error_are_pending(tmp_path, status, recorded, now, again):
    max_length = now.pop("max_length", None)
    full = scaling.VariantEntry("full", "full", max_length=max_length)
    cfg = config(tmp_path, [full], lengths=(16, 32), **now)
    rows = [csv_row(full, 16), csv_row(full, 32, status=status, detail="skipped: whatever", **recorded)]
    assert [point.length for point in scaling.pending(cfg, rows)] == ([32] if again else [])
    assert sum(scaling.redone(cfg, rows).values()) == int(again)


def test_a_raised_budget_measures_its_timeouts_again_and_the_new_rows_count(tmp_path, capsys):
    tight = config(tmp_path, [entry("full", implementation="xla")], lengths=(16, 32), time_budget_s=1e-9)
    assert [row["status"] for row in scaling.run_sweep(tight, progress=False)] == [scaling.TIMEOUT] * 2
    rows = scaling.run_sweep(dataclasses.replace(tight, time_budget_s=30.0), progress=False)
    assert "measuring 2 row(s) of" in capsys.readouterr().out
    assert [(row["length"], row["status"], row["time_budget_s"]) for row in rows] == [
        (16, scaling.OK, 30.0),
        (32, scaling.OK, 30.0),
    ]
    assert len((tmp_path / "scaling.csv").read_text().splitlines()) == 1 + 4  # appended; the latest count


def test_resuming_another_vocabulary_is_refused(tmp_path):
    model_level = dict(levels=("model",), vocab_size=64)
    cfg = config(tmp_path, [entry("full")], **model_level)
    path = tmp_path / "scaling.csv"
    setup = cfg.setup("model")
    scaling.append_row(path, csv_row(entry("full"), 16, level="model", **setup | {"vocab_size": "32"}))
    with pytest.raises(ConfigError, match="vocab_size: 32 there, 64 here"):
        scaling.check_sweep(cfg)
    # Model-level rows of a CSV begun before the column existed do not record it: not compared.
    path.unlink()
    old_fields = [field for field in scaling.ROW_FIELDS if field != "vocab_size"]
    path.write_text(",".join(old_fields) + "\n")
    scaling.append_row(path, csv_row(entry("full"), 16, level="model", **setup))
    assert len(scaling.check_sweep(cfg)) == 1


def test_adding_a_level_resumes_the_rows_of_the_other(tmp_path):
    full = entry("full")
    op_only = config(tmp_path, [full], lengths=(16,))
    path = tmp_path / "scaling.csv"
    scaling.append_row(path, csv_row(full, 16, **op_only.setup("op")))
    both = config(tmp_path, [full], lengths=(16,), levels=("op", "model"))
    assert [point.level for point in scaling.pending(both, scaling.check_sweep(both))] == ["model"]
    # The model's settings are compared between model-level rows only.
    scaling.append_row(path, csv_row(full, 16, level="model", **both.setup("model")))
    wider = dataclasses.replace(both, model=ModelConfig(width=32))
    with pytest.raises(ConfigError, match='model: .*"width": 64.* there, .*"width": 32'):
        scaling.check_sweep(wider)


def test_linformer_projections_are_built_for_the_measured_length(tmp_path):
    cfg = config(tmp_path, [entry("full")])
    variant = get_variant("linformer", projected_len=8, max_len=4096)
    step = scaling._op_step(variant, cfg, 64, "forward")
    params = step.args[3]
    assert params["proj_k"].shape == params["proj_v"].shape == (64, 8)  # not (max_len, 8)


def test_a_new_entry_under_an_old_name_is_not_guarded_by_the_old_rows(tmp_path):
    scaling.run_sweep(
        config(tmp_path, [entry("full", implementation="xla"), entry("x", "_test_oom")]), progress=False
    )
    # The same name, now full attention: the old variant's out of memory at 32 must not skip 64.
    cfg = config(tmp_path, [entry("full", implementation="xla"), entry("x", "full", implementation="xla")])
    rows = scaling.run_sweep(cfg, progress=False)
    assert len(rows) == 3 + 3 + 3  # the old entry's rows stay in the CSV (a resume of its config)
    new = by_point(row for row in rows if row["variant"] == "full")
    assert [new[("x", "forward", n)]["status"] for n in (16, 32, 64)] == [scaling.OK] * 3
    scaling.write_report(cfg, rows)
    assert "RESOURCE_EXHAUSTED" not in (tmp_path / "scaling.md").read_text()


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"variants\[fast\]\.variant must be a registered variant.*'local'"):
        scaling.VariantEntry("fast", "no_such_variant")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(width=3), r"variants\[local\].*takes no option"),
        (
            dict(implementation="nope"),
            r"variants\[local\]: implementation must be one of \[.*'xla'.*got 'nope'",
        ),
    ],
)
def test_bad_option_is_reported_before_the_sweep(tmp_path, options, message):
    cfg = config(tmp_path, [entry("full"), entry("local", "local", **options)])
    with pytest.raises(ConfigError, match=message):
        scaling.run_sweep(cfg, progress=False)
    assert not (tmp_path / "scaling.csv").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lengths=(16, 0)), "lengths must be a non-empty list of positive integers"),
        (dict(lengths=(16, 32.0)), "lengths must be"),
        (dict(lengths=()), "lengths must be"),
        (dict(passes=("backward",)), "passes must be"),
        (dict(baseline="dense"), "baseline must be one of the variant names"),
        (dict(num_kv_heads=3), "num_kv_heads must be a positive divisor of num_heads=2"),
        (dict(dtype="float8"), "dtype must be one of"),
        (dict(time_budget_s=0), "time_budget_s must be a positive number"),
        (dict(warmup=0), "warmup must be a positive integer"),
    ],
)
def test_config_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, [entry("full")], **overrides)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_tiny_sweep_end_to_end(tmp_path):
    variants = [
        entry("full", implementation="xla"),
        entry("local_8", "local", window=8, implementation="xla"),
    ]
    cfg = config(tmp_path, variants, lengths=(32, 64), passes=scaling.PASSES)
    rows = scaling.run_sweep(cfg, progress=False)
    assert len(rows) == 2 * 2 * 2 and all(row["status"] == scaling.OK for row in rows)
    for row in rows:
        assert (
            row["time_s"] > 0 and row["memory_bytes"] > 0 and row["xla_flops"] > 0 and row["matmul_flops"] > 0
        )
        assert row["tokens_per_s"] == pytest.approx(row["length"] / row["time_s"])
        assert row["analytic_flops"] > 0 and row["backend"] == jax.default_backend() and row["load_avg"] >= 0
    full_fwd = by_point(rows)[("full", "forward", 64)]
    assert full_fwd["analytic_flops"] == 2 * 2 * 64 * 64 * (8 + 8) == full_fwd["matmul_flops"]
    written = scaling.write_report(cfg, command="python experiments/scaling.py tiny.yaml")
    assert [p.name for p in written] == ["scaling.md", "time_op.png", "memory_op.png"]
    assert all(p.stat().st_size > 0 for p in written)
    report = (tmp_path / "scaling.md").read_text()
    assert "| op | forward | local_8 |" in report and "python experiments/scaling.py tiny.yaml" in report
    assert math.isfinite(float(report.split("| op | forward | full | ")[1].split(" ")[0]))
    assert f"Machine: {scaling.machine_description()}." in report
    # Rerun with other settings: nothing is measured again, so the report still states the rows' own.
    rerun = dataclasses.replace(cfg, repeats=9, warmup=4, time_budget_s=99.0, memory_budget_gb=2.0)
    assert scaling.run_sweep(rerun, progress=False) == rows
    scaling.write_report(rerun)
    report = (tmp_path / "scaling.md").read_text()
    assert "Time: median of up to 2 calls after 1 warm-up call(s), budget 30 s per call;" in report
    assert "timed calls per measurement: 2 (`repeats`)" in report and "budget 4 GiB." in report
    assert "up to 9" not in report and "99 s" not in report


def test_report_header_states_the_settings_recorded_with_the_rows(tmp_path):
    full = entry("full")
    cfg = config(tmp_path, [full], lengths=(16, 32))
    recorded = dict(warmup=1.0, max_repeats=2.0, time_budget_s=5.0, memory_budget_gb=1.0, repeats="2")
    recorded |= dict(machine="gpu backend, 1 × H100", cpu_cores=16.0, load_avg=3.0)
    rows = [
        csv_row(full, 16, **recorded),
        csv_row(full, 32, **recorded | {"max_repeats": 5.0, "repeats": "5"}),
    ]
    report = scaling.markdown_report(rows, scaling.summarize(rows, cfg), cfg)
    assert "Machine: gpu backend, 1 × H100." in report
    assert (
        "Time: differs between rows: median of up to 2 calls after 1 warm-up call(s), budget 5 s per call "
        "(1 row); median of up to 5 calls after 1 warm-up call(s), budget 5 s per call (1 row); timed calls "
        "per measurement: 2 to 5 (`repeats`)."
    ) in report
    assert "budget 1 GiB." in report and "3.0 to 3.0 on 16 cores, the sweep's own threads" in report


def test_report_of_a_csv_without_the_settings_columns_says_they_are_not_recorded(tmp_path):
    path = tmp_path / "scaling.csv"
    new_fields = scaling._SETTING_FIELDS + scaling._MACHINE_FIELDS
    path.write_text(",".join(field for field in scaling.ROW_FIELDS if field not in new_fields) + "\n")
    full = entry("full")
    scaling.append_row(path, csv_row(full, 16, repeats="3", load_avg=1.0, machine="not written", warmup=1))
    (row,) = scaling.read_rows(path)
    assert all(row[field] is None for field in new_fields)
    cfg = config(tmp_path, [full], lengths=(16,))
    report = scaling.markdown_report([row], scaling.summarize([row], cfg), cfg)
    assert "Machine: cpu backend, cpu, jax 0.0 (device count and CPU cores not recorded)." in report
    assert (
        "Time: warm-up calls, repeats and time budget not recorded; timed calls per measurement: 3" in report
    )
    assert "budget not recorded." in report and "do not record one core count" in report


# ---------------------------------------------------------------------------------------------
# YAML configs and the command line
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cpu.yaml", "cpu_model.yaml", "gpu.yaml"])
def test_shipped_configs_load(name):
    cfg = scaling.load_config(REPO / "configs" / "scaling" / name)
    assert cfg.baseline == "full" and max(cfg.lengths) >= 16384
    scaling.build_variants(cfg)  # every entry names a registered variant with valid options


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lenghts=[16]"], r"unknown config key\(s\) \['lenghts'\]"),
        (["causal=1"], "config key 'causal': expected true or false, got 1"),
        (
            ["variants=[{name: a, variant: full, opts: {}}]"],
            r"unknown config key\(s\) \['variants\[0\].opts'\]",
        ),
        (["lengths=16"], "config key 'lengths': expected a list of int, got 16"),
        (["lengths=[16, -1]"], "lengths must be a non-empty list of positive integers, got \\[-1\\]"),
        (["repeats"], "must look like key.sub=value"),
    ],
)
def test_bad_yaml_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        scaling.load_config(REPO / "configs" / "scaling" / "cpu.yaml", overrides)


def test_overrides_index_lists():
    cfg = scaling.load_config(
        REPO / "configs" / "scaling" / "cpu.yaml",
        [
            "variants.0.options.implementation=chunked",
            "variants.6.options={feature_map: elu}",
            "variants.1.name=c",
        ],
    )
    assert cfg.variants[0] == scaling.VariantEntry("full", "full", {"implementation": "chunked"})
    assert cfg.variants[6].options == {"feature_map": "elu"} and cfg.variants[1].name == "c"


@pytest.mark.parametrize(
    "override, message",
    [
        ("variants.x.name=a", "'variants' is a list of 2 item(s), so 'x' must be an integer index"),
        ("variants.-1.name=a", "'variants' is a list of 2 item(s), so '-1' must be an integer index"),
        ("variants.2.name=a", "index 2 is out of range for 'variants', a list of 2 item(s)"),
        ("variants.2=a", "index 2 is out of range for 'variants', a list of 2 item(s)"),
        ("variants.0.options.x.y=1", "'variants.0.options.x' is not a mapping or a list"),
    ],
)
def test_bad_list_overrides_name_the_key(override, message):
    data = {"variants": [{"name": "full", "options": {"x": 1}}, {"name": "local"}]}
    with pytest.raises(ConfigError, match=re.escape(f"override {override!r}: {message}")):
        apply_overrides(data, [override])


def test_overrides_reach_nested_keys():
    cfg = scaling.load_config(
        REPO / "configs" / "scaling" / "cpu.yaml",
        ["lengths=[16, 32]", "model.width=32", "time_budget_s=2.5", "variants=[{name: full, variant: full}]"],
    )
    assert cfg.lengths == (16, 32) and cfg.time_budget_s == 2.5 and cfg.model.width == 32
    assert cfg.variants == (scaling.VariantEntry("full", "full"),)


@pytest.mark.slow  # ~30 s: the model's eager initialisation and the AdamW step's compilation
def test_model_level_times_a_training_step(tmp_path):
    cfg = config(
        tmp_path,
        [entry("full")],
        levels=("model",),
        lengths=(16,),
        passes=scaling.PASSES,
        model=ModelConfig(width=16, depth=1, num_heads=2, mlp_dim=32),
        vocab_size=32,
    )
    forward, train_step = scaling.run_sweep(cfg, progress=False)
    assert forward["status"] == train_step["status"] == scaling.OK
    assert train_step["xla_flops"] > 2 * forward["xla_flops"]  # backward and the AdamW update
    assert train_step["memory_bytes"] > forward["memory_bytes"]  # optimizer state and gradients
    assert '"width": 16' in forward["model"]


def test_command_line_smoke(tmp_path):
    overrides = [
        f"out_dir={tmp_path}",
        "lengths=[16, 32]",
        "passes=[forward]",
        "variants=[{name: full, variant: full}, {name: linear, variant: linear}]",
    ]
    done = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "scaling.py"), "configs/scaling/cpu.yaml", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and len(scaling.read_rows(tmp_path / "scaling.csv")) == 4
    assert (tmp_path / "time_op.png").exists() and (tmp_path / "scaling.md").exists()


def script_main():
    return runpy.run_path(str(REPO / "experiments" / "scaling.py"))["main"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["configs/scaling/cpu.yaml", "lenghts=[16]"], r"unknown config key\(s\) \['lenghts'\]"),
        (["configs/scaling/cpu.yaml", "lengths=[16, 0]"], "lengths must be a non-empty list of positive"),
        (
            ["configs/scaling/cpu.yaml", "variants.0.variant=nope"],
            r"variants\[full\]\.variant must be a registered",
        ),
        (["configs/scaling/cpu.yaml", "variants.0.options.width=3"], r"variants\[full\]: .*takes no option"),
        (
            ["configs/scaling/cpu.yaml", "variants.1.options.implementation=nope"],
            r"variants\[chunked\]: implementation must be one of .* got 'nope'",
        ),
        (["configs/scaling/cpu.yaml", "variants.9.name=x"], "index 9 is out of range for 'variants'"),
        (["configs/scaling/no_such.yaml"], "config file 'configs/scaling/no_such.yaml' does not exist"),
    ],
)
def test_command_line_config_errors_exit_2_naming_the_key(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert script_main()([*args, f"out_dir={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and re.search(message, err) and "Traceback" not in err + out
    assert not list(tmp_path.iterdir())


def test_command_line_out_dir_that_cannot_be_created(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "afile").write_text("")
    assert script_main()(["configs/scaling/cpu.yaml", f"out_dir={tmp_path}/afile/sub"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: scaling config: out_dir='{tmp_path}/afile/sub' cannot be created")
    assert "Traceback" not in err + out and "measurements to run" not in out


def test_a_leading_tilde_in_out_dir_is_the_home_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "afile").write_text("")
    assert script_main()(["configs/scaling/cpu.yaml", "out_dir=~/afile/sub"]) == 2
    assert capsys.readouterr().err.startswith(f"error: scaling config: out_dir='{tmp_path}/afile/sub' cannot")


def test_a_csv_that_is_not_a_sweeps_is_refused_before_measuring(tmp_path, capsys):
    """Rows appended under another header lost their columns: the sweep measured, and discarded."""
    (tmp_path / "scaling.csv").write_text("hello,world\n1,2\n")
    cfg = REPO / "configs" / "scaling" / "cpu.yaml"
    assert script_main()([str(cfg), f"out_dir={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    assert "scaling.csv is not a scaling sweep's CSV: its header lacks ['level', 'name'" in err
    assert "measurements to run" not in out
    assert (tmp_path / "scaling.csv").read_text() == "hello,world\n1,2\n"


def test_command_line_checks_the_setup_before_counting(tmp_path, capsys):
    cfg = REPO / "configs" / "scaling" / "cpu.yaml"
    setup = scaling.load_config(cfg).setup("op") | {"head_dim": "8"}
    scaling.append_row(tmp_path / "scaling.csv", csv_row(entry("full"), 256, **setup))
    assert script_main()([str(cfg), f"out_dir={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    assert "holds results of another setup (head_dim: 8 there, 64 here" in err
    assert "measurements to run" not in out


def test_command_line_counts_what_remains_to_measure(tmp_path, capsys):
    cfg = REPO / "configs" / "scaling" / "cpu.yaml"
    tiny = [
        f"out_dir={tmp_path}",
        "lengths=[16]",
        "passes=[forward]",
        "variants=[{name: full, variant: full}]",
    ]
    main = script_main()
    assert main([str(cfg), *tiny, "variants.0.options={implementation: xla}"]) == 0
    assert (
        f"scaling: 1 of 1 measurements to run, 0 already in {tmp_path / 'scaling.csv'};"
        in capsys.readouterr().out
    )
    assert main([str(cfg), *tiny, "variants.0.options.implementation=chunked"]) == 0
    assert "scaling: 1 of 1 measurements to run, 0 already in" in capsys.readouterr().out
    assert main([str(cfg), *tiny, "variants.0.options.implementation=chunked"]) == 0
    assert "scaling: 0 of 1 measurements to run, 1 already in" in capsys.readouterr().out
    rows = scaling.read_rows(tmp_path / "scaling.csv")
    assert [row["options"] for row in rows] == ['{"implementation": "xla"}', '{"implementation": "chunked"}']


def test_command_line_stopped_by_ctrl_c_says_the_sweep_resumes(tmp_path, capsys, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(scaling, "run_sweep", interrupted)
    args = ["configs/scaling/cpu.yaml", f"out_dir={tmp_path}", "lengths=[16]"]
    assert script_main()(args) == 130
    expected = (
        f"stopped: the measurements made are kept in {tmp_path / 'scaling.csv'}; the same command resumes"
    )
    assert expected in capsys.readouterr().err


def test_load_note_says_whether_other_processes_competed():
    assert "no other process competed" in scaling.load_note(0.9, 1.9, 2)
    assert "no other process competed" in scaling.load_note(1.5, 2.02, 2)  # printed as 2.0
    assert "other processes competed for the cores: wall times are inflated" in scaling.load_note(1.0, 3.4, 2)


@pytest.mark.slow  # 24 s: a regression test of an XLA:CPU deadlock
def test_model_level_performer_training_step_runs_repeatedly(tmp_path):
    """Regression: a training step whose Performer features took a batched QR (128 features of
    head dim 64: two orthogonal blocks) deadlocked XLA:CPU from its second call. Run in a
    subprocess so that a hang fails the test instead of stalling the suite."""
    overrides = [
        f"out_dir={tmp_path}",
        "lengths=[64]",
        "passes=[forward_backward]",
        "repeats=3",
        "variants=[{name: full, variant: full}, {name: performer, variant: performer, "
        "options: {num_features: 128}}]",
    ]
    script = [sys.executable, str(REPO / "experiments" / "scaling.py"), "configs/scaling/cpu_model.yaml"]
    done = subprocess.run([*script, *overrides], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    rows = scaling.read_rows(tmp_path / "scaling.csv")
    assert [(row["name"], row["status"]) for row in rows] == [("full", "ok"), ("performer", "ok")]


def test_a_csv_begun_by_an_older_version_keeps_its_header(tmp_path):
    path = tmp_path / "scaling.csv"
    old_fields = [field for field in scaling.ROW_FIELDS if field != "matmul_flops"]
    path.write_text(",".join(old_fields) + "\n")
    scaling.append_row(
        path,
        {"level": "op", "name": "full", "length": 16, "status": "ok", "matmul_flops": 7.0, "time_s": 0.5},
    )
    (row,) = scaling.read_rows(path)
    assert row["time_s"] == 0.5 and row["matmul_flops"] is None and path.read_text().count("\n") == 2
