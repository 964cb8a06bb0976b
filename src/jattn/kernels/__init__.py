"""Pallas kernels: ``implementation="flash"`` (Triton on NVIDIA GPUs, Mosaic on TPUs, interpreted on CPU)."""

from jattn.attention import register_implementation
from jattn.kernels.flash import BlockSizes, flash_attention, run, unsupported_reason

register_implementation(
    "flash",
    run,
    unsupported_reason,
    summary="Pallas tiled kernel (Triton on GPU, Mosaic on TPU, interpreted on CPU); skips empty tiles",
)

__all__ = ["BlockSizes", "flash_attention"]
