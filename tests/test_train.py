"""Config schema and loader, optimizer schedule, training loop, exact resume after SIGKILL."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jattn.data import listops as listops_module
from jattn.data.text import load_text
from jattn.train import (
    ConfigError,
    ExperimentConfig,
    RunError,
    TrainingDiverged,
    TrainingInterrupted,
    build_task,
    build_variant,
    from_dict,
    load_config,
    train,
)
from jattn.train import build as build_module
from jattn.train import loop as loop_module
from jattn.train.build import build_model, check_model, learning_rate_schedule
from jattn.train.config import apply_overrides, save_config
from jattn.train.loop import check_resumable, check_run_folder, load_run
from jattn.train.schema import OptimizerConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.mark.parametrize(
    "data, match",
    [
        ({"modle": {}}, r"unknown config key\(s\) \['modle'\]; allowed here: \['attention', 'compare'"),
        ({"model": {"widht": 8}}, r"unknown config key\(s\) \['model.widht'\]"),
        ({"model": {"width": "wide"}}, "config key 'model.width': expected an int, got 'wide'"),
        ({"model": {"width": 0}}, "config key 'model.width': must be >= 1, got 0"),
        ({"model": {"dropout": 1.5}}, r"config key 'model.dropout': must be >= 0.0 and <= 0.9"),
        ({"model": {"position": "alibi"}}, "config key 'model.position': expected one of 'learned'"),
        ({"train": {"progress": "yes"}}, "config key 'train.progress': expected true or false"),
        ({"compare": [{"variant": "full", "opts": {}}]}, r"unknown config key\(s\) \['compare\[0\].opts'\]"),
        ({"model": {"width": 10, "num_heads": 4}}, "model.width must be a multiple of model.num_heads"),
        (
            {"model": {"width": 6, "num_heads": 2, "position": "rotary"}},
            r"config model: model.position 'rotary' .* even head dim \(model.width / model.num_heads\)",
        ),
        (
            {"model": {"dropout": float("nan")}},
            "config key 'model.dropout': expected a finite number, got nan",
        ),
        (
            {"optimizer": {"learning_rate": float("inf")}},
            "'optimizer.learning_rate': expected a finite number",
        ),
        ({"optimizer": {"learning_rate": "1e999"}}, "'optimizer.learning_rate': expected a finite number"),
        ({"optimizer": {"b1": 1.0}}, r"config key 'optimizer.b1': must be >= 0.0 and < 1.0, got 1.0"),
        ({"optimizer": {"b2": 1.0}}, r"config key 'optimizer.b2': must be >= 0.0 and < 1.0, got 1.0"),
        (  # clip_by_global_norm(0) zeroes every update: the model would never change
            {"optimizer": {"clip_norm": 0}},
            r"'optimizer.clip_norm': must be > 0.0, got 0.0 \(null for no clipping; 0 would zero every",
        ),
        ({"train": {"seed": -1}}, r"config key 'train.seed': must be >= 0 and <= 4294967295, got -1"),
        ({"train": {"seed": 2**32 + 5}}, r"'train.seed': must be >= 0 and <= 4294967295, got 4294967301"),
        ({"train": {"steps": "1.5e0"}}, "config key 'train.steps': expected an int, got '1.5e0'"),
        (
            {"train": {"steps": "12"}},
            "config key 'train.steps': expected an int, got '12'",
        ),  # quoted: a string
        (
            {"train": {"log_every": 5, "checkpoint_every": 7}},
            "train.checkpoint_every must be a multiple of train.log_every, got 7 and 5",
        ),
        ({"name": "../elsewhere"}, r"^name '../elsewhere' names a run folder, so it must be"),
        ({"name": "my run"}, "name 'my run' names a run folder"),
    ],
)
def test_schema_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ExperimentConfig, data)


def test_schema_bounds_take_their_inclusive_ends():
    data = {"train": {"seed": 2**32 - 1}, "optimizer": {"end_fraction": 1.0}, "model": {"dropout": 0.9}}
    config = from_dict(ExperimentConfig, data)
    assert (config.train.seed, config.optimizer.end_fraction) == (2**32 - 1, 1.0)


def test_overrides_files_and_round_trip(tmp_path):
    config = load_config(
        ExperimentConfig, TINY, ["model.width=32", "attention.options={window: 4}", "attention.variant=local"]
    )
    assert config.model.width == 32 and config.attention.options == {"window": 4}
    save_config(config, tmp_path / "c.yaml")
    assert load_config(ExperimentConfig, tmp_path / "c.yaml") == config
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides({}, ["model.width"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ExperimentConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: {width: [1, \n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(ExperimentConfig, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(ExperimentConfig, tmp_path / "list.yaml")
    for text in ("", "# only a comment\n"):  # a wrong or truncated file would train every default
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"empty.yaml' is empty; write \{\} in it"):
            load_config(ExperimentConfig, tmp_path / "empty.yaml")
    (tmp_path / "twice.yaml").write_text("model: {width: 16}\ntrain: {steps: 3}\nmodel: {depth: 1}\n")
    with pytest.raises(ConfigError, match="key 'model' is given twice in one mapping"):
        load_config(ExperimentConfig, tmp_path / "twice.yaml")  # PyYAML would keep the second alone
    (tmp_path / "latin1.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml' cannot be read as UTF-8 text"):
        load_config(ExperimentConfig, tmp_path / "latin1.yaml")
    (tmp_path / "defaults.yaml").write_text("{}\n")
    assert load_config(ExperimentConfig, tmp_path / "defaults.yaml") == load_config(ExperimentConfig, None)


def test_scientific_notation_reads_as_a_number(tmp_path):
    # PyYAML (YAML 1.1) leaves 1e-3 a string, in files and in overrides alike.
    (tmp_path / "c.yaml").write_text(
        "optimizer: {learning_rate: 1e-3, weight_decay: 2.5E-2}\ntrain: {steps: 1e3}\n"
    )
    config = load_config(ExperimentConfig, tmp_path / "c.yaml", ["optimizer.end_fraction=5e-2"])
    assert config.optimizer.learning_rate == 1e-3 and config.optimizer.weight_decay == 0.025
    assert config.optimizer.end_fraction == 0.05 and config.train.steps == 1000
    assert isinstance(config.train.steps, int)
    assert load_config(ExperimentConfig, None, ["name=1e3"]).name == "1e3"  # a string field keeps it


def test_check_model_turns_a_model_value_error_into_a_config_error(monkeypatch):
    config = _tiny()

    def refuse(*args, **kwargs):
        raise ValueError("no such model")

    monkeypatch.setattr(build_module, "build_model", refuse)
    with pytest.raises(ConfigError, match=r"config keys 'model' and 'attention' .*: no such model"):
        check_model(config, build_task(config))


def test_variant_and_task_errors_list_what_is_allowed():
    with pytest.raises(ConfigError, match=r"unknown variant 'flash_sparse'; known: \[.*'bigbird'.*'full'"):
        build_variant(from_dict(ExperimentConfig, {"attention": {"variant": "flash_sparse"}}).attention)
    with pytest.raises(ConfigError, match="attention.options.*takes no option"):
        build_variant(
            from_dict(ExperimentConfig, {"attention": {"variant": "local", "options": {"blok": 3}}}).attention
        )
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['task.options.pairs'\]"):
        build_task(from_dict(ExperimentConfig, {"task": {"name": "recall", "options": {"pairs": 3}}}))
    config = from_dict(
        ExperimentConfig, {"task": {"name": "recall", "options": {"seq_len": 64}}, "model": {"max_len": 32}}
    )
    with pytest.raises(ConfigError, match="model.max_len': the task's sequences need 64 positions"):
        build_model(config, build_task(config).spec)
    config = from_dict(
        ExperimentConfig,
        {"task": {"name": "recall", "options": {"seq_len": 32}}, "attention": {"variant": "linformer"}},
    )
    with pytest.raises(
        ConfigError, match=r"'attention.options': variant 'linformer' is meant for models of max_len >= 256"
    ):
        build_model(config, build_task(config).spec)


def test_learning_rate_schedules():
    warm = OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="rsqrt")
    lr = learning_rate_schedule(warm, 100)
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(40)) == pytest.approx((10 / 40) ** 0.5)
    # Python ints, as the training loop logs them: optax also evaluates the decay during warm-up.
    assert [float(lr(step)) for step in (0, 1)] == pytest.approx([0.0, 0.1])
    cosine = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=0, end_fraction=0.1), 100)
    assert float(cosine(0)) == pytest.approx(1.0) and float(cosine(100)) == pytest.approx(0.1)


_KILLED_RUN = """
import os, signal, sys
from jattn.train import ExperimentConfig, load_config, train
config = load_config(ExperimentConfig, sys.argv[1], sys.argv[3:])
def die(step, state, sums):
    if step == 7:
        os.kill(os.getpid(), signal.SIGKILL)
train(config, sys.argv[2], on_step=[die])
"""


def _val_lines(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"], x["accuracy"]) for x in lines if x["split"] == "val"]


@pytest.mark.slow  # 35 s: a subprocess trained, killed and trained again
def test_sigkilled_run_resumes_exactly(tmp_path):
    overrides = [
        "train.steps=10",
        "train.checkpoint_every=3",
        "train.eval_every=2",
        "train.log_every=1",
        "model.dropout=0.1",
    ]
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED_RUN))
    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, str(script), str(TINY), str(killed), *overrides], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Only the steps since the last checkpoint (6) are lost.
    assert sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())[-1] == 6

    config = load_config(ExperimentConfig, TINY, overrides)
    resumed = train(config, killed)
    uninterrupted = train(config, tmp_path / "straight")
    assert _val_lines(killed) == _val_lines(tmp_path / "straight")
    assert [s for s, *_ in _val_lines(killed)] == [2, 4, 6, 8, 10]
    assert resumed.final_eval == uninterrupted.final_eval
    assert (killed / "summary.md").read_text().startswith("# tiny")
    # Running a finished run again trains nothing and reports the same result (compare.py re-runs).
    again = train(config, tmp_path / "straight")
    assert again == uninterrupted and _val_lines(tmp_path / "straight") == _val_lines(killed)

    changed = load_config(ExperimentConfig, TINY, [*overrides, "model.width=32"])
    with pytest.raises(ConfigError, match=r"cannot resume.*model.width: 16 -> 32"):
        train(changed, killed)
    config_back, model, step = load_run(killed)
    assert config_back == config and step == 10
    assert model(__import__("numpy").zeros((1, 24), "int32")).shape == (1, 24, 16)


def _tiny(*overrides):
    return load_config(ExperimentConfig, TINY, list(overrides))


class _Stop(Exception):
    """Stands for a run stopped from outside (the SIGKILL test above does it for real)."""


def _stop_after(last_step, how="error"):
    """A callback that stops the run after ``last_step``: ``_Stop``, Ctrl-C or a real SIGTERM."""

    def stop(step, state, sums):
        if step != last_step:
            return
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif how == "ctrl-c":
            raise KeyboardInterrupt
        else:
            raise _Stop

    return stop


def test_resume_refuses_fewer_or_rescheduled_steps_and_keeps_the_run(tmp_path):
    finished = tmp_path / "finished"
    result = train(_tiny("train.steps=4"), finished)
    saved = (finished / "config.yaml").read_text()
    with pytest.raises(
        ConfigError, match=r"'train.steps': the run folder has a checkpoint at step 4, past train"
    ):
        train(_tiny("train.steps=2"), finished)
    with pytest.raises(ConfigError, match=r"'train.steps': 4 -> 6 would change .*'cosine' spreads its decay"):
        train(_tiny("train.steps=6"), finished)
    assert (finished / "config.yaml").read_text() == saved
    assert train(_tiny("train.steps=4"), finished) == result
    # Stopped after its step-2 checkpoint: asking for 1 step would report step 2's parameters.
    stopped = tmp_path / "stopped"
    with pytest.raises(_Stop):
        train(_tiny("train.steps=4"), stopped, on_step=[_stop_after(3)])
    with pytest.raises(ConfigError, match="checkpoint at step 2, past train.steps=1"):
        train(_tiny("train.steps=1"), stopped)
    assert not (stopped / "result.json").exists()


def test_train_steps_may_change_only_where_the_schedule_does_not_depend_on_them():
    def resumable(schedule, old, new, step, warmup=1):
        opt = [f"optimizer.schedule={schedule}", f"optimizer.warmup_steps={warmup}"]
        check_resumable(_tiny(*opt, f"train.steps={old}"), _tiny(*opt, f"train.steps={new}"), step)

    for schedule in ("constant", "rsqrt"):
        resumable(schedule, 10, 20, 10)
        resumable(schedule, 10, 6, 5)
    for schedule in ("cosine", "linear"):
        with pytest.raises(ConfigError, match=rf"'train.steps': 10 -> 20 .*{schedule}.*spreads its decay"):
            resumable(schedule, 10, 20, 10)
        resumable(schedule, 10, 20, 4, warmup=5)  # only warm-up steps trained: their rates stay
        resumable(schedule, 10, 10, 10)
    # Rates that differ in the last digits are printed with enough of them to differ.
    with pytest.raises(ConfigError, match=r"step \d+ took (\S+), it would take (?!\1\))\S+\)"):
        resumable("cosine", 1000, 1001, 10)


def test_a_task_option_added_or_removed_is_a_change_a_run_cannot_resume_with():
    def config(options):
        return from_dict(ExperimentConfig, {"task": {"name": "recall", "options": options}})

    for saved, new in [({}, {"seq_len": 64}), ({"seq_len": 64}, {})]:
        with pytest.raises(ConfigError, match="task.options.seq_len"):
            check_resumable(config(saved), config(new), 0)


def _train_windows(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["window"]) for x in lines if x["split"] == "train"]


@pytest.mark.slow  # 17 s: three tiny runs
def test_extending_a_constant_schedule_matches_an_uninterrupted_run(tmp_path):
    constant = ("optimizer.schedule=constant", "train.eval_every=1", "train.log_every=2")
    train(_tiny(*constant, "train.steps=3"), tmp_path / "extended")
    extended = train(_tiny(*constant, "train.steps=4"), tmp_path / "extended")
    straight = train(_tiny(*constant, "train.steps=4"), tmp_path / "straight")
    assert _val_lines(tmp_path / "extended") == _val_lines(tmp_path / "straight")
    assert extended.final_eval == straight.final_eval and extended.steps == 4
    # The parameters match; the logging windows cannot: the finished run logged its last (partial)
    # window at step 3, so the extension's first window holds step 4 alone, and says so.
    assert _train_windows(tmp_path / "straight") == [(2, 2), (4, 2)]
    assert _train_windows(tmp_path / "extended") == [(2, 2), (3, 1), (4, 1)]


def test_a_run_without_checkpoint_takes_a_new_config(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(_Stop):  # stopped before its first checkpoint (step 2)
        train(_tiny(), run_dir, on_step=[_stop_after(1)])
    assert (run_dir / "config.yaml").exists()
    result = train(_tiny("model.width=32"), run_dir)
    assert result.steps == 3 and load_config(ExperimentConfig, run_dir / "config.yaml").model.width == 32
    assert [s for s, *_ in _val_lines(run_dir)] == [3]


@pytest.mark.parametrize(
    "implementation, match",
    [
        (
            "flahs",
            r"options' for variant 'full': implementation must be one of \[.*'chunked'.*'xla'\].*'flahs'",
        ),
        (
            "cudnn",
            "options.implementation': implementation='cudnn' cannot run this call: cuDNN",
        ),  # never cuDNN
    ],
)
def test_bad_implementation_is_a_config_error_before_anything_is_written(tmp_path, implementation, match):
    config = _tiny(f"attention.options={{implementation: {implementation}}}")
    with pytest.raises(ConfigError, match=r"config key 'attention." + match):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    config = _tiny(
        "optimizer.learning_rate=1e30",
        "optimizer.clip_norm=null",
        "train.steps=6",
        "train.eval_every=6",
    )
    with pytest.raises(
        TrainingDiverged, match=r"is not finite at steps? 3\b.* last checkpoint \(step 2\) is kept"
    ) as err:
        train(config, run_dir)
    assert err.value.first_step == 3 and err.value.checkpoint == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert not (run_dir / "result.json").exists() and not (run_dir / "summary.md").exists()
    records = [
        json.loads(x, parse_constant=pytest.fail)
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2]
    # Resuming repeats the same steps, and stops again before saving any of them.
    with pytest.raises(TrainingDiverged, match="at step 3"):
        train(config, run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_result_json_reads_older_nan_speeds_as_missing():
    text = json.dumps(
        {
            "name": "a", "variant": "full", "steps": 3, "params": 1, "final_eval": {}, "final_train": {},
            "steps_per_s": float("nan"), "tokens_per_s": float("nan"), "peak_memory_bytes": None,
            "masks_padding": True,
        }
    )  # fmt: skip
    result = loop_module.RunResult.from_json(text)
    assert result.steps_per_s is None and result.tokens_per_s is None
    assert loop_module.format_number(None, ".2f") == "n/a"
    assert loop_module.format_number(float("nan"), ".2f") == "nan"  # never shown as merely missing
    assert loop_module.dumps({"loss": float("nan"), "x": [float("inf")]}) == '{"loss": null, "x": [null]}'


def test_evaluation_time_is_not_training_time(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(loop_module, "_clock", lambda: now[0])
    real_evaluate = loop_module.evaluate

    def slow_evaluate(*args, **kwargs):
        now[0] += 100.0
        return real_evaluate(*args, **kwargs)

    def one_second_per_step(step, state, sums):
        now[0] += 1.0

    monkeypatch.setattr(loop_module, "evaluate", slow_evaluate)
    config = _tiny("train.steps=4", "train.log_every=4", "train.checkpoint_every=4", "train.eval_every=2")
    result = train(config, tmp_path / "run", on_step=[one_second_per_step])
    # One window of 4 steps (the first untimed) and 4 clock seconds; the evaluation at step 2, in
    # the middle of the window, stays out.
    assert result.steps_per_s == pytest.approx(3 / 4)


def test_a_resume_on_an_edited_text_file_is_refused(tmp_path):
    """The config names the file, not what it holds: a resume after an edit trained its remaining
    steps on other text, and reported them as one run."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    config = _tiny(
        "task.name=text", f"task.options={{text: {corpus}, seq_len: 16}}", "optimizer.schedule=constant"
    )
    run_dir = tmp_path / "run"
    train(config, run_dir)
    longer = _tiny(
        "task.name=text",
        f"task.options={{text: {corpus}, seq_len: 16}}",
        "optimizer.schedule=constant",
        "train.steps=5",
    )
    task = build_task(longer)
    assert check_run_folder(longer, run_dir, task) == 3  # the same text: resumes
    corpus.write_text("the quick brown fox jumps over the lazy dog! " * 8)  # same characters
    load_text.cache_clear()  # as a new process reads it
    with pytest.raises(ConfigError, match=r"started on other data than task.options give now \(sha256:"):
        check_run_folder(longer, run_dir, build_task(longer))


def test_a_task_that_cannot_make_a_batch_is_a_config_error_before_training(monkeypatch):
    """A ListOps draw that ran out raised its ValueError as a traceback, not a config error."""
    config = _tiny("task.name=listops", "task.options={min_len: 20, max_len: 60}")
    task = build_task(config)
    monkeypatch.setattr(listops_module, "_MAX_DRAWS", 0)
    with pytest.raises(
        ConfigError, match=r"config key 'task.options' \(task 'listops'\): no ListOps expression"
    ):
        check_model(config, task)


def test_a_leading_tilde_in_run_folders_is_the_home_folder(tmp_path, monkeypatch):
    """``output_dir=~/runs`` on a command line reaches Python unexpanded; it made a folder named ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _tiny("output_dir=~/runs").output_dir == str(tmp_path / "runs")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=f"cannot be made: '{tmp_path}/afile' is a file"):
        train(_tiny(), "~/afile/run")


def test_a_run_folder_under_a_file_is_a_config_error(tmp_path):
    """Not a traceback from inside Orbax once the model is built."""
    (tmp_path / "afile").write_text("")
    for run_dir in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(ConfigError, match=r"cannot be made: '.*afile' is a file, not a folder"):
            train(_tiny(), run_dir)


def test_a_finished_run_without_its_checkpoints_is_not_replaced_by_another_config(tmp_path):
    """Checkpoints deleted to free disk leave result.json and metrics: another config refused, the
    same one (or one changed only where a resume may change it) trains the run again."""
    run_dir = tmp_path / "run"
    first = train(_tiny(), run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    kept = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"holds the results of a finished run .*model.width: 16 -> 32"):
        train(_tiny("model.width=32"), run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == kept
    assert train(_tiny("train.progress=false"), run_dir).final_eval == first.final_eval


def test_damaged_run_folders_give_clear_errors_and_keep_the_run(tmp_path):
    base = tmp_path / "base"
    config = _tiny()  # checkpoints at steps 2 and 3
    train(config, base)

    def copy(name):
        shutil.copytree(base, tmp_path / name)
        (tmp_path / name / "result.json").unlink()  # unfinished, so the checkpoint is restored
        return tmp_path / name

    no_config = copy("no_config")
    (no_config / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"has checkpoints \(the latest of step 3\) but no config.yaml"):
        train(config, no_config)
    assert not (no_config / "config.yaml").exists()

    # A config.yaml edited to another model: the check passes, the restore cannot; the file is kept.
    edited = copy("edited")
    save_config(_tiny("model.mlp_dim=64"), edited / "config.yaml")
    saved = (edited / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"checkpoints/3' does not fit this config's model .*mlp"):
        train(_tiny("model.mlp_dim=64", "train.log_every=2"), edited)
    assert (edited / "config.yaml").read_text() == saved

    unknown = copy("unknown")
    (unknown / "config.yaml").write_text((unknown / "config.yaml").read_text() + "extra: 1\n")
    with pytest.raises(ConfigError, match=r"the run folder's saved config '.*unknown/config.yaml': unknown"):
        train(config, unknown)

    damaged = copy("damaged")
    (damaged / "checkpoints" / "3" / "default" / "manifest.ocdbt").write_bytes(b"cut")
    with pytest.raises(
        RunError, match=r"cannot read the checkpoint '.*checkpoints/3' .*resume from .* step 2"
    ):
        train(config, damaged)
    shutil.rmtree(damaged / "checkpoints" / "3")
    # A last metrics line cut short by a kill is skipped; one in the middle is an error.
    metrics = damaged / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "spl')
    assert train(config, damaged).final_eval == train(config, base).final_eval
    metrics.write_text('{"step": 1, "spl\n' + metrics.read_text())
    with pytest.raises(RunError, match=r"metrics.jsonl' line 1 is not valid JSON"):
        loop_module.MetricsLog.read(metrics)


def test_logged_lr_is_the_rate_the_logged_steps_used(tmp_path):
    train(_tiny("optimizer.warmup_steps=2"), tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Warm-up from 0 over 2 steps: step 1 updates with rate 0, step 2 with half the peak.
    assert [x["lr"] for x in lines if x["split"] == "train"] == pytest.approx([0.0, 0.5e-3, 1e-3])


def test_speed_is_measured_when_the_run_has_one_logging_window(tmp_path):
    result = train(_tiny("train.log_every=10", "train.checkpoint_every=10"), tmp_path / "run")  # one window
    assert result.steps_per_s is not None and result.steps_per_s > 0 and result.tokens_per_s > 0


def test_load_run_of_a_step_without_checkpoint_lists_the_steps(tmp_path):
    train(_tiny(), tmp_path / "run")  # checkpoints at steps 2 and 3
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint at step 1; it has checkpoints at steps \[2, 3\]"
    ):
        load_run(tmp_path / "run", 1)
    assert load_run(tmp_path / "run", 2)[2] == 2


def test_local_window_errors_name_the_window():
    with pytest.raises(ConfigError, match=r"variant 'local': window must be an int >= 0, got window=-3"):
        build_variant(_tiny("attention.variant=local", "attention.options={window: -3}").attention)


def test_loss_and_accuracy_count_only_weighted_positions_and_pool_over_steps():
    logits = jnp.log(jnp.array([[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]]))  # [B=1, T=3, V=2]
    batch = {"targets": jnp.array([[0, 0, 1]]), "weights": jnp.array([[1.0, 1.0, 0.0]])}
    sums = loop_module.loss_sums(logits, batch, "sequence")
    assert float(sums["count"]) == 2.0 and float(sums["correct"]) == 1.0  # the unweighted t=2 is left out
    np.testing.assert_allclose(float(sums["loss_sum"]), -np.log(0.7) - np.log(0.2), rtol=1e-6)
    # A window pools its steps' sums: the mean over every scored prediction, not a mean of means.
    other = {"loss_sum": jnp.array(6.0), "correct": jnp.array(6.0), "count": jnp.array(6.0)}
    pooled = loop_module._summarize([sums, other])
    np.testing.assert_allclose(pooled["loss"], (float(sums["loss_sum"]) + 6.0) / 8, rtol=1e-6)
    assert pooled["accuracy"] == 7 / 8


def test_dropout_draws_a_new_mask_each_step():
    """The dropout key is folded with the step: the same batch and parameters at another step give
    another loss, and the same step gives the same loss."""
    config = _tiny("model.dropout=0.5")
    task = build_task(config)
    fns = loop_module.ModelFunctions.from_model(build_model(config, task.spec), task.spec)
    step = loop_module.make_train_step(fns, optax.sgd(0.0), seed=0)
    state = loop_module.init_state(fns, optax.sgd(0.0))
    batch = task.batch("train", 0, 4)
    losses = [float(step(dict(state, step=jnp.int32(s)), batch)[1]["loss_sum"]) for s in (0, 1, 0)]
    assert losses[0] != losses[1] and losses[0] == losses[2]


def test_diverged_message_says_when_the_value_was_measured(tmp_path):
    at_steps = str(TrainingDiverged(tmp_path, [3, 4], 2, "the training loss or gradient norm"))
    assert "the training loss or gradient norm is not finite at steps 3, 4; nothing from step 3" in at_steps
    assert "its last checkpoint (step 2) is kept" in at_steps
    after = str(TrainingDiverged(tmp_path, [4], None, "the validation loss", after=True))
    assert "the validation loss is not finite after step 4; nothing from step 4 on was saved" in after
    assert "it has no checkpoint" in after


@pytest.mark.parametrize(
    ("how", "status"),
    # SIGTERM's handler and status are also checked, by default, while starting up (below).
    [("ctrl-c", 130), pytest.param("sigterm", 143, marks=pytest.mark.slow)],
)
def test_an_interrupted_run_checkpoints_its_steps_and_resumes_exactly(tmp_path, how, status):
    """Ctrl-C or SIGTERM (a cluster's preemption) at step 5, between the checkpoints of steps 4 and
    8: step 5 is saved, and the resumed run's parameters and validation metrics are those of an
    uninterrupted run."""
    overrides = ["train.steps=8", "train.log_every=2", "train.checkpoint_every=4", "train.eval_every=4"]
    config = _tiny(*overrides, "model.dropout=0.1")
    run_dir = tmp_path / "run"
    with pytest.raises(
        TrainingInterrupted, match=r"after step 5; it resumes from its checkpoint of step 5"
    ) as err:
        train(config, run_dir, on_step=[_stop_after(5, how)])
    assert (err.value.step, err.value.checkpoint, err.value.exit_status) == (5, 5, status)
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is only there while training
    resumed = train(config, run_dir)
    uninterrupted = train(config, tmp_path / "straight")
    assert resumed.final_eval == uninterrupted.final_eval
    assert _val_lines(run_dir) == _val_lines(tmp_path / "straight")
    _, resumed_model, _ = load_run(run_dir)
    _, straight_model, _ = load_run(tmp_path / "straight")
    for a, b in zip(
        jax.tree.leaves(nnx.state(resumed_model)), jax.tree.leaves(nnx.state(straight_model)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("how", "status"), [("ctrl-c", 130), ("sigterm", 143)])
def test_an_interrupt_while_starting_up_names_the_checkpoint_to_resume_from(
    tmp_path, monkeypatch, how, status
):
    """Ctrl-C or SIGTERM while the model is built or compiled (minutes for a large one) stops the
    run as one during training does, with the shell's status, not a traceback: no step ran since the
    checkpoint, so that is where the run resumes."""
    run_dir = tmp_path / "run"
    with pytest.raises(_Stop):
        train(_tiny("train.steps=4"), run_dir, on_step=[_stop_after(3)])  # checkpoint of step 2

    def interrupted_compile(*args, **kwargs):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "make_train_step", interrupted_compile)
    with pytest.raises(
        TrainingInterrupted, match=r"after step 2; it resumes from its checkpoint of step 2"
    ) as err:
        train(_tiny("train.steps=4"), run_dir)
    assert err.value.exit_status == status
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _checkpoint_steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _gutted_copy(source: pathlib.Path, target: pathlib.Path) -> None:
    """``target``: ``source``'s folders without their files, as a deletion stopped midway leaves it."""
    shutil.copytree(source, target)
    for path in target.rglob("*"):
        if path.is_file():
            path.unlink()


def test_a_stop_before_orbax_deletes_old_checkpoints_leaves_two(tmp_path, monkeypatch):
    """Orbax writes a new checkpoint and deletes the oldest last: Ctrl-C in between (here in the final
    save, with the oldest half deleted) left three step folders, one unreadable, for good, as no later
    save would delete it. The stop, and the next run of the command, delete all but the newest two."""
    save = ocp.CheckpointManager.save

    def save_stopped_before_the_deletion(self, step, *args, **kwargs):
        checkpoints = pathlib.Path(self.directory)
        if step != 6:
            return save(self, step, *args, **kwargs)
        oldest = checkpoints / str(min(_checkpoint_steps(checkpoints.parent)))
        shutil.copytree(oldest, tmp_path / "oldest")
        save(self, step, *args, **kwargs)
        _gutted_copy(tmp_path / "oldest", oldest)
        raise KeyboardInterrupt

    config = _tiny("train.steps=6", "train.log_every=2", "train.checkpoint_every=2", "train.eval_every=2")
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(ocp.CheckpointManager, "save", save_stopped_before_the_deletion)
        with pytest.raises(TrainingInterrupted, match="checkpoint of step 6"):
            train(config, run_dir)
    assert _checkpoint_steps(run_dir) == [4, 6]
    _gutted_copy(run_dir / "checkpoints" / "4", run_dir / "checkpoints" / "2")  # as a killed process left it
    assert train(config, run_dir).final_eval  # finished: it reports the run and saves nothing
    assert _checkpoint_steps(run_dir) == [4, 6]
    for step in (4, 6):
        load_run(run_dir, step)


def test_an_interrupt_saves_no_diverged_state(tmp_path):
    diverging = _tiny(
        "optimizer.learning_rate=1e30", "optimizer.clip_norm=null", "train.steps=6", "train.log_every=2"
    )
    with pytest.raises(TrainingInterrupted, match="checkpoint of step 2") as err:  # NaN from step 3 on,
        train(diverging, tmp_path / "nan", on_step=[_stop_after(3, "ctrl-c")])  # found at the log of 4
    assert err.value.checkpoint == 2
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    unsaved = TrainingInterrupted(tmp_path / "early", 0, None, terminated=False)
    assert str(unsaved).endswith(
        "interrupted after step 0; it has no checkpoint, so the same command starts it over"
    )


def test_train_and_compare_commands_report_an_interrupt_with_the_shells_status(tmp_path, monkeypatch, capsys):
    import runpy

    def interrupted(config, run_dir, **kwargs):
        raise TrainingInterrupted(pathlib.Path(run_dir), 5, 4, terminated=True)

    for script, config in (("train.py", TINY), ("compare.py", ROOT / "configs" / "quickstart.yaml")):
        main = runpy.run_path(str(ROOT / "experiments" / script))["main"]
        main.__globals__["train"] = interrupted
        assert main([str(config), f"output_dir={tmp_path}"]) == 143
        assert "stopped: run folder" in capsys.readouterr().err
