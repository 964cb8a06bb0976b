"""Multi-host start-up: ``jax.distributed.initialize`` from a config or environment variables.

Every process runs the same program; process 0 hosts the coordinator. The settings come, in order
of precedence, from the ``config`` mapping, then ``JATTN_COORDINATOR_ADDRESS``,
``JATTN_NUM_PROCESSES``, ``JATTN_PROCESS_ID`` (and optionally ``JATTN_LOCAL_DEVICE_IDS``, comma-
separated). With none of them set, ``jax.distributed.initialize()`` detects a managed cluster
itself (SLURM, Open MPI, Cloud TPU, ``JAX_COORDINATOR_ADDRESS``...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

_ENV = {
    "coordinator_address": "JATTN_COORDINATOR_ADDRESS",
    "num_processes": "JATTN_NUM_PROCESSES",
    "process_id": "JATTN_PROCESS_ID",
    "local_device_ids": "JATTN_LOCAL_DEVICE_IDS",
}


def _parse(key: str, raw: Any, source: str) -> Any:
    if key == "coordinator_address":
        if not isinstance(raw, str) or ":" not in raw:
            raise ValueError(f"{source} must be 'host:port', got {raw!r}")
        return raw
    try:
        if key == "local_device_ids":
            return [int(i) for i in str(raw).split(",")] if isinstance(raw, str) else [int(i) for i in raw]
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(
            f"{source} must be {'comma-separated ints' if key == 'local_device_ids' else 'an int'}, "
            f"got {raw!r}"
        ) from None


def distributed_settings(
    config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict:
    """The keyword arguments for ``jax.distributed.initialize`` (empty: let JAX detect the cluster)."""
    config = dict(config or {})
    environ = os.environ if environ is None else environ
    unknown = sorted(set(config) - set(_ENV))
    if unknown:
        raise ValueError(f"unknown distributed setting(s) {unknown}; valid: {sorted(_ENV)}")
    settings = {}
    for key, variable in _ENV.items():
        if config.get(key) is not None:
            settings[key] = _parse(key, config[key], f"distributed.{key}")
        elif environ.get(variable):
            settings[key] = _parse(key, environ[variable], variable)
    given = {k for k in ("coordinator_address", "num_processes", "process_id") if k in settings}
    if given and len(given) < 3:
        missing = sorted({"coordinator_address", "num_processes", "process_id"} - given)
        raise ValueError(
            f"multi-process settings are incomplete: {sorted(given)} given, {missing} missing "
            f"(set them in the config or as {', '.join(_ENV[k] for k in missing)})"
        )
    if "process_id" in settings and not 0 <= settings["process_id"] < settings["num_processes"]:
        raise ValueError(
            f"process_id must be in [0, num_processes={settings['num_processes']}), "
            f"got {settings['process_id']}"
        )
    return settings


def initialize(config: Mapping[str, Any] | None = None) -> dict:
    """Join the multi-process run described by ``config`` / the environment; returns the settings used.

    Call once, before any other jax call that touches devices.
    """
    settings = distributed_settings(config)
    jax.distributed.initialize(**settings)
    return settings
