"""Flax NNX modules over jattn's pure functions: attention layer, transformer blocks, models."""

from jattn.nn.attention import MultiHeadAttention
from jattn.nn.models import (
    DecoderLM,
    EncoderClassifier,
    EncoderDecoder,
    TransformerBlock,
    param_count,
)
from jattn.nn.positions import apply_rotary, sinusoidal_table

__all__ = [
    "DecoderLM",
    "EncoderClassifier",
    "EncoderDecoder",
    "MultiHeadAttention",
    "TransformerBlock",
    "apply_rotary",
    "param_count",
    "sinusoidal_table",
]
