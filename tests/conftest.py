"""Test-wide setup: several host CPU devices (for the sharding tests) and float64 oracles."""

import os

# Must happen before jax is imported anywhere: the sharding and ring-attention tests need a mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
