"""``implementation="cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``.

The peer our own kernel is measured against, and ``implementation=None``'s first choice on NVIDIA
GPUs for the calls it can run: on an H200 it ran 1.4-2.5x as fast as the flash kernel
(``benchmarks/RESULTS.md``). cuDNN covers fewer cases than jattn's own
implementations; ``supports_cudnn`` names the first thing it lacks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn import masks as masks_lib
from jattn.core._common import attached_gpu, pre_ampere_reason


def _mask_arguments(mask) -> dict | None:
    """jax.nn.dot_product_attention keywords for the masks cuDNN runs natively, else None."""
    if mask is None:
        return {}
    if isinstance(mask, masks_lib.SlidingWindow):
        if mask.left is None and mask.right == 0:
            return {"is_causal": True}
        if mask.left is not None and mask.right == 0:
            return {"is_causal": True, "local_window_size": (mask.left, 0)}
        return None
    if isinstance(mask, masks_lib.Padding):
        return {"query_seq_lengths": mask.q_lengths, "key_value_seq_lengths": mask.kv_lengths}
    if isinstance(mask, masks_lib.And):
        first, second = _mask_arguments(mask.a), _mask_arguments(mask.b)
        if first is None or second is None or set(first) & set(second):
            return None
        return {**first, **second}
    return None


def supports_cudnn(p) -> str | None:
    if p.backend not in ("gpu", "cuda"):
        return f"cuDNN needs an NVIDIA GPU, the backend is {p.backend!r}"
    gpu = attached_gpu()
    if gpu is not None and gpu[1] is None:
        return f"cuDNN needs an NVIDIA GPU, this {gpu[0]} reports no CUDA compute capability"
    if (too_old := pre_ampere_reason("cuDNN fused attention")) is not None:
        return too_old
    if p.q.shape[0] == 0:
        return "cuDNN is not called on an empty batch"
    if p.dtype not in (jnp.float16, jnp.bfloat16):
        return f"cuDNN attention takes float16 or bfloat16, got {p.dtype}"
    if p.head_dim != p.value_head_dim or p.head_dim % 8 or p.head_dim > 128:
        return (
            "cuDNN needs equal key and value head dims, a multiple of 8 and <= 128, got "
            f"{p.head_dim} and {p.value_head_dim}"
        )
    if p.softcap is not None:
        return "cuDNN has no softcap"
    if _mask_arguments(p.mask) is None:
        return f"cuDNN runs only causal, causal sliding-window and padding masks, got {type(p.mask).__name__}"
    return None


def run_cudnn(p):
    kwargs = _mask_arguments(p.mask)
    for key in ("query_seq_lengths", "key_value_seq_lengths"):
        if key in kwargs:  # canonical [B|1, 1] -> [B]
            kwargs[key] = jnp.broadcast_to(kwargs[key].reshape(-1), (p.q.shape[0],)).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        p.q, p.k, p.v, bias=p.bias, scale=p.scale, implementation="cudnn", **kwargs
    )
