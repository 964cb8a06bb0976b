"""Test-wide setup: several host CPU devices (for the sharding tests) and float64 oracles."""

import os

# Must happen before jax is imported anywhere: the sharding and ring-attention tests need a mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import settings  # noqa: E402  (after the environment above, like every test module)

# Property tests draw the same examples on every run, so the suite gates CI the same way each time;
# HYPOTHESIS_PROFILE=explore draws new ones (a failure prints the example to reproduce it with).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
