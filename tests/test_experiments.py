"""The experiment scripts end to end on tiny settings, and every shipped config validates."""

import dataclasses
import importlib.util
import json
import pathlib
import warnings

import pytest

from jattn.train import ExperimentConfig, TrainingDiverged, build_task, build_variant, load_config
from jattn.train.build import model_max_len
from jattn.train.loop import RunResult
from jattn.train.plots import plot_bars, plot_learning_curves

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    if "scaling" in path.name:  # another schema (experiments/scaling.py)
        pytest.skip("not an experiment config")
    text = path.read_text()
    assert text.startswith("#") and "python experiments/" in text.splitlines()[0] + text.splitlines()[1]
    config = load_config(ExperimentConfig, path)
    spec = build_task(config).spec
    model_max_len(config.model, spec)
    for entry in (config.attention, *config.compare):
        build_variant(entry)


def test_train_script_smoke(tmp_path, capsys):
    assert (
        _script("train").main([str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    )
    assert "| 3 |" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.jsonl", "result.json", "summary.md"):
        assert (tmp_path / "run" / name).exists()


def test_train_script_reports_bad_config(tmp_path, capsys):
    assert _script("train").main([str(ROOT / "configs" / "tiny.yaml"), "attention.variant=nope"]) == 2
    assert "unknown variant 'nope'; known:" in capsys.readouterr().err


def test_compare_script_writes_table_and_plots(tmp_path, capsys):
    compare = _script("compare")
    overrides = ["compare=[{variant: local, options: {window: 2}}, {variant: linear}]"]
    assert compare.main([str(ROOT / "configs" / "tiny.yaml"), *overrides, "--out", str(tmp_path)]) == 0
    results = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in results for name in ("local", "linear"))
    for png in ("learning_curves.png", "final_accuracy.png", "time_per_step.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert "| variant | eval accuracy" in capsys.readouterr().out
    assert compare.main([str(ROOT / "configs" / "tiny.yaml"), "--out", str(tmp_path / "x")]) == 2


def test_compare_checks_every_entry_before_training_any(tmp_path, capsys):
    compare = _script("compare")
    tiny = str(ROOT / "configs" / "tiny.yaml")
    entries = "compare=[{variant: full}, {variant: local, options: {window: 2}}, {variant: lineer}]"
    assert compare.main([tiny, entries, "--out", str(tmp_path / "a")]) == 2
    assert "error: config key 'compare[2].variant': unknown variant 'lineer'" in capsys.readouterr().err
    entries = "compare=[{variant: full}, {variant: full, label: f, options: {implementation: flahs}}]"
    assert compare.main([tiny, entries, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "config key 'compare[1].options' for variant 'full': implementation must be one of" in err
    entries = "compare=[{variant: full}, {variant: ring}]"
    assert compare.main([tiny, entries, "--out", str(tmp_path / "c")]) == 2
    assert (
        "config key 'compare[1].variant': 'ring' with options {} splits the sequence"
        in capsys.readouterr().err
    )
    assert not any((tmp_path / name).exists() for name in "abc")


def test_results_table_and_plot_say_n_a_for_what_a_run_could_not_measure(tmp_path):
    compare = _script("compare")
    measured = RunResult(
        "a", "full", 3, 10, {"loss": 1.0, "accuracy": 0.5}, {"loss": 1.1}, 4.0, 40.0, None, True
    )
    unmeasured = dataclasses.replace(measured, variant="local", final_train={}, steps_per_s=None)
    older = RunResult.from_json(  # result.json of older runs: NaN for a speed not measured
        json.dumps(
            dataclasses.asdict(dataclasses.replace(measured, variant="linear", steps_per_s=float("nan")))
        )
    )
    diverged = compare.Diverged("performer", TrainingDiverged(tmp_path, [7, 8], 6, "the training loss"))
    table = compare.results_table([measured, unmeasured, older, diverged], padded=False)
    assert "| full | 0.5000 | 1.0000 | 1.1000 | 4.00 | 250.0 | n/a | 10 |" in table
    assert "| local | 0.5000 | 1.0000 | n/a | n/a | n/a | n/a | 10 |" in table
    assert "| linear | 0.5000 | 1.0000 | 1.1000 | n/a | n/a | n/a | 10 |" in table
    assert "| performer | diverged at step 7 | - | - | - | - | - | - |" in table
    plot_bars(
        {r.variant: compare.ms_per_step(r) for r in (measured, unmeasured, older)}, "ms", tmp_path / "t.png"
    )
    assert (tmp_path / "t.png").stat().st_size > 0
    with warnings.catch_warnings():  # every entry diverged before validating: no empty legend's warning
        warnings.simplefilter("error")
        plot_learning_curves(
            {"full": [{"step": 2, "split": "train", "loss": 1.0}]}, "loss", tmp_path / "c.png"
        )
    assert (tmp_path / "c.png").stat().st_size > 0


def test_compare_checks_run_folders_and_labels_before_training_any(tmp_path, capsys):
    compare = _script("compare")
    tiny = str(ROOT / "configs" / "tiny.yaml")
    out = ["--out", str(tmp_path)]
    assert compare.main([tiny, "compare=[{variant: full}]", *out]) == 0  # 3 steps, cosine
    capsys.readouterr()
    # A new first entry, and 5 steps the finished 'full' run cannot be extended to: refused before
    # the new entry trains.
    assert compare.main([tiny, "compare=[{variant: linear}, {variant: full}]", "train.steps=5", *out]) == 2
    err = capsys.readouterr().err
    assert "error: compare[1] ('full'): config key 'train.steps': 3 -> 5 would change" in err
    assert not (tmp_path / "linear").exists()
    for label in ("local w/2", "..", "a/b"):
        entries = f"compare=[{{variant: full}}, {{variant: local, options: {{window: 2}}, label: '{label}'}}]"
        assert compare.main([tiny, entries, "--out", str(tmp_path / "labels")]) == 2
        assert f"compare[1].label {label!r} names a run folder" in capsys.readouterr().err
    # A run folder named as one of compare's own outputs failed only after every entry trained.
    entries = "compare=[{variant: full}, {variant: local, options: {window: 2}, label: results.md}]"
    assert compare.main([tiny, entries, "--out", str(tmp_path / "labels")]) == 2
    err = capsys.readouterr().err
    assert "'compare[1].label': 'results.md' is a file compare writes beside the run folders" in err
    assert not (tmp_path / "labels").exists()


def test_compare_reports_a_diverged_entry_and_trains_the_others(tmp_path, capsys, monkeypatch):
    compare = _script("compare")
    real_train = compare.train

    def train(config, run_dir):  # linear diverges (a real divergence: tests/test_train.py)
        if config.name == "linear":
            raise TrainingDiverged(run_dir, [2], None, "the training loss or gradient norm")
        return real_train(config, run_dir)

    monkeypatch.setattr(compare, "train", train)
    entries = "compare=[{variant: linear}, {variant: local, options: {window: 2}}]"
    assert compare.main([str(ROOT / "configs" / "tiny.yaml"), entries, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error: compare[0] ('linear'): training diverged in run folder" in err
    results = (tmp_path / "results.md").read_text()
    assert "| linear | diverged at step 2 |" in results and "| local | " in results
