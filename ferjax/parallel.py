"""Data parallelism with ``jax.sharding``: one code path for 1 CPU, N GPUs or many hosts.

The batch is split over a 1-D ``data`` mesh of all devices; parameters and
optimiser state are replicated. XLA inserts the gradient all-reduce, and
BatchNorm statistics are taken over the global batch, so N devices compute what
one device would.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ferjax.errors import ConfigError


def is_primary() -> bool:
  """Whether this process writes the run's files: always on one host, process 0 of many."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process of a multi-host run gets here (nothing on one host)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of ``mesh`` (parameters, optimiser state, metrics)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Split along the first (batch) axis over the ``data`` axis of ``mesh``."""
  return NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, mesh: Mesh, flag: str = "--batch_size") -> None:
  """Raises ConfigError, naming ``flag``, unless the batch splits evenly over the mesh."""
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(f"{flag}={batch_size} must be divisible by the {n} devices in use")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a global host batch on the mesh, split along the batch axis.

  With several processes each one passes the same global batch (the batch
  order is a pure function of the seed) and contributes the rows its own
  devices hold.
  """
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  n, i = jax.process_count(), jax.process_index()

  def local(x):
    rows = x.shape[0] // n
    return jax.make_array_from_process_local_data(sharding, x[i * rows:(i + 1) * rows], x.shape)

  return jax.tree.map(local, batch)
