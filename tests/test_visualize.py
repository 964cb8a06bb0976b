"""experiments/visualize.py end to end on a tiny checkpoint, and its errors for bad input."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil

import numpy as np
import pytest

from jattn.train import ExperimentConfig, from_dict, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = "The skilled surgeon operated on the patient with a scalpel. " * 20


def _load_script():
    spec = importlib.util.spec_from_file_location("visualize", ROOT / "experiments" / "visualize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


visualize = _load_script()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two steps of a one-block character LM with strided attention on a small text file."""
    folder = tmp_path_factory.mktemp("visualize")
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT)
    config = from_dict(
        ExperimentConfig,
        {
            "name": "tiny_lm",
            "task": {"name": "text", "options": {"text": str(corpus), "seq_len": 56}},
            "model": {"width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32},
            "attention": {"variant": "strided", "options": {"stride": 4}},
            "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "progress": False},
        },
    )
    train(config, folder / "run")
    return folder / "run"


def test_writes_maps_statistics_and_top_tokens(run_dir, tmp_path, capsys):
    out = tmp_path / "maps"
    assert visualize.main([str(run_dir), "--out", str(out), "--top", "2"]) == 0
    assert {p.name for p in out.iterdir()} == {"layer0.png", "statistics.png", "statistics.md"}
    printed = capsys.readouterr().out
    assert "| layer 0 | 0 |" in printed and "| layer 0 | 1 |" in printed
    assert "Most likely next characters" in printed
    assert (out / "statistics.md").read_text() in printed


def test_top_attended_orders_by_weight():
    weights = np.array([[0.1, 0.6, 0.3], [0.5, 0.0, 0.5]])
    top = visualize.top_attended(weights, ["a", "b", "c"], 2)
    assert top == [[("b", 1, 0.6), ("c", 2, 0.3)], [("a", 0, 0.5), ("c", 2, 0.5)]]


def test_folder_without_checkpoint(run_dir, tmp_path, capsys):
    empty_run = tmp_path / "untrained"
    empty_run.mkdir()
    shutil.copy(run_dir / "config.yaml", empty_run / "config.yaml")
    assert visualize.main([str(empty_run)]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert visualize.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a run folder (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert visualize.main([str(run_dir), "--out", str(tmp_path / "afile" / "maps")]) == 2
    assert "afile/maps' (--out) cannot be made: Not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Zeal ёж", "3 character(s) outside the model's vocabulary of 20: 'Zжё'"),
        ("the " * 15, "60 characters, more than the model's maximum length max_len=56"),
        ("", "at least one character"),
    ],
)
def test_bad_text(run_dir, tmp_path, capsys, text, message):
    assert visualize.main([str(run_dir), "--text", text, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
