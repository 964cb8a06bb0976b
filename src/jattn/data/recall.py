"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology").

A sequence starts with ``num_pairs`` key–value pairs ``k1 v1 k2 v2 …``; later, each key appears
again at a random position, and the model must predict the value that followed it. Keys come from
the first half of the vocabulary, values from the second; other positions hold the blank token 0.
A causal decoder is scored only at the query positions (the "sequence" format).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jattn._checks import check_int
from jattn.data.base import TaskSpec, batch_rng

BLANK = 0


@dataclasses.dataclass(frozen=True)
class AssociativeRecall:
    """Attributes: vocab_size (keys and values each take half of ``[1, vocab_size)``), seq_len,
    num_pairs (each queried once), seed."""

    vocab_size: int = 64
    seq_len: int = 128
    num_pairs: int = 8
    seed: int = 0

    def __post_init__(self):
        check_int("seed", self.seed, minimum=0)
        check_int("num_pairs", self.num_pairs)
        check_int("vocab_size", self.vocab_size, minimum=2 * self.num_pairs + 1)
        check_int("seq_len", self.seq_len, minimum=3 * self.num_pairs)

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec("sequence", self.vocab_size, self.seq_len, self.vocab_size)

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = batch_rng(self.seed, split, index, batch_size)
        half = (self.vocab_size - 1) // 2
        pairs, length = self.num_pairs, self.seq_len
        inputs = np.full((batch_size, length), BLANK, np.int32)
        targets = np.zeros((batch_size, length), np.int32)
        weights = np.zeros((batch_size, length), np.float32)
        for row in range(batch_size):
            keys = 1 + rng.choice(half, pairs, replace=False)  # [P]
            values = 1 + half + rng.integers(0, half, pairs)  # [P]
            inputs[row, 0 : 2 * pairs : 2] = keys
            inputs[row, 1 : 2 * pairs : 2] = values
            query_pos = 2 * pairs + np.sort(rng.choice(length - 2 * pairs, pairs, replace=False))
            order = rng.permutation(pairs)
            inputs[row, query_pos] = keys[order]
            targets[row, query_pos] = values[order]
            weights[row, query_pos] = 1.0
        return {"inputs": inputs, "targets": targets, "weights": weights}
