"""Copying and selective copying (Arjovsky et al. 2016; Gu & Dao 2023, "Mamba").

- Copying: ``num_tokens`` random tokens, then the separator; the model writes them out again.
- Selective copying: the ``num_tokens`` tokens are scattered among ``seq_len`` blanks; the model
  writes out only the tokens, in order.

Tokens are in ``[2, vocab_size)``; 0 is the blank and 1 the separator (also the decoder's start
token in the "seq2seq" format). ``format`` picks a causal decoder ("sequence") or an
encoder–decoder ("seq2seq") batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jattn._checks import check_int
from jattn.data.base import TaskSpec, as_seq2seq, as_sequence, batch_rng

BLANK, SEPARATOR = 0, 1


@dataclasses.dataclass(frozen=True)
class Copying:
    """Attributes: vocab_size, num_tokens, seq_len (selective only: the scattered length), selective,
    format ("sequence" or "seq2seq"), seed."""

    vocab_size: int = 16
    num_tokens: int = 16
    seq_len: int = 64
    selective: bool = False
    format: str = "sequence"
    seed: int = 0

    def __post_init__(self):
        check_int("seed", self.seed, minimum=0)
        check_int("vocab_size", self.vocab_size, minimum=3)
        check_int("num_tokens", self.num_tokens)
        if self.selective:
            check_int("seq_len", self.seq_len, minimum=self.num_tokens)
        if self.format not in ("sequence", "seq2seq"):
            raise ValueError(f"format must be 'sequence' or 'seq2seq', got {self.format!r}")

    @property
    def _source_len(self) -> int:
        return self.seq_len if self.selective else self.num_tokens

    @property
    def spec(self) -> TaskSpec:
        if self.format == "seq2seq":
            return TaskSpec("seq2seq", self.vocab_size, self.num_tokens, self.vocab_size, self._source_len)
        return TaskSpec("sequence", self.vocab_size, self._source_len + self.num_tokens, self.vocab_size)

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = batch_rng(self.seed, split, index, batch_size)
        answers = rng.integers(2, self.vocab_size, (batch_size, self.num_tokens)).astype(np.int32)
        if self.selective:
            sources = np.full((batch_size, self.seq_len), BLANK, np.int32)
            for row in range(batch_size):
                where = np.sort(rng.choice(self.seq_len, self.num_tokens, replace=False))
                sources[row, where] = answers[row]
        else:
            sources = answers
        if self.format == "seq2seq":
            return as_seq2seq(sources, answers, SEPARATOR)
        separator = np.full((batch_size, 1), SEPARATOR, np.int32)
        return as_sequence(np.concatenate([sources, separator], axis=1), answers)
