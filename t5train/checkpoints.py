"""The Orbax adapter: periodic saves into ``MODEL_DIR/checkpoint_<step>/``, keep policy, resume.

Orbax writes each checkpoint to a temporary directory and renames it when it
is complete, so an interrupted save is never mistaken for a checkpoint. A bucket
(``gs://``) has no rename: there Orbax writes in place and commits each item with
a ``commit_success.txt`` written last, and only committed checkpoints count.
Reading and converting checkpoints is ``checkpoint_reading``'s; T5X's notebook
interface is ``legacy_checkpoints``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from t5train import checkpoint_reading, hf_interop, paths
from t5train.checkpoint_reading import STATE_ITEM, STEP_PREFIX, checkpoint_dir
from t5train.errors import TrainingError, UserError
from t5train.train_state import TrainState, TrainStateInitializer

SAVE_DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
  """When and how to save (T5X's field names).

  A checkpoint is written every ``period`` steps, at each of ``steps``, and at
  the last step. ``keep`` keeps only the newest N (None: all), but a checkpoint
  whose step is a multiple of ``keep_period`` is never deleted. ``dtype`` is the
  dtype of the saved parameters. ``save_dataset`` also saves each host's data
  iterator, for exact resumes. ``use_async`` writes while training goes on.
  ``save_frozen_params=False`` leaves the frozen parameters (those no MultiOptimizer
  regex trains, e.g. a LoRA run's base weights) out of every checkpoint, which
  names the checkpoint they were restored from instead (see ``FrozenReference``).
  """

  period: int | None = 1000
  keep: int | None = None
  keep_period: int | None = None
  steps: tuple[int, ...] = ()
  dtype: str = 'float32'
  save_dataset: bool = True
  use_async: bool = True
  save_frozen_params: bool = True
  # Functions state_dict -> state_dict applied before ``LegacyCheckpointManager.save``.
  state_transformation_fns: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...] = ()

  def __post_init__(self) -> None:
    if self.dtype not in SAVE_DTYPES:
      raise UserError(f'SaveCheckpointConfig.dtype must be one of {", ".join(SAVE_DTYPES)}, '
                      f'not {self.dtype!r}')
    for name in ('period', 'keep', 'keep_period'):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise UserError(f'SaveCheckpointConfig.{name} must be a positive number or None, '
                        f'not {value}')


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """What to restore from ``path`` (see ``select_checkpoints`` for the modes).

  ``fallback_to_scratch``: when ``path`` holds no checkpoint, start from scratch
  (with a warning) instead of failing. ``assignment_map``: (regex, replacement)
  pairs that rename a model parameter to the checkpoint's name for it, or with
  None leave it freshly initialised (see ``restore_from_path``). ``dtype`` (T5X's
  meaning; None: as the model's): inference (infer, eval) restores the floating-point
  parameters in it ('bfloat16' halves their memory); a training start takes their
  values rounded to it, kept in the model's dtype for the optimizer. ``path`` may be
  a T5X checkpoint (either T5X format), read as it is.
  """

  path: str | None = None
  mode: str = 'latest'
  dtype: str = 'float32'
  fallback_to_scratch: bool = False
  assignment_map: tuple[tuple[str, str | None], ...] = ()


RESTORE_MODES = ('specific', 'latest', 'all')


def select_checkpoints(config: RestoreCheckpointConfig) -> list[tuple[int, str]]:
  """(step, directory) of the checkpoints ``config`` names, in step order.

  ``mode='specific'``: ``path`` is one checkpoint directory. ``'latest'``: the newest
  checkpoint in the directory ``path`` (or ``path`` itself if it is a checkpoint).
  ``'all'``: every checkpoint in ``path``.
  """
  if config.mode not in RESTORE_MODES:
    raise UserError(f'RestoreCheckpointConfig.mode must be one of {", ".join(RESTORE_MODES)}, '
                    f'not {config.mode!r}')
  if not config.path:
    raise UserError('no checkpoint to restore: set CHECKPOINT_PATH')
  found = checkpoint_reading.find_checkpoints(config.path)
  if config.mode == 'specific' and not checkpoint_reading.is_checkpoint_dir(config.path):
    raise UserError(f"{config.path} is not a checkpoint directory (mode='specific'); name a "
                    f"{STEP_PREFIX}_<step> directory or use mode='latest'")
  return found[-1:] if config.mode == 'latest' else found

def save_params(directory: str, params: Any, step: int = 0) -> str:
  """Writes ``directory/checkpoint_<step>/`` holding only the step and ``params`` (numpy or jax).

  Such a checkpoint is what converters write: training restores its parameters
  and starts the optimiser fresh.
  """
  target = checkpoint_dir(directory, step)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(checkpoint_reading.item_dir(target),
                    {'step': np.asarray(step, np.int32), 'params': params})
  checkpointer.wait_until_finished()
  checkpointer.close()
  return target


_DISK_FULL = {errno.ENOSPC: 'No space left on device', errno.EFBIG: 'File too large',
              errno.EDQUOT: 'Disk quota exceeded'}


def _disk_full_reason(error: BaseException) -> str | None:
  """The disk-full message in ``error`` or its causes (TensorStore and TF only give text)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
      return _DISK_FULL[error.errno]
    for reason in _DISK_FULL.values():
      if reason in str(error):
        return reason
    error = error.__cause__ or error.__context__
  return None


def _cast_floats(tree: Any, dtype: str) -> Any:
  if dtype == 'float32':
    return tree
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _save_decision_policy(config: SaveCheckpointConfig) -> Any:
  """Orbax's policy for ``config``: every ``period`` steps and at each of ``steps``. Stops on a
  signal are ``preemption.StopRequest``'s, which saves through ``save(force=True)``."""
  policies = ocp.checkpoint_managers
  chosen = [policies.SpecificStepsPolicy(tuple(config.steps))]
  if config.period is not None:
    chosen.append(policies.FixedIntervalPolicy(config.period))
  return policies.AnySavePolicy(chosen)


@dataclasses.dataclass(frozen=True)
class FrozenReference:
  """Frozen parameters that checkpoints leave out, and the checkpoint that holds them."""

  base_checkpoint: str
  names: frozenset[str]

  def trained_only(self, params: Any) -> Any:
    """``params`` without the frozen ones."""
    return hf_interop.nest({name: leaf for name, leaf in
                            checkpoint_reading.flatten_with_names(params)
                            if name not in self.names})

  def save_args(self) -> Any:
    return ocp.args.JsonSave({'base_checkpoint': self.base_checkpoint,
                              'frozen_parameters': len(self.names)})


class CheckpointManager:
  """Saves and restores TrainStates in their shardings with ``orbax.checkpoint``.

  Other items (the data iterator) are added with ``add_item`` and saved with
  every checkpoint. Unfinished saves left by a crash are removed on start-up.
  """

  def __init__(self, directory: str, save_config: SaveCheckpointConfig,
               state_shardings: TrainState, state_shape: TrainState):
    self._save_config = save_config
    self._abstract_state = checkpoint_reading.abstract_state(state_shape, state_shardings)
    self._extra_items: dict[str, Any] = {}
    # Set by ``frozen_reference_for`` when checkpoints leave out the frozen parameters.
    self.frozen_reference: FrozenReference | None = None
    self._writing = 0  # the step of the newest save started
    options = ocp.CheckpointManagerOptions(
        max_to_keep=save_config.keep, keep_period=save_config.keep_period,
        step_prefix=STEP_PREFIX, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=save_config.use_async,
        save_decision_policy=_save_decision_policy(save_config))
    self._manager = ocp.CheckpointManager(paths.resolve(directory), options=options)

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  @property
  def save_config(self) -> SaveCheckpointConfig:
    return self._save_config

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def add_item(self, name: str, args: Any) -> None:
    """Saves ``args`` (Orbax checkpoint args, e.g. the data iterator's) with every checkpoint."""
    self._extra_items[name] = args

  def should_save(self, step: int) -> bool:
    """Whether the policy saves at ``step``: a multiple of the period, or one of ``steps``,
    and newer than the newest checkpoint (Orbax decides)."""
    return step > 0 and self._manager.should_save(step)

  def save(self, state: TrainState, force: bool = False) -> bool:
    """Starts saving ``state`` at its step if the policy says so (or ``force``)."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps() or not (force or self.should_save(step)):
      return False
    state_dict = state.state_dict()
    state_dict['params'] = _cast_floats(state_dict['params'], self._save_config.dtype)
    items = {**self._extra_items}
    if self.frozen_reference is not None:
      state_dict['params'] = self.frozen_reference.trained_only(state_dict['params'])
      items[checkpoint_reading.BASE_ITEM] = self.frozen_reference.save_args()
    items[STATE_ITEM] = ocp.args.StandardSave(state_dict)
    with self._write_errors(step):
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._writing = step
    return saved

  @contextlib.contextmanager
  def _write_errors(self, step: int) -> Iterator[None]:
    """A full disk while writing ``step`` becomes a TrainingError that says what is safe."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      reason = _disk_full_reason(e)
      if reason is None:
        raise
      steps = [s for s in self._manager.all_steps() if s != step]
      kept = f'checkpoint_{max(steps)} and earlier are intact' if steps else 'no checkpoint is lost'
      raise TrainingError(f'cannot write {checkpoint_dir(self.directory, step)}: the disk is full '
                          f'({reason}); {kept}. Free some space and rerun to resume') from e

  def restore(self, step: int | None = None) -> TrainState | None:
    """The state at ``step`` (default: the newest), in its shardings; None if there is none."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    path = checkpoint_dir(self.directory, step)
    checkpoint_reading.check_resumable(path, self._abstract_state.params)
    if checkpoint_reading.base_checkpoint(path) is not None:
      restored = checkpoint_reading.restore_train_state(
          path, self._abstract_state, checkpoint_reading.saved_state_tree(path))[0]
      return self._abstract_state.replace_state_dict(restored)
    args = ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore(self._abstract_state.state_dict())})
    with checkpoint_reading.read_errors(path):
      restored = self._manager.restore(step, args=args)[STATE_ITEM]
    return self._abstract_state.replace_state_dict(restored)

  def restore_item(self, step: int, name: str, args: Any) -> bool:
    """Restores item ``name`` of checkpoint ``step`` with ``args``; False if it has none."""
    if not (paths.resolve(checkpoint_dir(self.directory, step)) / name).is_dir():
      return False
    self._manager.restore(step, args=ocp.args.Composite(**{name: args}))
    return True

  def wait_until_finished(self) -> None:
    with self._write_errors(self._writing):
      self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class StartingPoint(NamedTuple):
  """The state a run starts from, whether it is the model directory's own newest checkpoint (a
  resume), and the checkpoint it was restored from otherwise (None: fresh)."""

  state: TrainState
  resumed: bool
  restored_from: str | None = None


def restore_or_initialize(manager: CheckpointManager | None, initializer: TrainStateInitializer,
                          restore_cfg: RestoreCheckpointConfig | None,
                          init_rng: jax.Array) -> StartingPoint:
  """The state to start from: the newest checkpoint in the manager's directory (if there is a
  manager); then ``restore_cfg``'s path; then a fresh state from ``init_rng``."""
  state = manager.restore() if manager is not None else None
  if state is not None:
    step = int(state.step)
    logging.info('Resuming from %s.', checkpoint_dir(manager.directory, step))
    if restore_cfg is not None and restore_cfg.path:
      logging.warning('*** %s already has checkpoints, so the run resumes from step %d and '
                      'the initial checkpoint %s is IGNORED. Use a new directory to start from '
                      'it. ***', manager.directory, step, restore_cfg.path)
    return StartingPoint(state, True)
  if restore_cfg is not None and restore_cfg.path:
    try:
      _, path = select_checkpoints(restore_cfg)[-1]
    except UserError as e:
      if not restore_cfg.fallback_to_scratch:
        raise
      logging.warning('%s; starting from scratch (fallback_to_scratch).', e)
      return StartingPoint(initializer.from_scratch(init_rng), False)
    logging.info('Initialising from %s.', path)
    return StartingPoint(checkpoint_reading.restore_from_path(
        path, initializer, restore_cfg.assignment_map, init_rng, restore_cfg.dtype), False, path)
  logging.info('Initialising from scratch.')
  return StartingPoint(initializer.from_scratch(init_rng), False)


def frozen_reference_for(manager: CheckpointManager, trainable: Callable[[str], bool] | None,
                         params: Any, resumed: bool, restored_from: str | None) -> None:
  """Sets ``manager.frozen_reference`` when its config leaves the frozen parameters out.

  They come from the checkpoint the run started from (``restored_from``), or from the one its
  own checkpoints already name on a resume, and must be there under their own names.
  """
  if manager.save_config.save_frozen_params:
    return
  names = frozenset(name for name, _ in checkpoint_reading.flatten_with_names(params)
                    if trainable is not None and not trainable(name))
  if not names:
    logging.info('save_frozen_params=False, but no parameter is frozen: checkpoints hold them all.')
    return
  base = None
  if resumed:
    base = checkpoint_reading.base_checkpoint(checkpoint_dir(manager.directory,
                                                             manager.latest_step()))
    if base is None:
      logging.warning('save_frozen_params=False, but %s holds every parameter: checkpoints go '
                      'on holding them all.', manager.directory)
      return
  elif restored_from is not None:
    base = checkpoint_reading.base_checkpoint(restored_from) or restored_from
  if base is None:
    raise UserError('SaveCheckpointConfig.save_frozen_params=False leaves the frozen parameters '
                    'to the checkpoint they come from, and this run initialises them from '
                    'scratch: set INITIAL_CHECKPOINT_PATH, or save_frozen_params=True')
  saved = dict(checkpoint_reading.flatten_with_names(
      checkpoint_reading.saved_state_tree(base).get('params', {})))
  missing = sorted(names - set(saved))
  if missing:
    raise UserError(f'SaveCheckpointConfig.save_frozen_params=False: the frozen parameter '
                    f'{missing[0]} is not in {base} under that name (renamed by the assignment '
                    'map, or another layer layout), so checkpoints cannot leave it out; set '
                    'save_frozen_params=True')
  manager.frozen_reference = FrozenReference(base, names)
  logging.info('Checkpoints hold the trained parameters only; the %d frozen ones stay in %s.',
               len(names), base)
