"""The device mesh and the mapping from logical axis names to mesh axes.

This is the only module that builds shardings. Modules name their axes
(batch, embed, mlp, ...); a rule table maps each name to a mesh axis
(``data`` or ``model``) or to nothing (replicated).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5train.errors import UserError

LogicalAxisRules = Sequence[tuple[str, str | None]]
PyTree = Any


def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1) -> LogicalAxisRules:
  """T5X's default rules: batch over ``data``, heads/mlp/vocab over ``model``.

  ``parameter_partitioning_dims=2`` also shards ``embed`` of parameters over
  ``data`` (FSDP-style); ``activation_partitioning_dims=2`` shards the ``embed``
  of activations over ``model``.
  """
  if activation_partitioning_dims not in (1, 2) or parameter_partitioning_dims not in (1, 2):
    raise UserError('activation_partitioning_dims and parameter_partitioning_dims must be 1 or 2')
  rules: list[tuple[str, str | None]] = [
      ('batch', 'data'), ('vocab', 'model'), ('mlp', 'model'), ('heads', 'model'),
      ('joined_kv', 'model'), ('kv', None), ('length', None), ('relpos_buckets', None),
      ('layers', None), ('stack', None),
  ]
  if parameter_partitioning_dims == 2:
    rules.append(('embed', 'data'))
  if activation_partitioning_dims == 2:
    rules.append(('embed', 'model'))
  rules.append(('embed', None))
  return rules


class PjitPartitioner:
  """Builds a (data, model) mesh and jits functions with shardings from logical axes."""

  def __init__(self, num_partitions: int | None = None,
               model_parallel_submesh: tuple[int, ...] | None = None,
               logical_axis_rules: LogicalAxisRules | None = None,
               devices: Sequence[jax.Device] | None = None):
    self._num_partitions = num_partitions
    self._model_parallel_submesh = model_parallel_submesh
    self._logical_axis_rules = tuple(logical_axis_rules or standard_logical_axis_rules())
    self._devices = devices
    self._mesh: Mesh | None = None

  @property
  def num_model_partitions(self) -> int:
    if self._model_parallel_submesh:
      return int(np.prod(self._model_parallel_submesh))
    return int(self._num_partitions or 1)

  @property
  def logical_axis_rules(self) -> LogicalAxisRules:
    return self._logical_axis_rules

  def validate(self) -> None:
    """Fails with a UserError when the devices cannot be split into the partitions."""
    num_devices = len(self._devices or jax.devices())
    if num_devices % self.num_model_partitions:
      raise UserError(
          f'the number of devices ({num_devices}) must be a multiple of the number of model '
          f'partitions ({self.num_model_partitions}); change PjitPartitioner.num_partitions '
          'or model_parallel_submesh')

  @property
  def mesh(self) -> Mesh:
    if self._mesh is None:
      self.validate()
      devices = np.asarray(self._devices or jax.devices())
      model = self.num_model_partitions
      self._mesh = Mesh(devices.reshape(len(devices) // model, model), ('data', 'model'))
    return self._mesh

  @property
  def data_partition_spec(self) -> PartitionSpec:
    """How a batch's leading axis is laid out over the mesh."""
    return nn.logical_to_mesh_axes(('batch',), self._logical_axis_rules)

  def sharding(self, spec: PartitionSpec) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def logical_to_mesh_axes(self, logical_specs: PyTree) -> PyTree:
    """Logical PartitionSpecs (axis names) -> mesh PartitionSpecs, leaf by leaf."""
    return jax.tree_util.tree_map(
        lambda spec: nn.logical_to_mesh_axes(tuple(spec), self._logical_axis_rules),
        logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

  def mesh_shardings(self, mesh_specs: PyTree) -> PyTree:
    return jax.tree_util.tree_map(self.sharding, mesh_specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))

  @contextlib.contextmanager
  def activation_rules(self) -> Iterator[None]:
    """Makes the model's logical activation constraints bind to this mesh while tracing."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self._logical_axis_rules):
      yield

  def partition(self, fn: Callable[..., Any], in_shardings: Any, out_shardings: Any,
                static_argnums: Sequence[int] = (), donate_argnums: Sequence[int] = ()
                ) -> Callable[..., Any]:
    """``jax.jit`` with shardings, traced under this mesh and its logical rules."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     static_argnums=tuple(static_argnums), donate_argnums=tuple(donate_argnums))

    def call(*args: Any) -> Any:
      with self.activation_rules():
        return jitted(*args)

    return call
