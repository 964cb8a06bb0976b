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


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A value that every process holds in full, placed with ``sharding``.

    In a multi-process run each process keeps the pieces its own devices address, wherever they
    lie in the mesh.
    """
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _fed_axis_size(mesh: Mesh, axis_name: str) -> int:
    """How many positions of mesh axis ``axis_name`` this process's devices occupy."""
    axis = mesh.axis_names.index(axis_name)
    return len(
        {
            index[axis]
            for index, device in np.ndenumerate(mesh.devices)
            if device.process_index == jax.process_index()
        }
    )


def _check_batch_dim(path, x, size: int, axis_name: str, whose: str) -> None:
    if x.ndim == 0 or x.shape[0] % size:
        raise ValueError(
            f"batch{_path_name(path)} has shape {x.shape}: its leading (batch) dim must be divisible "
            f"by the {size} devices of mesh axis {axis_name!r} that {whose}"
        )


def shard_batch(batch: Any, mesh: Mesh, axis_name: str = "data") -> Any:
    """Put every array of ``batch`` on ``mesh``, its leading (batch) dim split over ``axis_name``.

    Args:
      batch: pytree of arrays ``[B, ...]``; in a multi-process run, this process's share of the
        global batch, as each host loads its own data: the rows of the ``axis_name`` positions its
        devices occupy (``B / process_count`` rows when ``axis_name`` is split evenly over the
        processes; the whole batch when every process spans the axis, e.g. a ``seq`` axis over
        processes). ``shard_global_batch`` takes the global batch instead.
      mesh: the device mesh; axis_name: its data-parallel axis.
    Returns:
      The same pytree of global ``jax.Array``s ``[B_global, ...]`` sharded over ``axis_name``.
    """
    check_axis(mesh, axis_name, "axis_name")
    fed = _fed_axis_size(mesh, axis_name)
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        _check_batch_dim(path, x, fed, axis_name, "this process feeds")
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map_with_path(put, batch)


def shard_global_batch(batch: Any, mesh: Mesh, axis_name: str = "data") -> Any:
    """Like ``shard_batch``, from the global batch ``[B_global, ...]`` that every process holds
    (e.g. generated from a seed): each process keeps the rows its devices need."""
    size = check_axis(mesh, axis_name, "axis_name")
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))

    def put(path, x):
        _check_batch_dim(path, np.asarray(x), size, axis_name, "split it")
        return put_global(x, sharding)

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
        # Every process holds the same full value (same seed).
        return put_global(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, state)
