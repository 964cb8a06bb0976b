"""Parallel training from a config: the ``parallel`` section of an experiment and what it sets up.

::

    parallel:
      mesh: {data: 2, seq: 2}      # axis -> size ({}: one device); "data" splits the batch,
                                   # "seq" splits the sequence for the ``ring`` attention variant
      state: replicated            # or "sharded": parameters and optimizer state split over "data"
      distributed: {coordinator_address: "10.0.0.1:1234", num_processes: 2, process_id: 0}

``Placement.from_config`` checks the section against the devices and the batch size (errors name
the config key), and the training loop then puts the state with ``place_state``, every batch with
``shard_global_batch``, and runs under ``jax.set_mesh(mesh)`` so that the ring variant finds the mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Literal

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jattn.parallel.data import place_state, put_global, shard_global_batch
from jattn.parallel.distributed import distributed_settings, initialize
from jattn.parallel.mesh import make_mesh
from jattn.parallel.ring import BATCH_AXIS, SEQUENCE_AXIS

MESH_AXES = {
    BATCH_AXIS: "the batch is split over it (data parallelism)",
    SEQUENCE_AXIS: "the sequence is split over it by the ring attention variant (context parallelism)",
}
"""The mesh axes a training config may name, and what each one splits."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process settings for ``jax.distributed.initialize`` (``jattn.parallel.distributed``).

    Attributes:
      enabled: None joins a multi-process run when settings are given here or in the ``JATTN_*``
        environment variables; True always calls ``jax.distributed.initialize`` (with no settings
        JAX detects SLURM, Open MPI, Cloud TPU...); False never does.
      coordinator_address: ``host:port`` of process 0. num_processes, process_id: this run's.
      local_device_ids: the local devices this process uses (None: all).
    """

    enabled: bool | None = None
    coordinator_address: str | None = None
    num_processes: int | None = dataclasses.field(default=None, metadata={"min": 1})
    process_id: int | None = dataclasses.field(default=None, metadata={"min": 0})
    local_device_ids: tuple[int, ...] | None = None

    def settings(self) -> dict:
        """The settings given here (not ``enabled``), for ``distributed_settings``."""
        fields = dataclasses.asdict(self)
        del fields["enabled"]
        return {key: value for key, value in fields.items() if value is not None}


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Attributes:
    mesh: mesh axis -> size, one size may be -1 (the remaining devices); axes from ``MESH_AXES``.
      ``{}`` (the default) trains on one device as before.
    state: ``"replicated"`` (a full copy of parameters and optimizer state per device) or
      ``"sharded"`` (ZeRO-3/FSDP style, split over the ``data`` axis).
    distributed: multi-process start-up.
    """

    mesh: dict = dataclasses.field(default_factory=dict)
    state: Literal["replicated", "sharded"] = "replicated"
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self):
        unknown = sorted(set(self.mesh) - set(MESH_AXES))
        if unknown:
            raise ValueError(
                f"parallel.mesh has unknown axis name(s) {unknown}; allowed: "
                + "; ".join(f"{name!r} ({role})" for name, role in MESH_AXES.items())
            )
        if self.state == "sharded" and BATCH_AXIS not in self.mesh:
            raise ValueError(
                f"parallel.state='sharded' splits the state over the {BATCH_AXIS!r} mesh axis, but "
                f"parallel.mesh={self.mesh} has none"
            )


def start_processes(config: DistributedConfig) -> dict:
    """Join the multi-process run ``config`` describes (once per process); returns the settings used.

    Call before anything touches the devices. A no-op returning {} on a single process.
    """
    try:
        settings = distributed_settings(config.settings())
    except ValueError as err:
        raise ValueError(f"config key 'parallel.distributed': {err}") from None
    if config.enabled is None and set(settings) == {"local_device_ids"}:
        raise ValueError(
            "config key 'parallel.distributed': local_device_ids (or JATTN_LOCAL_DEVICE_IDS) is set "
            "without coordinator_address, num_processes and process_id; give those three, or "
            "enabled: true to let JAX detect the cluster"
        )
    wanted = bool(settings) if config.enabled is None else config.enabled
    if not wanted or jax.distributed.is_initialized():
        return {}
    return initialize(config.settings())


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a training run's state and batches live.

    Attributes:
      mesh: the device mesh, or None for one device (then every method is the identity).
      state_mode: ``"replicated"`` or ``"sharded"`` (see ``place_state``).
    """

    mesh: Mesh | None = None
    state_mode: str = "replicated"

    @classmethod
    def from_config(cls, config: ParallelConfig, batch_size: int) -> Placement:
        """The mesh ``config.mesh`` asks for over all devices, checked against ``batch_size``.

        Raises:
          ValueError: naming ``parallel.mesh`` (bad sizes, more devices than there are) or
            ``train.batch_size`` (not divisible over the ``data`` axis).
        """
        if not config.mesh:
            return cls()
        try:
            mesh = make_mesh(config.mesh)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config key 'parallel.mesh': {err}") from None
        data = int(mesh.shape.get(BATCH_AXIS, 1))
        if batch_size % data:
            raise ValueError(
                f"config key 'train.batch_size': {batch_size} must be divisible by the {data} devices of "
                f"mesh axis {BATCH_AXIS!r} (parallel.mesh={config.mesh})"
            )
        return cls(mesh, config.state)

    def activate(self) -> contextlib.AbstractContextManager:
        """``jax.set_mesh(mesh)``: jitted code (the ring variant) reads the mesh from it."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def place_state(self, state: Any) -> Any:
        """The train state replicated or sharded over the mesh."""
        if self.mesh is None:
            return state
        axis = BATCH_AXIS if self.state_mode == "sharded" else self.mesh.axis_names[0]  # replicated: unused
        return place_state(state, self.mesh, axis, mode=self.state_mode)  # type: ignore[arg-type]

    def shard(self, batch: dict) -> dict:
        """A global batch (numpy ``[B, ...]``, the same on every process) put on the mesh.

        Split over ``data`` when the mesh has it (each process keeps the rows its devices need),
        else replicated.
        """
        if self.mesh is None:
            return batch
        if BATCH_AXIS not in self.mesh.axis_names:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            return jax.tree.map(lambda x: put_global(x, replicated), batch)
        return shard_global_batch(batch, self.mesh, BATCH_AXIS)


def check_sequence_axis(config: ParallelConfig, variant: str, options: dict, key: str = "attention") -> None:
    """Ring attention in a training config (the ``ring`` variant, or an exact variant with
    ``implementation: ring``) needs the ``seq`` axis in ``parallel.mesh``; raises ValueError naming
    ``<key>.variant`` (``compare[2]`` for a compare entry)."""
    if (variant == "ring" or options.get("implementation") == "ring") and SEQUENCE_AXIS not in config.mesh:
        raise ValueError(
            f"config key '{key}.variant': {variant!r} with options {options} splits the sequence over "
            f"the {SEQUENCE_AXIS!r} mesh axis, but parallel.mesh={config.mesh} has none; add it, e.g. "
            f"parallel.mesh={{{SEQUENCE_AXIS}: -1}}"
        )


def setup(config: ParallelConfig, *, batch_size: int, variant: str, options: dict) -> Placement:
    """Everything a training run does before touching the devices: join the multi-process run,
    check the config against the attention and the devices, and build the ``Placement``.

    Args:
      config: the ``parallel`` section. batch_size: ``train.batch_size`` (the global batch).
      variant, options: ``attention.variant`` and ``attention.options``.
    Raises:
      ValueError: naming the config key at fault.
    """
    start_processes(config.distributed)
    placement = Placement.from_config(config, batch_size)
    check_sequence_axis(config, variant, options)
    return placement
