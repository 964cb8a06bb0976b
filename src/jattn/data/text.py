"""Character-level language modelling on the ``pydoc_data`` topics (ships with every CPython,
about 465k characters) or on a text file the user names.

The text is split into train (first ``1 - val_fraction``) and validation (the rest; there is no
test split); a batch is ``batch_size`` windows of ``seq_len + 1`` characters drawn at random from
its split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib

import numpy as np

from jattn._checks import check_int
from jattn.data.base import TaskSpec, as_sequence, batch_rng

PYDOC_TOPICS = "pydoc_data"


@functools.lru_cache(maxsize=4)
def load_text(source: str) -> str:
    """The corpus text: ``"pydoc_data"`` or a path to a UTF-8 text file."""
    if source == PYDOC_TOPICS:
        from pydoc_data.topics import topics

        return "\n".join(topics[name] for name in sorted(topics))
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"text file {str(path)!r} (task.text) does not exist; give a file or 'pydoc_data'"
        )
    return path.read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class CharLM:
    """Attributes: text ("pydoc_data" or a file path), seq_len, val_fraction, seed."""

    text: str = PYDOC_TOPICS
    seq_len: int = 256
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        check_int("seed", self.seed, minimum=0)
        check_int("seq_len", self.seq_len)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name, part in zip(("train", "validation"), self._splits(), strict=True):
            if len(part) < self.seq_len + 1:
                raise ValueError(
                    f"the {name} split of {self.text!r} has {len(part)} characters, fewer than seq_len + 1 = "
                    f"{self.seq_len + 1}; use a longer text or a shorter seq_len"
                )

    def fingerprint(self) -> str:
        """The SHA-256 of the text (``data.data_fingerprint``): a file edited, or the ``pydoc_data``
        topics of another Python release, draw other batches from the same config."""
        return "sha256:" + hashlib.sha256(load_text(self.text).encode("utf-8")).hexdigest()

    @functools.cached_property
    def vocabulary(self) -> str:
        """The sorted distinct characters of the whole text (token id = index)."""
        return "".join(sorted(set(load_text(self.text))))

    def encode(self, text: str) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.vocabulary)}
        return np.array([lookup[c] for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.vocabulary[int(i)] for i in ids)

    def _splits(self) -> tuple[np.ndarray, np.ndarray]:
        ids = _encoded(self.text)
        cut = int(len(ids) * (1.0 - self.val_fraction))
        return ids[:cut], ids[cut:]

    @property
    def spec(self) -> TaskSpec:
        size = len(self.vocabulary)
        return TaskSpec("sequence", size, self.seq_len, size)

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        if split == "test":  # a test split drawn from the validation text would be one in name only
            raise ValueError("split='test': CharLM has a 'train' and a 'val' split only (val_fraction)")
        rng = batch_rng(self.seed, split, index, batch_size)
        ids = self._splits()[0 if split == "train" else 1]
        starts = rng.integers(0, len(ids) - self.seq_len, batch_size)  # every window of seq_len + 1
        windows = np.stack([ids[s : s + self.seq_len + 1] for s in starts])  # [B, T + 1]
        return as_sequence(windows[:, :1], windows[:, 1:])


@functools.lru_cache(maxsize=4)
def _encoded(source: str) -> np.ndarray:
    text = load_text(source)
    lookup = {c: i for i, c in enumerate(sorted(set(text)))}
    return np.array([lookup[c] for c in text], np.int32)
