"""Beyond one device: meshes, data parallelism, ring attention and multi-host start-up.

* ``make_mesh``, ``sharding``, ``shard_map``: mesh helpers (``jattn.parallel.mesh``).
* ``ring_attention``: exact attention with the sequence split over a mesh axis (``jattn.parallel.ring``).
"""

from jattn.parallel.mesh import check_axis, make_mesh, shard_map, sharding
from jattn.parallel.ring import ring_attention

__all__ = ["check_axis", "make_mesh", "ring_attention", "shard_map", "sharding"]
