"""Beyond one device: meshes, data parallelism, ring attention and multi-host start-up.

* ``make_mesh``, ``sharding``, ``shard_map``, ``check_axis``: mesh helpers (``jattn.parallel.mesh``).
* ``shard_batch`` (a process's rows), ``shard_global_batch`` (the whole batch), ``place_state``:
  data parallelism (``jattn.parallel.data``).
* ``ring_attention``: exact attention with the sequence split over a mesh axis (``jattn.parallel.ring``).
* ``initialize``, ``distributed_settings``: ``jax.distributed`` from a config or the environment.
"""

from jattn.parallel.data import place_state, shard_batch, shard_global_batch
from jattn.parallel.distributed import distributed_settings, initialize
from jattn.parallel.mesh import check_axis, make_mesh, shard_map, sharding
from jattn.parallel.ring import ring_attention

__all__ = [
    "check_axis",
    "distributed_settings",
    "initialize",
    "make_mesh",
    "place_state",
    "ring_attention",
    "shard_batch",
    "shard_global_batch",
    "shard_map",
    "sharding",
]
