"""Mesh helpers: build a ``jax.sharding.Mesh`` from named axis sizes, check axis names, read the
mesh set by ``jax.set_mesh``, and a ``shard_map`` that works on every supported jax
(``jax.shard_map`` where it exists, else ``jax.experimental.shard_map``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec


def make_mesh(axes: Mapping[str, int] | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) with named axes.

    Args:
      axes: axis name -> size, in mesh order; one size may be -1 (all remaining devices).
        Default ``{"data": -1}``: plain data parallelism.
      devices: the devices to use; their number must equal the product of the sizes.
    Returns:
      ``Mesh`` whose axes are named and sized as asked.

    Example: ``make_mesh({"data": 2, "seq": -1})`` on 8 devices is a 2 x 4 mesh: batch over
    ``data``, sequence (ring attention) over ``seq``.
    """
    axes = {"data": -1} if axes is None else dict(axes)
    devices = list(jax.devices() if devices is None else devices)
    if not axes:
        raise ValueError("axes must name at least one mesh axis, got {}")
    if not devices or len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct devices, at least one, got devices={devices}")
    for name, size in axes.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"mesh axis names must be non-empty strings, got {name!r}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} must have a positive size or -1, got {size!r}")
        axes[name] = int(size)
    free = [name for name, size in axes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may have size -1, got {free} in axes={axes}")
    fixed = math.prod(size for size in axes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"axes={axes}: {len(devices)} devices do not divide over the fixed axes (product {fixed})"
            )
        axes[free[0]] = len(devices) // fixed
    if math.prod(axes.values()) != len(devices):
        raise ValueError(
            f"axes={axes} needs {math.prod(axes.values())} devices, but there are {len(devices)}"
        )
    grid = np.asarray(devices, dtype=object).reshape(tuple(axes.values()))
    return Mesh(grid, tuple(axes))


def check_axis(mesh: Any, axis_name: Any, argument: str = "axis_name") -> int:
    """The size of ``mesh``'s axis ``axis_name``; a clear error naming ``argument`` if it is absent.

    ``mesh`` is a ``Mesh`` or, inside ``jax.jit`` under ``jax.set_mesh``, its ``AbstractMesh``.
    """
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"{argument}={axis_name!r} is not an axis of the mesh; its axes are {mesh.axis_names}"
        )
    return int(mesh.shape[axis_name])


def context_mesh() -> AbstractMesh | None:
    """The mesh set by ``with jax.set_mesh(mesh):``, or None when none is set.

    It is the abstract mesh (axis names and sizes), the only form readable inside ``jax.jit``;
    ``shard_map`` and ``ring_attention`` take it there, and jit caches per context mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def reshard_for_shard_map(mesh: Mesh | AbstractMesh, args: Any, specs: Any) -> Any:
    """``args`` resharded to ``specs`` (a matching tree of ``PartitionSpec``) where the mesh has
    Explicit axes (the default of ``jax.make_mesh``), on which ``shard_map`` requires inputs that
    already carry its ``in_specs``; unchanged on Auto meshes, where ``shard_map`` reshards itself."""
    if jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return args
    return jax.tree.map(
        lambda spec, x: jax.sharding.reshard(x, NamedSharding(mesh, spec)),
        specs,
        args,
        is_leaf=lambda node: isinstance(node, PartitionSpec),
    )


def sharding(mesh: Mesh, *spec: Any) -> NamedSharding:
    """``NamedSharding(mesh, PartitionSpec(*spec))``."""
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_map(fn: Callable, *, mesh: Mesh | AbstractMesh, in_specs: Any, out_specs: Any) -> Callable:
    """``shard_map`` without replication checks, on any supported jax version."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy_shard_map

    return legacy_shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
