"""jattn: attention for JAX researchers, exact against a float64 oracle.

Shape legend, used in every docstring, annotation, einsum and comment:

    B  batch (any number of leading dims, or none)     T  query length
    S  key/value length                                N  query heads
    K  key/value heads (N % K == 0; K == N multi-head, K == 1 multi-query, else grouped-query)
    H  head dim (queries and keys)                     Hv value head dim
    G  query heads per key/value head (N / K)          D  model width

Public layout: q ``[B..., T, N, H]``, k ``[B..., S, K, H]``, v ``[B..., S, K, Hv]``.
"""

import importlib as _importlib

from jattn import kernels, masks, reference, variants
from jattn.attention import (
    Choice,
    Problem,
    attention,
    choose,
    explain,
    implementations,
    register_implementation,
)
from jattn.core import sparse  # registers the "banded" and "block_sparse" implementations
from jattn.core.linear import linear_attention, linformer_attention, performer_attention
from jattn.core.multihead import init_multi_head_attention, multi_head_attention
from jattn.kernels import flash_attention
from jattn.modifiers import alibi_bias, alibi_slopes

__all__ = [
    "Choice",
    "alibi_bias",
    "alibi_slopes",
    "Problem",
    "attention",
    "choose",
    "explain",
    "flash_attention",
    "implementations",
    "kernels",
    "init_multi_head_attention",
    "linear_attention",
    "linformer_attention",
    "masks",
    "multi_head_attention",
    "performer_attention",
    "reference",
    "register_implementation",
    "sparse",
    "variants",
]
__version__ = "0.1.0"

# Imported on first use (``jattn.nn.MultiHeadAttention``, ``jattn.train.load_run``): they bring in
# Flax, Optax, Orbax or matplotlib, which the attention functions do not need.
_SUBMODULES_ON_FIRST_USE = frozenset({"data", "flops", "maps", "nn", "parallel", "scaling", "train", "viz"})


def __getattr__(name: str):
    if name in _SUBMODULES_ON_FIRST_USE:
        return _importlib.import_module(f"jattn.{name}")
    raise AttributeError(f"module 'jattn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES_ON_FIRST_USE)
