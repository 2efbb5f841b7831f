"""``t5x.partitioning``: T5X's ``PjitPartitioner`` arguments on t5train's partitioner."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from absl import logging

from t5train import partitioning as _partitioning
from t5train.partitioning import DataLayout, PartitionedFunction  # noqa: F401
from t5train.t5x_compat._args import require


def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: Sequence[tuple[str, Any]] | None = None
                                ) -> list[tuple[str, Any]]:
  """T5X's default rules (t5train's), with ``additional_rules`` appended as in T5X."""
  rules = list(_partitioning.standard_logical_axis_rules(activation_partitioning_dims,
                                                         parameter_partitioning_dims))
  return rules + [tuple(rule) for rule in additional_rules or ()]


def PjitPartitioner(  # pylint: disable=invalid-name  (T5X's class name)
    num_partitions: int | None = None, model_parallel_submesh: Sequence[int] | None = None,
    params_on_devices: bool = True, backend: str | None = None,
    ici_mesh_shape: Sequence[int] | None = None, dcn_mesh_shape: Sequence[int] | None = None,
    logical_axis_rules: Sequence[tuple[str, Any]] | None = None) -> Any:
  """T5X's ``PjitPartitioner`` as t5train's: a (data, model) mesh.

  As in T5X, ``model_parallel_submesh`` wins over ``num_partitions`` when both are set (T5X
  logs an error; so does this). ``backend`` picks the devices. ``params_on_devices=False`` and
  the multi-slice mesh shapes are refused.
  """
  require('PjitPartitioner.params_on_devices', params_on_devices, True,
          'parameters always live on the devices')
  require('PjitPartitioner.ici_mesh_shape', ici_mesh_shape, None,
          'the mesh is (data, model): use num_partitions or model_parallel_submesh')
  require('PjitPartitioner.dcn_mesh_shape', dcn_mesh_shape, None,
          'the mesh is (data, model): use num_partitions or model_parallel_submesh')
  if num_partitions and model_parallel_submesh:
    logging.error('At most one of PjitPartitioner.num_partitions (%r) and model_parallel_submesh '
                  '(%r) can be set; using model_parallel_submesh, as T5X does.', num_partitions,
                  model_parallel_submesh)
    num_partitions = None
  devices = jax.devices(backend) if backend else None
  return _partitioning.PjitPartitioner(
      num_partitions=num_partitions or None,
      model_parallel_submesh=tuple(model_parallel_submesh) if model_parallel_submesh else None,
      logical_axis_rules=logical_axis_rules, devices=devices)


__all__ = ['DataLayout', 'PjitPartitioner', 'standard_logical_axis_rules']
