"""ListOps as in Long Range Arena (Nangia & Bowman 2018; Tay et al. 2021).

Nested expressions such as ``[MAX 2 9 [MIN 4 7 ] 0 ]`` over the operators MIN, MAX, MED (median)
and SM (sum modulo 10); the label (10 classes) is the value of the expression. Expressions are
drawn as in LRA (a leaf with probability 0.75 below the maximum depth, 2 to ``max_args``
arguments) and kept when their token count lies in ``[min_len, max_len]``.

The tokenizer keeps every bracket: an operator token carries its opening bracket (``[MAX``) and
``]`` is a token, so the tree is recoverable from the tokens (LRA's released pipeline dropped the
brackets, which left the task ambiguous).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jattn._checks import check_int
from jattn.data.base import TaskSpec, batch_rng

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
PAD = 0
VOCAB = ("<pad>", *[str(d) for d in range(10)], *OPERATORS, "]")
TOKEN_IDS = {token: i for i, token in enumerate(VOCAB)}
NUM_CLASSES = 10
_LEAF_PROBABILITY = 0.75
_MAX_DRAWS = 10_000  # expressions ``ListOps.example`` draws before it gives up (LRA's settings: ~11)
# Of _MAX_DRAWS draws, at least this many must fall in the length range when the task is built
# (1 in 500): rarer lengths would exhaust an example's draws somewhere in a long run.
_MIN_IN_RANGE = 20


class _TooLong(Exception):
    pass


def _draw(rng: np.random.Generator, depth: int, max_depth: int, max_args: int, out: list, limit: int) -> int:
    """Append one expression's tokens to ``out`` and return its value (raises past ``limit``)."""
    if len(out) >= limit:
        raise _TooLong
    if depth >= max_depth or rng.random() < _LEAF_PROBABILITY:
        value = int(rng.integers(10))
        out.append(str(value))
        return value
    op = OPERATORS[rng.integers(len(OPERATORS))]
    out.append(op)
    args = [
        _draw(rng, depth + 1, max_depth, max_args, out, limit) for _ in range(rng.integers(2, max_args + 1))
    ]
    out.append("]")
    return evaluate_op(op, args)


def longest_expression(max_depth: int, max_args: int) -> int:
    """The most tokens ``_draw`` can emit: every operator above ``max_depth`` takes ``max_args``
    arguments, and an operator costs two tokens (``[OP`` and ``]``) besides its arguments."""
    length = 1  # a leaf at max_depth
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


def evaluate_op(op: str, args: list[int]) -> int:
    """The value of ``[OP args... ]``."""
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return int(np.median(args))
    return sum(args) % 10


def evaluate(tokens: list[str]) -> int:
    """Evaluate a token list (the inverse of the tokenizer's job: proves the brackets suffice)."""
    stack: list[list] = []
    for token in tokens:
        if token in OPERATORS:
            stack.append([token])
        elif token == "]":
            op, *args = stack.pop()
            value = evaluate_op(op, args)
            if not stack:
                return value
            stack[-1].append(value)
        elif stack:
            stack[-1].append(int(token))
        else:
            return int(token)
    raise ValueError(f"unbalanced expression: {' '.join(tokens)}")


def tokenize(text: str) -> np.ndarray:
    """``"[MAX 2 9 ]"`` -> int32 ids (whitespace-separated tokens, brackets kept)."""
    try:
        return np.array([TOKEN_IDS[t] for t in text.split()], np.int32)
    except KeyError as err:
        raise ValueError(f"unknown ListOps token {err.args[0]!r}; known: {VOCAB[1:]}") from None


@dataclasses.dataclass(frozen=True)
class ListOps:
    """The ListOps task; ``batch`` returns the "classification" format, padded to ``max_len``.

    Attributes:
      min_len, max_len: token-count range of the expressions (LRA: 500–2000).
      max_depth: maximum nesting depth (LRA: 10). max_args: most arguments per operator (LRA: 10).
      seed: the data seed.
    """

    min_len: int = 500
    max_len: int = 2000
    max_depth: int = 10
    max_args: int = 10
    seed: int = 0

    def __post_init__(self):
        check_int("seed", self.seed, minimum=0)
        check_int("min_len", self.min_len)
        check_int("max_len", self.max_len)
        check_int("max_depth", self.max_depth)
        check_int("max_args", self.max_args, minimum=2)
        if self.min_len > self.max_len:
            raise ValueError(
                f"min_len must be <= max_len, got min_len={self.min_len}, max_len={self.max_len}"
            )
        longest = longest_expression(self.max_depth, self.max_args)
        if self.min_len > longest:
            raise ValueError(
                f"min_len must be <= {longest}, the longest expression of max_depth={self.max_depth} and "
                f"max_args={self.max_args}, got min_len={self.min_len}; lower min_len or raise max_depth "
                "or max_args"
            )
        self._check_lengths_are_drawn_often_enough()

    def _in_range_draws(self, rng: np.random.Generator):
        """(tokens, value) of each of ``_MAX_DRAWS`` draws whose length is in range."""
        for _ in range(_MAX_DRAWS):
            tokens: list[str] = []
            try:
                value = _draw(rng, 1, self.max_depth, self.max_args, tokens, self.max_len + 1)
            except _TooLong:
                continue
            if self.min_len <= len(tokens) <= self.max_len:
                yield tokens, value

    def _check_lengths_are_drawn_often_enough(self) -> None:
        draws = self._in_range_draws(np.random.default_rng(0))
        in_range = sum(1 for _ in itertools.islice(draws, _MIN_IN_RANGE))  # stops at the bound
        if in_range == _MIN_IN_RANGE:
            return
        raise ValueError(
            f"only {in_range} of {_MAX_DRAWS} ListOps expressions (max_depth={self.max_depth}, "
            f"max_args={self.max_args}) have min_len={self.min_len} to max_len={self.max_len} tokens, "
            f"fewer than {_MIN_IN_RANGE}: a long run would run out of draws for some example; lower "
            "min_len, or raise max_len or max_depth"
        )

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec("classification", len(VOCAB), self.max_len, NUM_CLASSES)

    def example(self, rng: np.random.Generator) -> tuple[list[str], int]:
        """One expression with ``min_len <= len(tokens) <= max_len`` and its value.

        Raises:
          ValueError: none of ``_MAX_DRAWS`` draws had a length in range (too rare to draw).
        """
        drawn = next(self._in_range_draws(rng), None)
        if drawn is not None:
            return drawn
        raise ValueError(
            f"no ListOps expression of min_len={self.min_len} to max_len={self.max_len} tokens in "
            f"{_MAX_DRAWS} draws (max_depth={self.max_depth}, max_args={self.max_args}): such lengths "
            "are too rare; use a smaller min_len"
        )

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = batch_rng(self.seed, split, index, batch_size)
        inputs = np.full((batch_size, self.max_len), PAD, np.int32)
        lengths = np.zeros(batch_size, np.int32)
        labels = np.zeros(batch_size, np.int32)
        for row in range(batch_size):
            tokens, labels[row] = self.example(rng)
            lengths[row] = len(tokens)
            inputs[row, : len(tokens)] = [TOKEN_IDS[t] for t in tokens]
        return {"inputs": inputs, "lengths": lengths, "labels": labels}
