"""``model-info.txt``: every variable of the train state with its shape, dtype, axes and size."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import PartitionSpec

from t5train import multihost, paths
from t5train.partitioning import PjitPartitioner
from t5train.train_state import TrainState


def _rows(shapes: object, logical: object, mesh: object) -> list[tuple[str, tuple, str, str, str, int]]:
  is_spec = lambda x: isinstance(x, PartitionSpec)
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_logical = jax.tree_util.tree_leaves(logical, is_leaf=is_spec)
  flat_mesh = jax.tree_util.tree_leaves(mesh, is_leaf=is_spec)
  rows = []
  for (path, shape), axes, spec in zip(flat_shapes, flat_logical, flat_mesh):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
    rows.append((name, tuple(shape.shape), str(shape.dtype), str(tuple(axes)), str(tuple(spec)),
                 int(np.prod(shape.shape))))
  return rows


def _spec_of(leaf: object) -> PartitionSpec:
  sharding = getattr(leaf, 'sharding', None)
  return getattr(sharding, 'spec', PartitionSpec())


def model_info_text(state_shape: TrainState, logical_axes: TrainState | None,
                    partitioner: PjitPartitioner,
                    trainable: Callable[[str], bool] | None = None) -> str:
  """One line per parameter (then per optimiser slot) and their totals; with ``trainable``,
  the frozen parameters (no optimiser state, no update) are listed after them.

  Without ``logical_axes`` (T5X's three-argument call) the mesh axes come from the
  shapes' own shardings and the logical axes show as ().
  """
  lines = []
  if logical_axes is None:
    mesh_axes = jax.tree_util.tree_map(_spec_of, state_shape)
    logical_axes = jax.tree_util.tree_map(lambda _: PartitionSpec(), state_shape)
    lines.append('# Logical axes not given; mesh axes from the shardings.')
  else:
    mesh_axes = partitioner.logical_to_mesh_axes(logical_axes)
  for title, field in (('Parameters', 'params'), ('Optimizer state', 'opt_state')):
    rows = _rows(getattr(state_shape, field), getattr(logical_axes, field),
                 getattr(mesh_axes, field))
    lines.append(f'# {title}: name, shape, dtype, logical axes, mesh axes, count')
    width = max((len(r[0]) for r in rows), default=0)
    for name, shape, dtype, axes, spec, count in rows:
      lines.append(f'{name:<{width}}  {str(shape):<16} {dtype:<8} {axes:<28} {spec:<20} {count:>12,}')
    lines.append(f'Total {title.lower()}: {sum(r[-1] for r in rows):,}')
    lines.append('')
    if field == 'params' and trainable is not None:
      frozen = [(name, count) for name, *_, count in rows if not trainable(name)]
      lines.append('# Frozen parameters (no optimizer state, no update): name, count')
      lines.extend(f'{name:<{width}}  {count:>12,}' for name, count in frozen)
      lines.append(f'Total frozen parameters: {sum(count for _, count in frozen):,} of '
                   f'{sum(r[-1] for r in rows):,}')
      lines.append('')
  return '\n'.join(lines)


def log_model_info(log_file: str | None, full_train_state: TrainState,
                   partitioner: PjitPartitioner, logical_axes: TrainState | None = None,
                   trainable: Callable[[str], bool] | None = None) -> str:
  """Writes ``model_info_text`` to ``log_file`` (process 0 only) and returns it."""
  text = model_info_text(full_train_state, logical_axes, partitioner, trainable)
  if log_file and multihost.is_primary():
    path = paths.resolve(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return text
