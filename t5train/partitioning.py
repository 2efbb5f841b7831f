"""The device mesh and the mapping from logical axis names to mesh axes.

This is the only module that builds shardings. Modules name their axes
(batch, embed, mlp, ...); a rule table maps each name to a mesh axis
(``data`` or ``model``) or to nothing (replicated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5train.errors import UserError

LogicalAxisRules = Sequence[tuple[str, str | None]]
PyTree = Any
CompilerOptions = Mapping[str, str | bool | int | float]

# XLA options for train steps, by device platform. On CPU the memory-minimising scheduler
# orders a T5-small train step's ops so that its scratch space shrinks from 812 to 689 MB at
# the same speed (docs/benchmarks.md); decoding loops run slower with it, so it is not global.
TRAIN_STEP_COMPILER_OPTIONS: dict[str, CompilerOptions] = {
    'cpu': {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'},
}


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


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """Which part of each global batch this process reads (T5X's names).

  Processes whose devices hold the same rows of the batch (model parallelism
  across hosts) read the same shard.
  """

  batch_size: int  # global
  shard_id: int
  num_shards: int
  is_first_host_in_replica_set: bool

  @property
  def per_host_batch_size(self) -> int:
    return self.batch_size // self.num_shards


def _device_grid(devices: Sequence[jax.Device], data: int, model: int) -> np.ndarray:
  """Devices arranged as [data, model].

  On TPU, JAX's mesh_utils picks a physically compact arrangement. Elsewhere,
  devices are ordered by process so that each host's devices form whole rows
  (its share of the batch) or whole model groups.
  """
  if devices[0].platform == 'tpu':
    return mesh_utils.create_device_mesh((data, model), devices, allow_split_physical_axes=True)
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.asarray(ordered).reshape(data, model)


class PjitPartitioner:
  """Builds a (data, model) mesh and jits functions with shardings from logical axes.

  ``num_partitions`` is the size of the ``model`` axis; ``model_parallel_submesh``
  (T5X's TPU form, e.g. ``(2, 2, 1, 1)``) gives it as a product instead. The
  ``data`` axis takes the remaining devices. ``compiler_options`` are XLA options
  for every function it compiles, over any the caller of ``partition`` gives.
  """

  def __init__(self, num_partitions: int | None = None,
               model_parallel_submesh: tuple[int, ...] | None = None,
               logical_axis_rules: LogicalAxisRules | None = None,
               devices: Sequence[jax.Device] | None = None,
               compiler_options: CompilerOptions | None = None):
    if num_partitions is not None and model_parallel_submesh is not None:
      raise UserError('set only one of PjitPartitioner.num_partitions and '
                      'model_parallel_submesh (the other must be None)')
    if num_partitions is not None and num_partitions < 1:
      raise UserError(f'PjitPartitioner.num_partitions must be >= 1, got {num_partitions}')
    if model_parallel_submesh is not None and any(int(n) < 1 for n in model_parallel_submesh):
      raise UserError('PjitPartitioner.model_parallel_submesh must hold positive sizes, got '
                      f'{tuple(model_parallel_submesh)}')
    self._num_partitions = num_partitions
    self._model_parallel_submesh = model_parallel_submesh
    self._logical_axis_rules = tuple(logical_axis_rules or standard_logical_axis_rules())
    self._devices = list(devices) if devices is not None else None
    self._compiler_options = compiler_options
    self._mesh: Mesh | None = None

  @property
  def devices(self) -> list[jax.Device]:
    return self._devices if self._devices is not None else jax.devices()

  @property
  def num_model_partitions(self) -> int:
    if self._model_parallel_submesh:
      return math.prod(int(n) for n in self._model_parallel_submesh)
    return int(self._num_partitions or 1)

  @property
  def num_data_partitions(self) -> int:
    return len(self.devices) // self.num_model_partitions

  @property
  def logical_axis_rules(self) -> LogicalAxisRules:
    return self._logical_axis_rules

  def train_step_compiler_options(self) -> dict[str, Any]:
    """The XLA options for a train step on these devices (``TRAIN_STEP_COMPILER_OPTIONS``)."""
    return dict(TRAIN_STEP_COMPILER_OPTIONS.get(self.devices[0].platform, {}))

  def validate(self) -> None:
    """Fails with a UserError when the devices cannot be split into the partitions."""
    num_devices = len(self.devices)
    if num_devices % self.num_model_partitions:
      raise UserError(
          f'the number of devices ({num_devices}) must be a multiple of the number of model '
          f'partitions ({self.num_model_partitions}); change PjitPartitioner.num_partitions '
          'or model_parallel_submesh')

  @property
  def mesh(self) -> Mesh:
    if self._mesh is None:
      self.validate()
      grid = _device_grid(self.devices, self.num_data_partitions, self.num_model_partitions)
      self._mesh = Mesh(grid, ('data', 'model'))
    return self._mesh

  def _batch_rows(self) -> np.ndarray:
    """[data, model] array: the index of the batch shard each device holds."""
    spec = self.data_partition_spec
    axes = spec[0] if len(spec) else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shape = dict(self.mesh.shape)
    rows = np.zeros(self.mesh.devices.shape, np.int64)
    for axis in axes:  # row-major over the mesh axes the batch is split on
      index = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in self.mesh.axis_names])
      rows = rows * shape[axis] + index
    return rows

  def get_data_layout(self, batch_size: int, host_index: int | None = None) -> DataLayout:
    """This process's shard of a global batch of ``batch_size`` rows.

    Raises a UserError when the batch cannot be split evenly over the data axis.
    """
    rows = self._batch_rows()
    num_batch_shards = int(rows.max()) + 1
    if batch_size % num_batch_shards:
      raise UserError(f'BATCH_SIZE {batch_size} is not divisible by the {num_batch_shards} '
                      f'data-parallel shards of the mesh {dict(self.mesh.shape)}; use a multiple '
                      f'of {num_batch_shards} or more model partitions')
    host_index = jax.process_index() if host_index is None else host_index
    rows_by_host: dict[int, set[int]] = {}
    for device, row in zip(self.mesh.devices.flat, rows.flat):
      rows_by_host.setdefault(device.process_index, set()).add(int(row))
    row_sets = sorted({tuple(sorted(r)) for r in rows_by_host.values()})
    for row_set in row_sets:
      if list(row_set) != list(range(row_set[0], row_set[-1] + 1)):
        raise UserError(f'the devices of a host hold batch shards {list(row_set)}, which are not '
                        'contiguous; use a model axis that divides the devices per host')
    if len(set().union(*map(set, row_sets))) != sum(map(len, row_sets)):
      raise UserError('hosts share only part of their batch shards; use a model axis that '
                      'divides, or is a multiple of, the devices per host')
    mine = tuple(sorted(rows_by_host[host_index]))
    hosts_with_mine = sorted(h for h, r in rows_by_host.items() if tuple(sorted(r)) == mine)
    return DataLayout(batch_size=batch_size, shard_id=row_sets.index(mine),
                      num_shards=len(row_sets),
                      is_first_host_in_replica_set=host_index == hosts_with_mine[0])

  def check_divisible(self, shapes: PyTree, mesh_specs: PyTree, what: str = 'parameter') -> None:
    """UserError naming the first array whose dimension the mesh cannot split evenly."""
    is_spec = lambda x: isinstance(x, PartitionSpec)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_specs = jax.tree_util.tree_leaves(mesh_specs, is_leaf=is_spec)
    mesh_shape = dict(self.mesh.shape)
    for (path, shape), spec in zip(flat_shapes, flat_specs):
      for dim, (size, axes) in enumerate(zip(shape.shape, spec)):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        parts = math.prod(mesh_shape[a] for a in axes)
        if size % parts:
          name = jax.tree_util.keystr(path, simple=True, separator='/')
          raise UserError(f'{what} {name} has size {size} in dimension {dim}, which the mesh '
                          f'axes {axes} cannot split into {parts} equal parts; change the '
                          'partitioning or the model dimensions')

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
                static_argnums: Sequence[int] = (), donate_argnums: Sequence[int] = (),
                compiler_options: CompilerOptions | None = None) -> 'PartitionedFunction':
    """``jax.jit`` with shardings, traced under this mesh and its logical rules."""
    options = {**(compiler_options or {}), **(self._compiler_options or {})}
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     static_argnums=tuple(static_argnums), donate_argnums=tuple(donate_argnums),
                     compiler_options=options or None)
    return PartitionedFunction(jitted, self.activation_rules)

  def compile(self, partitioned_fn: 'PartitionedFunction', *args: Any) -> jax.stages.Compiled:
    """Compiles ``partitioned_fn`` for ``args`` (arrays or ShapeDtypeStructs) ahead of a call."""
    return partitioned_fn.lower(*args).compile()


class PartitionedFunction:
  """A function jitted by ``PjitPartitioner.partition``; calls trace under the mesh's rules."""

  def __init__(self, jitted: Any, rules: Callable[[], contextlib.AbstractContextManager]):
    self._jitted = jitted
    self._rules = rules

  def __call__(self, *args: Any) -> Any:
    with self._rules():
      return self._jitted(*args)

  def lower(self, *args: Any) -> jax.stages.Lowered:
    with self._rules():
      return self._jitted.lower(*args)
