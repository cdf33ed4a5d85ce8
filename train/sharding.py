"""Data parallelism with jax.sharding: one mesh axis over every device, the batch split, the state replicated.

All per-process logic lives here, so multi-host runs only need jax.distributed.initialize() before this.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where this process sits: the global mesh and its share of every global batch."""

    mesh: Mesh
    process_index: int
    process_count: int

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def is_main(self) -> bool:
        """Process 0 writes files and logs."""
        return self.process_index == 0

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def local_batch_size(self, global_batch: int) -> int:
        """This process's rows of a global batch."""
        return global_batch // self.process_count


class ShardingError(ValueError):
    """A batch size that cannot be split over the devices."""


def make_topology(devices: list[Any] | None = None) -> Topology:
    """A 1-D mesh over all global devices (jax.devices(), so multi-host works unchanged)."""
    devices = devices if devices is not None else jax.devices()
    mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
    return Topology(mesh=mesh, process_index=jax.process_index(), process_count=jax.process_count())


def check_batch_size(batch_size: int, topology: Topology, what: str = "--batch-size") -> None:
    """Raise ShardingError unless the global batch splits evenly over the devices."""
    if batch_size % topology.num_devices:
        raise ShardingError(
            f"{what} {batch_size} cannot be split over {topology.num_devices} devices; "
            f"use a multiple of {topology.num_devices}"
        )


def place_batch(batch: dict[str, np.ndarray], topology: Topology) -> dict[str, jax.Array]:
    """This process's numpy batch -> global arrays sharded on the leading (batch) axis."""
    return {k: jax.make_array_from_process_local_data(topology.batch_sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree: Any, topology: Topology) -> Any:
    """Put a pytree (the train state) on every device."""
    return jax.device_put(tree, topology.replicated)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as one numpy array on every process (gathers across hosts when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
