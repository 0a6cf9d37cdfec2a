"""Data parallelism with jax.sharding: a 1-D device mesh, batch leaves split on their leading axis.

Arrays placed with these shardings are consumed by a plain `jax.jit`; XLA's SPMD partitioner
splits the computation accordingly (no pmap, which is in maintenance mode). On a CPU-only
machine, `XLA_FLAGS=--xla_force_host_platform_device_count=N` (set before JAX starts) gives N
host devices that run their partitions in parallel threads.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; need at least one device")
    return Mesh(devices, (axis_name,))


def batch_sharding(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(tree: Any, mesh: Mesh, axis_name: str = DATA_AXIS) -> Any:
    """Put every leaf of `tree` on `mesh`, split along its leading (batch) axis.

    Raises a one-line ValueError when a leading axis does not divide by the mesh size.
    """
    size = mesh.shape[axis_name]
    for leaf in jax.tree.leaves(tree):
        if leaf.ndim == 0 or leaf.shape[0] % size:
            raise ValueError(
                f"batch axis of shape {tuple(leaf.shape)} does not divide across {size} devices; "
                f"use a batch size that is a multiple of {size}"
            )
    return jax.device_put(tree, batch_sharding(mesh, axis_name))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every leaf of `tree` on every device of `mesh`."""
    return jax.device_put(tree, replicated(mesh))
