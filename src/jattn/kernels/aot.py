"""Lower the kernels for a GPU or a TPU on a machine that has neither (ahead-of-time ``jax.export``).

The test suite and ``benchmarks/triton_static.py`` use this to check, on a CPU, that the Pallas kernels
lower through Triton and through Mosaic TPU.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

TRITON_CALL = "__gpu$xla.gpu.triton"
"""The custom call a Pallas Triton kernel lowers to; ``jax.export`` refuses it unless told not to."""

DEFAULT_GPU = "NVIDIA H100"

EXPORT_PLATFORMS = ("cuda", "tpu")


def export_for(fn: Callable, *args, platform: str, gpu: str = DEFAULT_GPU) -> jax.export.Exported:
    """``jax.export`` of ``jax.jit(fn)`` at ``args`` (arrays or ``jax.ShapeDtypeStruct``) for ``platform``.

    For "cuda" the lowering targets the GPU named by ``gpu``, a device kind as JAX reports it
    ("NVIDIA A100", "NVIDIA L4", ...). From JAX 0.11 on, Pallas lowers a Triton kernel for the
    attached GPU and, with none attached, for the device of the abstract mesh in context; JAX 0.10
    lowers without a target, so there ``gpu`` changes nothing. The flash kernel's tile sizes still
    come from the attached device's table (sm90 with no GPU attached), whatever ``gpu`` names.
    """
    if platform not in EXPORT_PLATFORMS:
        raise ValueError(f"platform must be one of {EXPORT_PLATFORMS}, got {platform!r}")
    disabled = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    exporter = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)
    if platform != "cuda":
        return exporter(*args)
    device = jax.sharding.AbstractDevice(device_kind=gpu, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh(
        (1,), ("_",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=device
    )
    with jax.sharding.use_abstract_mesh(mesh):
        return exporter(*args)
