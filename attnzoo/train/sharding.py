"""Data and fully-sharded data parallelism over one device mesh; XLA's GSPMD inserts the collectives.

- "dp":   parameters and optimizer state replicated on every device, the batch split along axis "data".
- "fsdp": every array of the parameters and optimizer state split along its largest dimension that the device
          count divides (replicated when none does); the batch split along "data" as well.

The same code runs on one host or many: call `maybe_initialize_distributed()` first, and every process computes
the same global batch (batches are a pure function of (seed, step)) and contributes the shards its devices hold.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

def maybe_initialize_distributed() -> bool:
    """Join a multi-process run, if this is one; returns True when `jax.distributed.initialize()` was called.

    Manual launch: JAX_COORDINATOR_ADDRESS=host:port with JAX_NUM_PROCESSES and JAX_PROCESS_ID. Multi-task Slurm
    and Open MPI launches and multi-host Cloud TPU slices are detected by JAX from their own variables.
    """
    env = os.environ
    if jax.distributed.is_initialized():
        return False
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
        return True
    launched = (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)
    if launched:
        jax.distributed.initialize()
    return launched


def is_primary_process() -> bool:
    """Process 0 writes the run's files (checkpoints are written by Orbax from every process)."""
    return jax.process_index() == 0


def uses_preemption_service() -> bool:
    """Whether SIGTERM goes to JAX's preemption service: in a run joined by `jax.distributed.initialize()` (with
    the service on, its default) the service catches SIGTERM in any process and tells all of them, and
    `multihost_utils.reached_preemption_sync_point(step)` returns True at the same step everywhere."""
    return jax.process_count() > 1 and jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service


def sync_processes(name: str) -> None:
    """A barrier across processes (nothing to do in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over all devices of all processes (or the given ones)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def fsdp_spec(shape: tuple[int, ...], n_devices: int) -> PartitionSpec:
    """Shard the largest dimension that `n_devices` divides; replicate when there is none."""
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] >= n_devices and shape[d] % n_devices == 0:
            return PartitionSpec(*([None] * d + [DATA_AXIS]))
    return PartitionSpec()


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the training arrays live: the mesh and the strategy ("dp" or "fsdp")."""

    mesh: Mesh
    parallelism: str

    @classmethod
    def create(cls, parallelism: str, devices: list | None = None) -> "Placement | None":
        """None for parallelism "none" (one device, no mesh)."""
        if parallelism == "none":
            return None
        if parallelism not in ("dp", "fsdp"):
            raise ValueError(f"parallelism={parallelism!r} is not one of none, dp, fsdp")
        return cls(make_mesh(devices), parallelism)

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def state_shardings(self, tree: Any) -> Any:
        """Shardings for a tree of parameters or optimizer state (same structure as `tree`)."""
        if self.parallelism == "dp":
            return jax.tree.map(lambda _: self.replicated, tree)
        return jax.tree.map(lambda x: NamedSharding(self.mesh, fsdp_spec(np.shape(x), self.n_devices)), tree)

    def place_state(self, tree: Any) -> Any:
        """Put parameters or optimizer state on the mesh."""
        return jax.device_put(tree, self.state_shardings(tree))

    def place_batch(self, batch: np.ndarray) -> jax.Array:
        """Split a global host batch [B, ...] along the "data" axis (each process supplies its devices' rows)."""
        if batch.shape[0] % self.n_devices:
            raise ValueError(f"batch_size={batch.shape[0]} must be divisible by the {self.n_devices} devices "
                             f"for parallelism={self.parallelism!r}")
        return jax.make_array_from_callback(batch.shape, self.batch, lambda index: batch[index])
