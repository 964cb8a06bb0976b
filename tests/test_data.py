"""Task generators: deterministic from the seed, and each task's answer is right."""

import dataclasses
import hashlib

import numpy as np
import pytest

from jattn.data import AssociativeRecall, CharLM, Copying, ListOps
from jattn.data import listops as lo

TASKS = [
    ListOps(min_len=20, max_len=60),
    AssociativeRecall(vocab_size=20, seq_len=24, num_pairs=4),
    Copying(),
    CharLM(seq_len=32),
]


@pytest.mark.parametrize("task", TASKS)
def test_batches_are_pure_functions_of_seed_split_index(task):
    a, b = task.batch("train", 3, 4), task.batch("train", 3, 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    other = task.batch("train", 4, 4)
    assert not np.array_equal(a["inputs"], other["inputs"])
    assert not np.array_equal(a["inputs"], task.batch("val", 3, 4)["inputs"])


@pytest.mark.parametrize("task", TASKS)
def test_bad_batch_size_index_and_seed_name_the_argument_and_numpy_integers_are_accepted(task):
    for batch_size in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size must be an int >= 1, got batch_size={batch_size}"):
            task.batch("train", 0, batch_size)
    with pytest.raises(TypeError, match="batch_size must be an int, got float 2.0"):
        task.batch("train", 0, 2.0)
    with pytest.raises(ValueError, match="index must be an int >= 0, got index=-1"):
        task.batch("train", -1, 2)
    with pytest.raises(ValueError, match="seed must be an int >= 0, got seed=-1"):
        dataclasses.replace(task, seed=-1)  # when the task is made, not at its first batch
    numpy_ints = dataclasses.replace(task, seed=np.int64(task.seed)).batch("train", np.int64(1), np.int64(2))
    for key, value in task.batch("train", 1, 2).items():
        np.testing.assert_array_equal(numpy_ints[key], value)


def test_listops_labels_lengths_and_brackets():
    task = ListOps(min_len=30, max_len=80)
    batch = task.batch("train", 0, 16)
    assert ((batch["lengths"] >= 30) & (batch["lengths"] <= 80)).all()
    for row, length, label in zip(batch["inputs"], batch["lengths"], batch["labels"], strict=True):
        tokens = [lo.VOCAB[i] for i in row[:length]]
        assert (row[length:] == lo.PAD).all()
        assert sum(t in lo.OPERATORS for t in tokens) == tokens.count("]")  # every bracket is kept
        assert lo.evaluate(tokens) == label
    expression = ["[SM", "4", "[MAX", "2", "9", "]", "[MED", "1", "5", "3", "]", "]"]
    assert lo.evaluate(expression) == (4 + 9 + 3) % 10
    np.testing.assert_array_equal(lo.tokenize("[MIN 1 ]"), [lo.TOKEN_IDS["[MIN"], 2, lo.TOKEN_IDS["]"]])
    with pytest.raises(ValueError, match="unknown ListOps token"):
        lo.tokenize("( 1 )")
    with pytest.raises(ValueError, match="min_len must be <= max_len"):
        ListOps(min_len=10, max_len=5)


def test_listops_batches_of_a_seed_stay_the_same():
    """A resumed run draws the batches of the steps it has left from the task's seed: a change to the
    generator (even one that keeps every expression in range) would train it on other data. These
    are the batches of the first release, the same under NumPy 2.4 and 2.5."""
    batch = ListOps(min_len=10, max_len=20, max_depth=4, max_args=4).batch("train", 0, 8)
    assert batch["lengths"].tolist() == [14, 12, 15, 11, 14, 16, 14, 17]
    assert batch["labels"].tolist() == [3, 9, 2, 4, 4, 8, 6, 6]
    assert hashlib.sha256(batch["inputs"].astype(np.int32).tobytes()).hexdigest()[:16] == "d6729fc7f25d05b8"


def test_listops_rejects_a_min_len_longer_than_any_expression():
    # max_depth=1 allows only a digit; max_depth=2, 2 arguments at most "[OP d d ]"; the LRA
    # max_args=10 at max_depth=3 reaches 2 + 10 * (2 + 10) = 122 tokens.
    for options, longest in [
        ({"min_len": 5, "max_len": 50, "max_depth": 2, "max_args": 2}, 4),
        ({"max_depth": 1}, 1),
        ({"max_depth": 3}, 122),
    ]:
        with pytest.raises(ValueError, match=f"min_len must be <= {longest}, the longest expression"):
            ListOps(**options)
    # The bound is exact: the longest expression is drawn ([OP [OP d d ] [OP d d ] ]).
    batch = ListOps(min_len=10, max_len=10, max_depth=3, max_args=2).batch("train", 0, 4)
    assert (batch["lengths"] == 10).all()


def test_listops_refuses_lengths_too_rare_to_draw_when_built(monkeypatch):
    """A range drawn 5 times in 10000 passed, and a run stopped at the first example that ran out of
    draws (and again on every resume)."""
    for options in ({"max_depth": 4, "max_args": 10, "min_len": 140, "max_len": 200}, {"min_len": 122}):
        with pytest.raises(ValueError, match=r"only \d of 10000 ListOps expressions .* fewer than 20"):
            ListOps(**{"max_depth": 3, "max_args": 10, "max_len": 122, **options})
    # An example still gives up by name, should a long run draw badly.
    monkeypatch.setattr(lo, "_MIN_IN_RANGE", 0)
    task = ListOps(min_len=122, max_len=122, max_depth=3, max_args=10)  # reachable, p ~ 1e-17
    monkeypatch.setattr(lo, "_MAX_DRAWS", 50)
    with pytest.raises(ValueError, match="in 50 draws .*use a smaller min_len"):
        task.batch("train", 0, 1)


def test_recall_targets_are_the_values_that_followed_the_keys():
    task = AssociativeRecall(vocab_size=32, seq_len=40, num_pairs=6)
    batch = task.batch("train", 0, 8)
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"], strict=True):
        keys, values = inputs[0:12:2], inputs[1:12:2]
        assert keys.min() >= 1 and keys.max() <= 15  # vocab_size 32: keys in [1, 15], values in [16, 30]
        assert values.min() >= 16 and values.max() <= 30
        assert len(set(keys)) == 6  # distinct keys: each query has one answer
        lookup = dict(zip(keys, values, strict=True))
        queries = np.flatnonzero(weights)
        assert len(queries) == 6 and (queries >= 12).all()
        assert all(targets[q] == lookup[inputs[q]] for q in queries)
    with pytest.raises(ValueError, match="seq_len must be an int >= 18"):
        AssociativeRecall(num_pairs=6, seq_len=10)


@pytest.mark.parametrize("selective", [False, True])
def test_copying_targets_are_the_tokens_in_order(selective):
    task = Copying(vocab_size=10, num_tokens=5, seq_len=12, selective=selective)
    batch = task.batch("train", 0, 4)
    source_len = 12 if selective else 5
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"], strict=True):
        source = inputs[:source_len]
        answer = targets[weights > 0]
        np.testing.assert_array_equal(answer, source[source > 0])
        assert inputs[source_len] == 1  # separator
    seq2seq = Copying(vocab_size=10, num_tokens=5, format="seq2seq").batch("train", 0, 2)
    np.testing.assert_array_equal(seq2seq["targets"], seq2seq["sources"])
    assert (seq2seq["inputs"][:, 0] == 1).all()


def test_char_lm_on_pydoc_topics_and_on_a_file(tmp_path):
    task = CharLM(seq_len=64)
    train, val = task._splits()
    assert 400_000 < len(train) + len(val) < 600_000 and len(val) == pytest.approx(
        0.1 * (len(train) + len(val)), rel=0.01
    )
    batch = task.batch("train", 0, 2)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])  # next-character targets
    assert task.spec.vocab_size == len(task.vocabulary)
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 20)
    small = CharLM(text=str(path), seq_len=8)
    assert small.decode(small.encode("cab")) == "cab" and small.spec.vocab_size == 10
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CharLM(text=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        CharLM(text=str(path), seq_len=100)
    with pytest.raises(ValueError, match="split='test': CharLM has a 'train' and a 'val' split only"):
        small.batch("test", 0, 2)  # it would have been the validation text under another name


def test_char_lm_draws_every_window_so_the_last_character_is_a_target(tmp_path):
    path = tmp_path / "digits.txt"
    path.write_text("0123456789")  # train "01234", validation "56789"; token id = digit
    task = CharLM(text=str(path), seq_len=3, val_fraction=0.5)  # two windows of 4 per split
    for split, last in (("train", 4), ("val", 9)):
        targets = task.batch(split, 0, 64)["targets"]
        assert (targets[:, -1] == last).any() and (targets[:, -1] == last - 1).any()
    whole = CharLM(text=str(path), seq_len=4, val_fraction=0.5).batch("train", 0, 3)  # one window
    np.testing.assert_array_equal(whole["targets"], [[1, 2, 3, 4]] * 3)
    with pytest.raises(ValueError, match="has 5 characters, fewer than seq_len \\+ 1 = 6"):
        CharLM(text=str(path), seq_len=5, val_fraction=0.5)
