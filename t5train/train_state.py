"""The train state (step, parameters, optimiser state) and its sharded initialiser.

The initialiser derives shapes with ``jax.eval_shape`` and creates the state
directly in its shardings, so no host ever holds a full unsharded copy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from t5train.optimizers import OptimizerDef
from t5train.partitioning import PjitPartitioner

PyTree = Any
InitFn = Callable[[jax.Array, Mapping[str, Any], Mapping[str, Any] | None], PyTree]


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree of arrays."""

  step: jax.Array
  params: PyTree
  opt_state: PyTree

  def state_dict(self) -> dict[str, Any]:
    return {'step': self.step, 'params': self.params, 'opt_state': self.opt_state}

  def replace_state_dict(self, state_dict: Mapping[str, Any]) -> 'TrainState':
    return self.replace(step=state_dict['step'], params=state_dict['params'],
                        opt_state=state_dict['opt_state'])


def _unit_learning_rate(step: jax.Array) -> jax.Array:
  # Optimiser state has the same structure for any schedule, so shapes and
  # initial values are computed with a placeholder one.
  del step
  return jnp.asarray(1.0)


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def _moment_spec(leaf: jax.ShapeDtypeStruct, param: jax.ShapeDtypeStruct,
                 param_spec: PartitionSpec) -> PartitionSpec:
  """Logical axes of an optimiser slot, from those of its parameter.

  Full-shape slots (Adam moments) take the parameter's axes; factored
  Adafactor moments drop the reduced dimension; anything else is replicated.
  """
  if leaf.shape == param.shape:
    return param_spec
  if len(leaf.shape) == len(param.shape) - 1:
    for dim in reversed(range(len(param.shape))):
      if param.shape[:dim] + param.shape[dim + 1:] == leaf.shape:
        return PartitionSpec(*(param_spec[:dim] + param_spec[dim + 1:]))
  return PartitionSpec()


def _path_keys(path: tuple) -> tuple[str, ...]:
  """The names along a pytree path (dict keys, attribute names, sequence indices)."""
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


class TrainStateInitializer:
  """Shapes, logical and mesh axes, and sharded creation of a TrainState."""

  def __init__(self, optimizer_def: OptimizerDef | None, init_fn: InitFn,
               input_shapes: Mapping[str, Any], input_types: Mapping[str, Any] | None = None,
               partitioner: PjitPartitioner | None = None):
    self._partitioner = partitioner or PjitPartitioner()
    self._tx = (optimizer_def.make(_unit_learning_rate) if optimizer_def is not None
                else optax.identity())

    def boxed_params(rng: jax.Array) -> PyTree:
      return init_fn(rng, input_shapes, input_types)['params']

    def initialize(rng: jax.Array) -> TrainState:
      params = nn.unbox(boxed_params(rng))
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self._tx.init(params))

    rng_shape = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    self.global_train_state_shape: TrainState = jax.eval_shape(initialize, rng_shape)
    param_axes = nn.get_partition_spec(jax.eval_shape(boxed_params, rng_shape))
    self.train_state_logical_axes: TrainState = self._logical_axes(param_axes)
    self.train_state_axes: TrainState = self._partitioner.logical_to_mesh_axes(
        self.train_state_logical_axes)
    self._partitioner.check_divisible(self.global_train_state_shape, self.train_state_axes,
                                      'train state variable')
    self.train_state_shardings: TrainState = self._partitioner.mesh_shardings(
        self.train_state_axes)
    # The shapes also say where each array lives, so a checkpoint manager needs nothing else.
    self.global_train_state_shape = jax.tree_util.tree_map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        self.global_train_state_shape, self.train_state_shardings)
    self._initialize = self._partitioner.partition(
        initialize, in_shardings=self._partitioner.sharding(PartitionSpec()),
        out_shardings=self.train_state_shardings)
    self._init_opt_state = self._partitioner.partition(
        self._tx.init, in_shardings=(self.train_state_shardings.params,),
        out_shardings=self.train_state_shardings.opt_state)

  def _logical_axes(self, param_axes: PyTree) -> TrainState:
    """Parameters keep their axes; an optimiser slot takes those of the parameter whose path
    ends its own (``mu/decoder/.../kernel``: the decoder kernel's), through ``_moment_spec``,
    and anything else (counts, scalars) is replicated. Matching by path rather than by the
    optimiser's structure also covers ``optax.multi_transform`` (MultiOptimizer)."""
    shape = self.global_train_state_shape
    specs = jax.tree_util.tree_leaves(param_axes, is_leaf=_is_spec)
    params = {_path_keys(path): (leaf, spec) for (path, leaf), spec in
              zip(jax.tree_util.tree_flatten_with_path(shape.params)[0], specs)}

    def slot_axes(path: tuple, leaf: jax.ShapeDtypeStruct) -> PartitionSpec:
      keys = _path_keys(path)
      for start in range(len(keys)):
        if keys[start:] in params:
          return _moment_spec(leaf, *params[keys[start:]])
      return PartitionSpec()
    opt_axes = jax.tree_util.tree_map_with_path(slot_axes, shape.opt_state)
    return TrainState(step=PartitionSpec(), params=param_axes, opt_state=opt_axes)

  def from_scratch(self, rng: jax.Array) -> TrainState:
    """A freshly initialised state, created in its shardings."""
    return self._initialize(rng)

  def from_params(self, params: PyTree, step: jax.Array) -> TrainState:
    """A state with given (sharded) parameters and a fresh optimiser state."""
    return TrainState(step=step, params=params, opt_state=self._init_opt_state(params))
