"""Small pre-norm transformers whose attention is a ``jattn.variants`` variant.

- ``TransformerBlock``: pre-norm (Xiong et al. 2020) self-attention, optional cross-attention, MLP.
- ``EncoderClassifier``: encoder + pooling (CLS token or mean over valid positions) + linear head
  (the Long Range Arena classifier, Tay et al. 2021).
- ``DecoderLM``: causal decoder language model.
- ``EncoderDecoder``: encoder, and a causal decoder with cross-attention (Vaswani et al. 2017).

Every ``__call__`` takes ``key``: a PRNG key for dropout and random-feature variants while
training, None for a deterministic evaluation. Logits are float32 whatever the compute dtype.

Token ids must lie in ``[0, vocab_size)``. Concrete ids are checked; under ``jit`` they cannot be,
and an id >= vocab_size gives NaN logits while a negative id counts from the end of the table.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn import masks as masks_lib
from jattn._checks import check_bool, check_int
from jattn.masks import _is_concrete
from jattn.nn.attention import MultiHeadAttention, takes_mask
from jattn.nn.positions import POSITION_KINDS, sinusoidal_table
from jattn.variants import Variant, resolve_variant

POOLING_KINDS = ("cls", "mean")


def _check_dropout_rate(rate: Any) -> float:
    """``rate`` as a float in ``[0, 1)``: a negative rate would scale activations up, 1 drops everything."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"dropout_rate must be a number in [0, 1), got {type(rate).__name__} {rate!r}")
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got dropout_rate={rate}")
    return rate


def dropout(x, rate: float, key: jax.Array | None):
    """Inverted dropout; the identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _split(key: jax.Array | None, num: int) -> list[jax.Array | None]:
    return [None] * num if key is None else list(jax.random.split(key, num))


def param_count(module: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


class MLP(nnx.Module):
    """``Linear(D -> mlp_dim)``, GELU, ``Linear(mlp_dim -> D)``."""

    def __init__(self, width: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs):
        self.up = nnx.Linear(width, mlp_dim, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(mlp_dim, width, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, rate: float, key):
        return self.down(dropout(jax.nn.gelu(self.up(x)), rate, key))


class TransformerBlock(nnx.Module):
    """Pre-norm block: ``x + attn(LN(x))``, [``x + cross(LN(x), memory)``], ``x + mlp(LN(x))``.

    Args:
      width: D. num_heads: N. mlp_dim: hidden width of the MLP.
      variant: the self-attention (a ``jattn.variants`` variant or its registered name, or None for
        full softmax).
      causal: decoder self-attention.
      rotary: rotary position encoding in the self-attention.
      cross: add cross-attention to an encoder's output (full softmax, padding-masked).
      dropout_rate: in [0, 1), after attention, MLP hidden layer and MLP output.
      max_len: the longest sequence (for variants with parameters).
      dtype: compute dtype (parameters stay float32).
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        variant: Variant | str | None,
        causal: bool = False,
        rotary: bool = False,
        cross: bool = False,
        dropout_rate: float = 0.0,
        max_len: int | None = None,
        num_kv_heads: int | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        width = check_int("width", width)
        mlp_dim = check_int("mlp_dim", mlp_dim)
        cross = check_bool("cross", cross)
        self.dropout_rate = _check_dropout_rate(dropout_rate)
        self.norm_attention = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.attention = MultiHeadAttention(
            width,
            num_heads,
            num_kv_heads=num_kv_heads,
            variant=variant,
            causal=causal,
            rotary=rotary,
            max_len=max_len,
            rngs=rngs,
        )
        self.norm_cross = nnx.LayerNorm(width, dtype=dtype, rngs=rngs) if cross else None
        self.cross = (
            MultiHeadAttention(width, num_heads, num_kv_heads=num_kv_heads, rngs=rngs) if cross else None
        )
        self.norm_mlp = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, mask=None, memory=None, memory_mask=None, key=None):
        """``x [B, T, D]``; ``memory [B, S, D]`` for cross-attention. Returns ``[B, T, D]``."""
        # Five keys, the last unused: four would change every stream, and the committed runs with
        # dropout would no longer reproduce.
        k_attn, k_drop1, k_cross, k_mlp, _ = _split(key, 5)
        rate = self.dropout_rate
        x = x + dropout(self.attention(self.norm_attention(x), mask=mask, key=k_attn), rate, k_drop1)
        if self.cross is not None:
            if memory is None:
                raise ValueError("this block has cross-attention, so memory (the encoder output) is required")
            h = self.cross(self.norm_cross(x), memory, mask=memory_mask)
            x = x + dropout(h, rate, k_cross)
        mlp_key, out_key = _split(k_mlp, 2)
        return x + dropout(self.mlp(self.norm_mlp(x), rate=rate, key=mlp_key), rate, out_key)


class Embedder(nnx.Module):
    """Token embedding plus an absolute position encoding ("learned", "sinusoidal"; "rotary" and
    "none" add nothing here). Checks the length against ``max_len``, and the token ids against
    ``vocab_size`` where they are concrete."""

    def __init__(self, vocab_size: int, width: int, *, max_len: int, position: str, dtype, rngs: nnx.Rngs):
        if position not in POSITION_KINDS:
            raise ValueError(f"position must be one of {POSITION_KINDS}, got {position!r}")
        vocab_size = check_int("vocab_size", vocab_size)
        width = check_int("width", width)
        max_len = check_int("max_len", max_len)
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.position = position
        self.dtype = dtype
        self.tokens = nnx.Embed(vocab_size, width, rngs=rngs)
        self.learned = nnx.Embed(max_len, width, rngs=rngs) if position == "learned" else None
        self.table = (
            nnx.data(jnp.asarray(sinusoidal_table(max_len, width))) if position == "sinusoidal" else None
        )

    def check_length(self, length: int, name: str = "tokens") -> None:
        if length > self.max_len:
            raise ValueError(
                f"sequence length {length} of {name} exceeds the model's max_len={self.max_len}; "
                "raise model.max_len or shorten the data"
            )

    def check_ids(self, tokens, name: str = "tokens") -> None:
        """Integer ids in ``[0, vocab_size)``; the range is checked only where ``tokens`` is concrete."""
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
        if not _is_concrete(tokens):
            return
        ids = np.asarray(tokens)
        outside = np.unique(ids[(ids < 0) | (ids >= self.vocab_size)])
        if outside.size:
            shown = ", ".join(str(i) for i in outside[:8]) + (", ..." if outside.size > 8 else "")
            raise ValueError(
                f"{name} must hold ids in [0, vocab_size={self.vocab_size}), got ids outside it: {shown}"
            )

    def __call__(self, tokens, *, offset: int = 0, name: str = "tokens"):
        """``tokens [B, T]`` int ids in ``[0, vocab_size)`` -> ``[B, T, D]`` in the compute dtype
        (positions start at offset); ``name`` is the caller's argument, for error messages.

        Ids outside the range raise a ValueError where ``tokens`` is concrete. Under ``jit`` they
        cannot be checked: an id >= vocab_size then embeds as NaN (so the logits are NaN) and a
        negative id counts from the end of the table (Flax ``Embed``).
        """
        tokens = jnp.asarray(tokens)
        self.check_ids(tokens, name)
        self.check_length(tokens.shape[-1] + offset, name)
        x = self.tokens(tokens)  # [B, T, D]
        positions = jnp.arange(offset, offset + tokens.shape[-1])
        if self.learned is not None:
            x = x + self.learned(positions)
        elif self.table is not None:
            x = x + self.table[positions]
        return x.astype(self.dtype)


def _stack(depth: int, **block_kwargs) -> nnx.List:
    rngs = block_kwargs.pop("rngs")
    return nnx.List([TransformerBlock(**block_kwargs, rngs=rngs) for _ in range(depth)])


def _run_stack(blocks, x, *, key, **kwargs):
    for block, block_key in zip(blocks, _split(key, len(blocks)), strict=True):
        x = block(x, key=block_key, **kwargs)
    return x


def _batch_and_length(name: str, tokens) -> tuple[int, int]:
    """B and T of ``tokens [B, T]``; a ValueError naming ``name`` for any other number of dims."""
    shape = tuple(jnp.shape(tokens))
    if len(shape) != 2:
        raise ValueError(
            f"{name} must be token ids of shape [B, T], got shape {shape} (one sequence: {name}[None])"
        )
    return shape


def _valid_lengths(name: str, lengths, batch: int, length: int) -> jax.Array:
    """``lengths [B]`` as int32 in ``[0, length]``: checked where concrete, clipped under ``jit``."""
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integer lengths, got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), one length per sequence, got {lengths.shape}")
    if _is_concrete(lengths):
        values = np.asarray(lengths)
        if np.any((values < 0) | (values > length)):
            raise ValueError(f"{name} must lie in [0, {length}] (the padded length), got {values}")
    return jnp.clip(lengths, 0, length).astype(jnp.int32)


def _padding_mask(variant: Variant | None, lengths):
    """A padding mask where the attention can apply one (every registered variant; a custom one
    without a ``mask`` argument cannot), else None."""
    if lengths is None or (variant is not None and not takes_mask(variant)):
        return None
    return masks_lib.padding(lengths)


class _Transformer(nnx.Module):
    """Shared construction: embedder, blocks, final norm."""

    def __init__(
        self,
        vocab_size: int,
        *,
        max_len: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        variant: Variant | str | None,
        causal: bool,
        position: str,
        dropout_rate: float,
        num_kv_heads: int | None,
        cross: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        depth = check_int("depth", depth)
        variant = resolve_variant(variant)
        self.variant = variant
        self.dropout_rate = _check_dropout_rate(dropout_rate)
        self.embed = Embedder(vocab_size, width, max_len=max_len, position=position, dtype=dtype, rngs=rngs)
        self.blocks = _stack(
            depth,
            width=width,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            variant=variant,
            causal=causal,
            rotary=position == "rotary",
            cross=cross,
            dropout_rate=dropout_rate,
            max_len=max_len,
            num_kv_heads=num_kv_heads,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)

    @property
    def masks_padding(self) -> bool:
        """Whether padded positions are masked out of attention (a variant that takes a mask) or attended."""
        return self.variant is None or takes_mask(self.variant)


class EncoderClassifier(_Transformer):
    """Encoder classifier (LRA): embed, encoder blocks, pool, linear head.

    Args:
      vocab_size: token ids are in ``[0, vocab_size)``.
      num_classes: C.
      max_len: longest input (plus one for the CLS token).
      pooling: "cls" (a learned token prepended at position 0) or "mean" (over valid positions).
      The rest: see ``TransformerBlock``; ``position`` is one of "learned", "sinusoidal", "rotary", "none".
    """

    def __init__(self, vocab_size: int, num_classes: int, *, pooling: str = "cls", **kwargs):
        if pooling not in POOLING_KINDS:
            raise ValueError(f"pooling must be one of {POOLING_KINDS}, got {pooling!r}")
        num_classes = check_int("num_classes", num_classes)
        rngs = kwargs["rngs"]
        super().__init__(vocab_size, causal=False, cross=False, **kwargs)
        self.pooling = pooling
        width = kwargs["width"]
        self.cls = nnx.Param(jax.random.normal(rngs.params(), (width,)) * 0.02) if pooling == "cls" else None
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, tokens, *, lengths=None, key=None):
        """``tokens [B, T]`` int, ``lengths [B]`` valid lengths (None: all valid) -> ``[B, C]`` float32."""
        embed_key, blocks_key = _split(key, 2)
        batch, length = _batch_and_length("tokens", tokens)
        lengths = (
            jnp.full((batch,), length, jnp.int32)
            if lengths is None
            else _valid_lengths("lengths", lengths, batch, length)
        )
        if self.cls is not None:
            self.embed.check_length(length + 1, "tokens plus the CLS token")
            x = self.embed(tokens, offset=1)  # [B, T, D]
            cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (batch, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)  # [B, T + 1, D]
            lengths = lengths + 1
        else:
            x = self.embed(tokens)
        x = dropout(x, self.dropout_rate, embed_key)
        x = self.norm(_run_stack(self.blocks, x, key=blocks_key, mask=_padding_mask(self.variant, lengths)))
        if self.cls is not None:
            pooled = x[:, 0]  # [B, D]
        else:
            valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]  # [B, T]
            total = jnp.sum(jnp.where(valid[..., None], x.astype(jnp.float32), 0.0), axis=1)
            pooled = total / jnp.maximum(lengths, 1)[:, None]
        return self.head(pooled.astype(jnp.float32))


class DecoderLM(_Transformer):
    """Causal decoder language model: ``tokens [B, T] -> logits [B, T, V]`` for the next token."""

    def __init__(self, vocab_size: int, **kwargs):
        rngs = kwargs["rngs"]
        super().__init__(vocab_size, causal=True, cross=False, **kwargs)
        self.head = nnx.Linear(kwargs["width"], vocab_size, rngs=rngs)

    def __call__(self, tokens, *, key=None):
        _batch_and_length("tokens", tokens)
        embed_key, blocks_key = _split(key, 2)
        x = dropout(self.embed(tokens), self.dropout_rate, embed_key)
        x = self.norm(_run_stack(self.blocks, x, key=blocks_key))
        return self.head(x.astype(jnp.float32))


class EncoderDecoder(nnx.Module):
    """Encoder over ``source``, causal decoder over ``target_in`` with cross-attention.

    Both stacks share the settings (``TransformerBlock``); the variant is used for both
    self-attentions, cross-attention is full softmax with the source's padding masked.
    """

    def __init__(self, source_vocab_size: int, target_vocab_size: int, **kwargs):
        source_vocab_size = check_int("source_vocab_size", source_vocab_size)
        target_vocab_size = check_int("target_vocab_size", target_vocab_size)
        rngs = kwargs["rngs"]
        self.encoder = _Transformer(source_vocab_size, causal=False, cross=False, **kwargs)
        self.decoder = _Transformer(target_vocab_size, causal=True, cross=True, **kwargs)
        self.head = nnx.Linear(kwargs["width"], target_vocab_size, rngs=rngs)

    def __call__(self, source, target_in, *, source_lengths=None, key=None):
        """``source [B, S]``, ``target_in [B, T]`` int, ``source_lengths [B]`` -> ``[B, T, V]`` float32."""
        batch, source_len = _batch_and_length("source", source)
        _, target_len = _batch_and_length("target_in", target_in)
        k_src, k_enc, k_tgt, k_dec = _split(key, 4)
        if source_lengths is not None:
            source_lengths = _valid_lengths("source_lengths", source_lengths, batch, source_len)
        enc = self.encoder
        memory = dropout(enc.embed(source, name="source"), enc.dropout_rate, k_src)
        memory = enc.norm(
            _run_stack(enc.blocks, memory, key=k_enc, mask=_padding_mask(enc.variant, source_lengths))
        )
        memory_mask = None
        if source_lengths is not None:
            target_lengths = jnp.full_like(source_lengths, target_len)
            memory_mask = masks_lib.padding(target_lengths, source_lengths)
        dec = self.decoder
        x = dropout(dec.embed(target_in, name="target_in"), dec.dropout_rate, k_tgt)
        x = dec.norm(_run_stack(dec.blocks, x, key=k_dec, memory=memory, memory_mask=memory_mask))
        return self.head(x.astype(jnp.float32))
