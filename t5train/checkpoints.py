"""The Orbax adapter: periodic saves into ``MODEL_DIR/checkpoint_<step>/``, keep policy, restore.

Orbax writes each checkpoint to a temporary directory and renames it when it
is complete, so an interrupted save is never mistaken for a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from t5train.errors import UserError
from t5train.train_state import TrainState

STEP_PREFIX = 'checkpoint'
# Each checkpoint directory holds named items; the train state is one of them.
STATE_ITEM = 'state'


@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
  """When and how to save (T5X's field names). ``keep=None`` keeps every checkpoint."""

  period: int = 1000
  keep: int | None = None
  dtype: str = 'float32'
  save_dataset: bool = False
  use_async: bool = True


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """What to restore: ``mode='latest'`` in ``path`` or ``'specific'`` checkpoint ``path``."""

  path: str | None = None
  mode: str = 'latest'
  dtype: str = 'float32'


def checkpoint_dir(model_dir: str, step: int) -> str:
  return os.path.join(model_dir, f'{STEP_PREFIX}_{step}')


def _abstract(state_shape: TrainState, state_shardings: TrainState) -> TrainState:
  return jax.tree_util.tree_map(
      lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
      state_shape, state_shardings)


def restore_from_path(path: str, state_shardings: TrainState, state_shape: TrainState
                      ) -> TrainState:
  """The train state saved in the checkpoint directory ``path`` (e.g. ``.../checkpoint_1000``)."""
  if not os.path.isdir(path):
    raise UserError(f'checkpoint {path!r} does not exist or is not a directory')
  abstract = _abstract(state_shape, state_shardings)
  try:
    item_dir = os.path.join(os.path.abspath(path), STATE_ITEM)
    restored = ocp.StandardCheckpointer().restore(item_dir, abstract.state_dict())
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise UserError(f'cannot restore {path}: it is not a t5train checkpoint of this model '
                    f'({str(e).splitlines()[0] if str(e) else type(e).__name__})') from e
  return abstract.replace_state_dict(restored)


class CheckpointManager:
  """Saves and restores TrainStates in their shardings with ``orbax.checkpoint``."""

  def __init__(self, directory: str, save_config: SaveCheckpointConfig,
               state_shardings: TrainState, state_shape: TrainState):
    self._save_config = save_config
    self._abstract_state = _abstract(state_shape, state_shardings)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=save_config.keep, step_prefix=STEP_PREFIX, create=True,
        save_interval_steps=save_config.period,
        enable_async_checkpointing=save_config.use_async)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether ``step`` is a multiple of the save period."""
    return step > 0 and step % self._save_config.period == 0

  def save(self, state: TrainState, force: bool = False) -> bool:
    """Starts saving ``state`` at its step if the period says so (or ``force``)."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state.state_dict())})
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int | None = None) -> TrainState | None:
    """The state at ``step`` (default: the newest), in its shardings; None if there is none."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = self._abstract_state.state_dict()
    try:
      args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
      restored = self._manager.restore(step, args=args)[STATE_ITEM]
    except (ValueError, KeyError) as e:
      raise UserError(f'cannot restore {checkpoint_dir(self.directory, step)}: it does not '
                      f'match this model ({e})') from e
    return self._abstract_state.replace_state_dict(restored)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
