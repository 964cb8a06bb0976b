"""Data parallelism: the batch split over a mesh axis, the train state replicated or sharded.

A jitted step whose inputs carry these shardings runs data-parallel as it stands: XLA's SPMD
partitioner splits the batch, and the gradient mean over the global batch becomes an all-reduce,
so the loss is the single-device loss of the same global batch (up to summation order).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jattn.parallel.mesh import check_axis


def _path_name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def shard_batch(batch: Any, mesh: Mesh, axis_name: str = "data") -> Any:
    """Put every array of ``batch`` on ``mesh``, its leading (batch) dim split over ``axis_name``.

    Args:
      batch: pytree of arrays ``[B, ...]``; in a multi-process run, this process's share of the
        global batch (``B / process_count`` rows), as each host loads its own data.
      mesh: the device mesh; axis_name: its data-parallel axis.
    Returns:
      The same pytree of global ``jax.Array``s ``[B_global, ...]`` sharded over ``axis_name``.
    """
    size = check_axis(mesh, axis_name, "axis_name")
    local_size = size // jax.process_count() if jax.process_count() > 1 else size

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % local_size:
            raise ValueError(
                f"batch{_path_name(path)} has shape {x.shape}: its leading (batch) dim must be divisible "
                f"by the {local_size} devices of mesh axis {axis_name!r} that this process feeds"
            )
        sharding = NamedSharding(mesh, PartitionSpec(axis_name))
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map_with_path(put, batch)


def _sharded_spec(shape: tuple[int, ...], size: int, axis_name: str) -> PartitionSpec:
    """Split the largest dim divisible by ``size``; replicate arrays with none (scalars, odd shapes)."""
    candidates = [(dim, i) for i, dim in enumerate(shape) if dim % size == 0 and dim >= size]
    if not candidates:
        return PartitionSpec()
    _, index = max(candidates)
    return PartitionSpec(*([None] * index + [axis_name]))


def place_state(
    state: Any, mesh: Mesh, axis_name: str = "data", mode: Literal["replicated", "sharded"] = "replicated"
) -> Any:
    """Put parameters and optimizer state on ``mesh``.

    Args:
      state: pytree of arrays (e.g. ``{"step", "params", "opt_state"}``).
      mode: ``"replicated"``: a full copy on every device (plain data parallelism);
        ``"sharded"``: each array split over ``axis_name`` along its largest divisible dim (ZeRO-3 /
        FSDP style: memory per device falls by the axis size, XLA gathers weights where used).
    Returns:
      The same pytree with every array placed.
    """
    size = check_axis(mesh, axis_name, "axis_name")
    if mode not in ("replicated", "sharded"):
        raise ValueError(f"mode must be 'replicated' or 'sharded', got mode={mode!r}")

    def put(x):
        spec = PartitionSpec() if mode == "replicated" else _sharded_spec(np.shape(x), size, axis_name)
        sharding = NamedSharding(mesh, spec)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        # Every process holds the same full value (same seed): each keeps the pieces it addresses.
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, state)
