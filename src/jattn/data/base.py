"""What every task provides: a description (``TaskSpec``) and batches that are a pure function of
(seed, split, index), so a resumed run sees exactly the batches an uninterrupted one would.

Batch formats (NumPy arrays):

- "classification": ``inputs [B, T]`` int32, ``lengths [B]`` int32, ``labels [B]`` int32.
- "sequence": ``inputs [B, T]``, ``targets [B, T]`` int32 and ``weights [B, T]`` float32 (which
  positions are scored), for a causal decoder.
- "seq2seq": ``sources [B, S]``, ``source_lengths [B]``, ``inputs [B, T]`` (decoder inputs),
  ``targets [B, T]``, ``weights [B, T]``, for an encoder–decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from jattn._checks import check_int

FORMATS = ("classification", "sequence", "seq2seq")
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a model needs to know about a task.

    Attributes:
      format: one of ``FORMATS``.
      vocab_size: input token ids are in ``[0, vocab_size)``.
      max_len: the longest input (decoder input for "seq2seq") a batch holds.
      num_classes: classes ("classification") or output vocabulary ("sequence", "seq2seq").
      max_source_len: the longest source ("seq2seq" only).
    """

    format: str
    vocab_size: int
    max_len: int
    num_classes: int
    max_source_len: int = 0


class Task(Protocol):
    spec: TaskSpec

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Batch number ``index`` of ``split``; the same arguments always give the same batch."""
        ...


def data_fingerprint(task: Task) -> str | None:
    """What a task's batches are drawn from beyond its config, so a resumed run can check they did
    not change: a task reading a file defines ``fingerprint()`` (a hash of the text); one generated
    from its seed has none, its config saying it all."""
    fingerprint = getattr(task, "fingerprint", None)
    return None if fingerprint is None else fingerprint()


def batch_rng(seed: int, split: str, index: int, batch_size: int) -> np.random.Generator:
    """The generator for one batch of ``batch_size`` examples: independent streams per
    (seed, split, index). Every ``Task.batch`` starts here, so its arguments are checked here."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    check_int("index", index, minimum=0)
    check_int("batch_size", batch_size)
    return np.random.default_rng([seed, SPLITS[split], index])


def as_sequence(prefixes: np.ndarray, answers: np.ndarray) -> dict[str, np.ndarray]:
    """Teacher-forced decoder batch: read ``prefix`` then predict each token of ``answer``.

    ``prefixes [B, P]``, ``answers [B, A]`` -> inputs ``[B, P + A - 1]`` whose last A predictions
    are scored against the answer.
    """
    inputs = np.concatenate([prefixes, answers[:, :-1]], axis=1).astype(np.int32)  # [B, P + A - 1]
    prefix_len = prefixes.shape[1]
    targets = np.zeros_like(inputs)
    targets[:, prefix_len - 1 :] = answers
    weights = np.zeros(inputs.shape, np.float32)
    weights[:, prefix_len - 1 :] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


def as_seq2seq(sources: np.ndarray, answers: np.ndarray, start_token: int) -> dict[str, np.ndarray]:
    """Encoder–decoder batch: the decoder reads ``[start, answer[:-1]]`` and predicts ``answer``."""
    batch = sources.shape[0]
    start = np.full((batch, 1), start_token, np.int32)
    return {
        "sources": sources.astype(np.int32),
        "source_lengths": np.full((batch,), sources.shape[1], np.int32),
        "inputs": np.concatenate([start, answers[:, :-1]], axis=1).astype(np.int32),
        "targets": answers.astype(np.int32),
        "weights": np.ones(answers.shape, np.float32),
    }
