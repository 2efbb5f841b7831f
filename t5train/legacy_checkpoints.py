"""T5X's notebook-facing checkpoint interface (``t5x.utils``'s names) over ``CheckpointManager``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from t5train import checkpoint_reading
from t5train.checkpoints import (
  CheckpointManager,
  RestoreCheckpointConfig,
  SaveCheckpointConfig,
  select_checkpoints,
)
from t5train.errors import UserError
from t5train.train_state import TrainState


def get_fallback_state(restore_cfg: RestoreCheckpointConfig, init_fn: Callable[[jax.Array], Any],
                       init_rng: jax.Array) -> Any | None:
  """``init_fn(init_rng)`` when the config may fall back to scratch, else None (T5X's helper)."""
  return init_fn(init_rng) if restore_cfg.fallback_to_scratch else None


class LegacyCheckpointManager:
  """T5X's notebook-facing checkpoint manager, over ``CheckpointManager``.

  ``train_state_shape`` is ``TrainStateInitializer.global_train_state_shape``, whose
  leaves carry their shardings. Saves wait until the checkpoint is written.
  """

  def __init__(self, save_cfg: SaveCheckpointConfig | None, restore_cfg: RestoreCheckpointConfig,
               train_state_shape: TrainState, partitioner: Any = None, ds_iter: Any = None,
               model_dir: str | None = None):
    del partitioner  # the shardings come with train_state_shape
    if ds_iter is not None:
      raise UserError('LegacyCheckpointManager saves no data iterator; pass ds_iter=None (the '
                      'train binary saves iterators itself)')
    self._restore_cfg = restore_cfg
    self._shape = train_state_shape
    shardings = jax.tree_util.tree_map(lambda leaf: leaf.sharding, train_state_shape)
    self._manager = None
    if save_cfg is not None and model_dir is not None:
      self._manager = CheckpointManager(model_dir, dataclasses.replace(save_cfg, save_dataset=False),
                                        shardings, train_state_shape)

  def restore(self, paths: Sequence[str | None], restore_cfg: RestoreCheckpointConfig,
              fallback_state: Mapping[str, Any] | None = None
              ) -> TrainState | list[TrainState] | None:
    """The state in the first of ``paths`` (by ``restore_cfg.mode``), or None if none is given.

    With ``mode='all'``, as in T5X, a list of states: one per checkpoint in the
    directory, in step order. A checkpoint without a matching optimiser state (a
    T5X checkpoint, read as it is, has none that t5train reads) takes it from
    ``fallback_state``. ``restore_cfg.assignment_map`` renames or skips parameters
    as the train binary's does (``checkpoint_reading.restore_mapped``): parameters
    mapped to None take their values from ``fallback_state``, as does the optimiser
    state, and the step is the checkpoint's. The parameters start from their values
    rounded to ``restore_cfg.dtype``, kept in the model's dtype.
    """
    paths = [path for path in paths if path]
    if not paths:
      return None
    try:
      selected = select_checkpoints(dataclasses.replace(restore_cfg, path=paths[0]))
    except UserError:
      if restore_cfg.fallback_to_scratch:
        return None
      raise
    if restore_cfg.mode == 'all':
      return [self._restore_one(path, restore_cfg, fallback_state) for _, path in selected]
    return self._restore_one(selected[-1][1], restore_cfg, fallback_state)

  def _restore_one(self, path: str, restore_cfg: RestoreCheckpointConfig,
                   fallback_state: Mapping[str, Any] | None) -> TrainState:
    abstract = TrainState(step=self._shape.step, params=self._shape.params,
                          opt_state=self._shape.opt_state)
    if restore_cfg.assignment_map:
      if fallback_state is None:
        raise UserError(f'restoring {path} with an assignment_map starts the optimizer fresh and '
                        'takes the parameters mapped to None from fallback_state; pass '
                        'fallback_state (e.g. get_fallback_state with fallback_to_scratch=True)')
      step, params = checkpoint_reading.restore_mapped(
          path, abstract, restore_cfg.assignment_map, lambda: fallback_state['params'])
      return TrainState(step=step,
                        params=checkpoint_reading.round_params(params, restore_cfg.dtype),
                        opt_state=fallback_state['opt_state'])
    saved = checkpoint_reading.saved_for_model(path, abstract.params)
    checkpoint_reading.check_params(path, abstract.params, saved)
    restored, with_optimizer = checkpoint_reading.restore_train_state(path, abstract, saved)
    restored['params'] = checkpoint_reading.round_params(restored['params'], restore_cfg.dtype)
    if with_optimizer:
      return abstract.replace_state_dict(restored)
    if fallback_state is None:
      raise UserError(f'{path} has no optimizer state for this optimizer; set '
                      'RestoreCheckpointConfig.fallback_to_scratch to start the optimizer fresh')
    return TrainState(step=restored['step'], params=restored['params'],
                      opt_state=fallback_state['opt_state'])

  def save(self, train_state: TrainState,
           state_transformation_fns: Sequence[Callable[[dict[str, Any]], dict[str, Any]]] = ()
           ) -> None:
    """Writes ``train_state`` (after the transformations) at its step and waits for it."""
    if self._manager is None:
      raise UserError('this LegacyCheckpointManager has no save_cfg and model_dir to save to')
    state_dict = train_state.state_dict()
    for transform in state_transformation_fns:
      state_dict = transform(state_dict)
    self._manager.save(train_state.replace_state_dict(state_dict), force=True)
    self._manager.wait_until_finished()
