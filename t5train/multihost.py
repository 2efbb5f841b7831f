"""One process per host: starting ``jax.distributed`` and asking which process this is.

``initialize`` must run before anything touches a device. With no arguments it
lets JAX detect the cluster (Cloud TPU VMs, SLURM, Open MPI, Kubernetes); with
a coordinator address, process count and process id it joins that group.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from t5train.errors import UserError

# JAX's default is 100 s; a dead host should end the others' run sooner than that. Heartbeats
# come from a background thread, so long compilations or saves do not delay them.
HEARTBEAT_TIMEOUT_SECONDS = 30


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS,
               initialization_timeout: int | None = None) -> None:
  """Joins the process group; CPU devices talk over gloo so that CPU-only groups work too.

  A process that stops sending heartbeats for ``heartbeat_timeout_seconds`` (killed, or its
  host lost) makes the others fail instead of waiting for it forever. Joining waits up to
  ``initialization_timeout`` seconds for the others (JAX's default when None).
  """
  if jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                               **({} if initialization_timeout is None else
                                  {'initialization_timeout': initialization_timeout}))
  except ValueError as e:  # nothing detected and not enough given
    raise UserError(f'cannot start jax.distributed: {e}. Pass --coordinator_address, '
                    '--process_count and --process_index, or run under a cluster that JAX '
                    'detects (TPU VM, SLURM, Open MPI)') from e
  logging.info('Process %d of %d: %d local devices, %d in all.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def draw_seed() -> int:
  """A fresh random seed in [0, 2**31), drawn by process 0 and the same on every process."""
  seed = np.int32(secrets.randbits(31))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    seed = multihost_utils.broadcast_one_to_all(seed)
  return int(seed)


def is_primary() -> bool:
  """Whether this process writes the files that exist once per run (summaries, configs)."""
  return jax.process_index() == 0


def get_local_data(x: Any) -> Any:
  """This process's copy of ``x``: one addressable shard of a global jax.Array, else ``x``."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    return x.addressable_data(0)
  return x
